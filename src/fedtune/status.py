"""`fedtune status`: a deployed run's state file as plain-text lines (rounds, stragglers, refusals).

`participation` and `refused_counts` are the readings of a round's participants and of the refused events
that both `fedtune status` and the dashboard show (`fedtune.dashboard`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from fedtune.store import (
    REFUSED_EVENT_PREFIX,
    SUBMITTED_STATUS,
    WAITING_STATUSES,
    Event,
    Participant,
    RoundRecord,
)


def status_lines(
    records: list[RoundRecord],
    events: dict[str, int],
    *,
    last: int = 5,
    refusals: list[Event] | None = None,
) -> list[str]:
    """Plain-text lines describing the run: a summary, the latest `last` rounds, the refused messages
    and connections by kind, and the latest `refusals` with their reasons."""
    tail = [*_event_lines(events), *_refusal_lines(refusals or [])]
    if not records:
        return ["no rounds yet", *tail]
    done = sum(r.status == "done" for r in records)
    failed = sum(r.status == "failed" for r in records)
    is_open = sum(r.status == "open" for r in records)
    lines = [f"rounds: {done} done, {failed} failed, {is_open} open (latest {records[-1].round_num})"]
    lines += [_round_line(r) for r in records[-last:]]
    return lines + tail


@dataclass(frozen=True)
class RoundParticipation:
    """Who a round selected and where each stands: submitted, still waiting (a straggler once the round
    closed), or another status the server gave (refused, dropped, ...)."""

    selected: int
    submitted: int
    stragglers: tuple[str, ...]  # selected or sent, no update (yet)
    others: Mapping[str, int]  # status -> clients, for the statuses that are neither


def participation(participants: list[Participant]) -> RoundParticipation:
    others: dict[str, int] = {}
    for p in participants:
        if p.status != SUBMITTED_STATUS and p.status not in WAITING_STATUSES:
            others[p.status] = others.get(p.status, 0) + 1
    return RoundParticipation(
        selected=len(participants),
        submitted=sum(p.status == SUBMITTED_STATUS for p in participants),
        stragglers=tuple(p.client_id for p in participants if p.status in WAITING_STATUSES),
        others=dict(sorted(others.items())),
    )


def refused_counts(events: dict[str, int]) -> dict[str, int]:
    """Event kind -> count, for the kinds that are refused messages or connections."""
    return {k: n for k, n in sorted(events.items()) if k.startswith(REFUSED_EVENT_PREFIX)}


def _round_line(record: RoundRecord) -> str:
    part = participation(record.participants)
    stragglers = part.stragglers
    line = f"round {record.round_num:>4}  {record.status:<6}  submitted {part.submitted}/{part.selected}"
    line += f"  stragglers {len(stragglers)}"
    if stragglers:
        shown = ", ".join(stragglers[:5])
        more = f" +{len(stragglers) - 5} more" if len(stragglers) > 5 else ""
        line += f" ({shown}{more})"
    if part.others:
        line += "  " + ", ".join(f"{status} {n}" for status, n in part.others.items())
    reason = (record.metrics or {}).get("round_failed")
    if record.status == "failed" and reason:
        line += f"  reason: {reason}"
    return line


def _event_lines(events: dict[str, int]) -> list[str]:
    refused = refused_counts(events)
    line = f"refused messages: {sum(refused.values())}"
    if refused:
        line += " (" + ", ".join(f"{k} {n}" for k, n in refused.items()) + ")"
    return [line]


def _refusal_lines(refusals: list[Event]) -> list[str]:
    if not refusals:
        return []
    lines = ["latest refusals:"]
    for e in refusals:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
        who = f" {e.client_id}" if e.client_id else ""
        lines.append(f"  {when}{who} {e.kind.removeprefix(REFUSED_EVENT_PREFIX + '_')}: {e.detail}")
    return lines
