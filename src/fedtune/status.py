"""`fedtune status`: a deployed run's state file as plain-text lines (rounds, stragglers, refusals)."""

from __future__ import annotations

import time

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


def _round_line(record: RoundRecord) -> str:
    selected = len(record.participants)
    submitted = sum(p.status == SUBMITTED_STATUS for p in record.participants)
    stragglers = [p.client_id for p in record.participants if p.status in WAITING_STATUSES]
    line = f"round {record.round_num:>4}  {record.status:<6}  submitted {submitted}/{selected}"
    line += f"  stragglers {len(stragglers)}"
    if stragglers:
        shown = ", ".join(stragglers[:5])
        more = f" +{len(stragglers) - 5} more" if len(stragglers) > 5 else ""
        line += f" ({shown}{more})"
    others = _other_statuses(record.participants)
    if others:
        line += f"  {others}"
    reason = (record.metrics or {}).get("round_failed")
    if record.status == "failed" and reason:
        line += f"  reason: {reason}"
    return line


def _other_statuses(participants: list[Participant]) -> str:
    counts: dict[str, int] = {}
    for p in participants:
        if p.status != SUBMITTED_STATUS and p.status not in WAITING_STATUSES:
            counts[p.status] = counts.get(p.status, 0) + 1
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))


def _event_lines(events: dict[str, int]) -> list[str]:
    refused = {k: n for k, n in sorted(events.items()) if k.startswith(REFUSED_EVENT_PREFIX)}
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
