"""What a client keeps between its rounds, in one store: its error-feedback residual, its DP-SGD steps.

In simulation the engine's in-process participants share one `ClientStateStore` for the whole population;
at a deployed site the site's process holds its own, with one entry. A participant reads its state when
a round's work begins (`begin`) and writes the new state when its update is encoded (`commit`). With
`repeatable` (a site), the store also keeps the state from before the last committed round, so a round
the server hands out again after a restart starts from the same state and yields the same update; a
simulation never repeats a round and keeps one state per client. `state_dict` / `load_state_dict` make it
part of a checkpoint (tensors apart from the JSON-able counters).

Memory is what the states hold: O(adapter) per client with error feedback, nothing otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedtune.errors import StateError


@dataclass(frozen=True, eq=False)
class ClientState:
    residual: torch.Tensor | None = None  # error feedback: what compression has not yet sent (float32)
    dpsgd_steps: int = 0  # DP-SGD: local steps taken on this client's records, all rounds together


EMPTY = ClientState()


@dataclass(frozen=True, eq=False)
class _Entry:
    round_num: int  # the round `state` was committed in
    state: ClientState
    before: ClientState | None  # the state before that round (repeatable stores only)


class ClientStateStore:
    def __init__(self, *, repeatable: bool = False) -> None:
        self.repeatable = repeatable
        self._entries: dict[str, _Entry] = {}

    def begin(self, client_id: str, round_num: int) -> ClientState:
        """The client's state at the start of `round_num`: as committed by its last earlier round."""
        entry = self._entries.get(client_id)
        if entry is None:
            return EMPTY
        if entry.round_num < round_num:
            return entry.state
        if self.repeatable and entry.round_num == round_num and entry.before is not None:
            return entry.before  # the round again (the server restarted): start from the same state
        raise StateError(
            f"client {client_id!r} already committed round {entry.round_num}; round {round_num} "
            "cannot start from an earlier state"
        )

    def commit(self, client_id: str, round_num: int, state: ClientState) -> None:
        """The client's state after its work in `round_num`."""
        before = self.begin(client_id, round_num) if self.repeatable else None
        self._entries[client_id] = _Entry(round_num, state, before)

    def get(self, client_id: str) -> ClientState:
        """The latest committed state (EMPTY before any)."""
        entry = self._entries.get(client_id)
        return EMPTY if entry is None else entry.state

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Memory held by the residuals."""
        total = 0
        for entry in self._entries.values():
            for state in (entry.state, entry.before):
                if state is not None and state.residual is not None:
                    total += state.residual.numel() * state.residual.element_size()
        return total

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The latest states as (tensors by name, JSON-able meta), for a checkpoint."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for cid, entry in self._entries.items():
            meta[cid] = {"round": entry.round_num, "dpsgd_steps": entry.state.dpsgd_steps}
            if entry.state.residual is not None:
                tensors[f"residual/{cid}"] = entry.state.residual
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Replace the store's states with a checkpoint's; refuses one that does not match itself."""
        unknown = {name for name in tensors if name.removeprefix("residual/") not in meta}
        if unknown:
            raise StateError(f"client state checkpoint has a residual for no client: {sorted(unknown)[0]}")
        entries = {}
        for cid, info in meta.items():
            try:
                round_num, steps = int(info["round"]), int(info["dpsgd_steps"])
            except (KeyError, TypeError, ValueError):
                raise StateError(f"client state checkpoint entry for {cid!r} is malformed") from None
            residual = tensors.get(f"residual/{cid}")
            entries[cid] = _Entry(round_num, ClientState(residual, steps), None)
        self._entries = entries
