"""What a client keeps between its rounds, in one store: its error-feedback residual, its DP-SGD steps, its
SCAFFOLD control variate c_i, its personal adapter (`round.personal`).

In simulation the engine's in-process participants share one `ClientStateStore` for the whole population;
at a deployed site the site's process holds its own, with one entry. A participant reads its state when
a round's work begins (`begin`) and writes the new state when its update is encoded (`commit`). With
`repeatable` (a site), the store also keeps the state from before the last committed round, so a round
the server hands out again after a restart starts from the same state and yields the same update; a
simulation never repeats a round and keeps one state per client. `state_dict` / `load_state_dict` make it
part of a checkpoint (tensors apart from the JSON-able counters); a repeatable store's checkpoint also holds
the state from before the last round, so a site restored from its file can repeat that round. A worker
process of a simulation (`round.pool`) trains a client on a store of its own: `export` and `adopt` move
the client's entry there and back.

Memory is what the states hold: O(adapter) per client with error feedback, SCAFFOLD or a personal adapter,
nothing otherwise.
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
    control: torch.Tensor | None = None  # SCAFFOLD: the client's control variate c_i (float32); None: zero
    personal: torch.Tensor | None = None  # ditto, split: the client's personal adapter (float32); None: none

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by kind ("residual", "control", "personal"), those it holds."""
        found = {"residual": self.residual, "control": self.control, "personal": self.personal}
        return {kind: t for kind, t in found.items() if t is not None}


EMPTY = ClientState()
KINDS = ("residual", "control", "personal")


@dataclass(frozen=True, eq=False)
class StateEntry:
    round_num: int  # the round `state` was committed in
    state: ClientState
    before: ClientState | None  # the state before that round (repeatable stores only)


class ClientStateStore:
    def __init__(self, *, repeatable: bool = False) -> None:
        self.repeatable = repeatable
        self._entries: dict[str, StateEntry] = {}

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
        self._entries[client_id] = StateEntry(round_num, state, before)

    def export(self, client_id: str) -> StateEntry | None:
        """The client's entry as it stands (None before its first commit), for another store to `adopt`:
        a simulation's worker process trains the client on a store of its own."""
        return self._entries.get(client_id)

    def adopt(self, client_id: str, entry: StateEntry | None) -> None:
        """Take the client's entry from another store (None: the client has no state yet)."""
        if entry is None:
            self._entries.pop(client_id, None)
        else:
            self._entries[client_id] = entry

    def get(self, client_id: str) -> ClientState:
        """The latest committed state (EMPTY before any)."""
        entry = self._entries.get(client_id)
        return EMPTY if entry is None else entry.state

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Memory held by the residuals and controls."""
        total = 0
        for entry in self._entries.values():
            for state in (entry.state, entry.before):
                if state is not None:
                    total += sum(t.numel() * t.element_size() for t in state.tensors().values())
        return total

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The states as (tensors by name, JSON-able meta), for a checkpoint: the latest ones, and in a
        repeatable store the ones from before the last round ("before/..." tensors, meta "before_steps")."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for cid, entry in self._entries.items():
            info: dict[str, Any] = {"round": entry.round_num, "dpsgd_steps": entry.state.dpsgd_steps}
            for kind, tensor in entry.state.tensors().items():
                tensors[f"{kind}/{cid}"] = tensor
            if self.repeatable and entry.before is not None:
                info["before_steps"] = entry.before.dpsgd_steps
                for kind, tensor in entry.before.tensors().items():
                    tensors[f"before/{kind}/{cid}"] = tensor
            meta[cid] = info
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Replace the store's states with a checkpoint's; refuses one that does not match itself."""
        for name in tensors:
            kind, _, cid = name.removeprefix("before/").partition("/")
            if kind not in KINDS or cid not in meta:
                raise StateError(f"client state checkpoint has a tensor for no client: {name}")
        entries = {}
        for cid, info in meta.items():
            try:
                round_num, steps = int(info["round"]), int(info["dpsgd_steps"])
                before_steps = info.get("before_steps")
                before_steps = None if before_steps is None else int(before_steps)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise StateError(f"client state checkpoint entry for {cid!r} is malformed") from None
            state = _state(tensors, cid, steps)
            before = None
            if self.repeatable and before_steps is not None:
                before = _state(tensors, cid, before_steps, prefix="before/")
            entries[cid] = StateEntry(round_num, state, before)
        self._entries = entries


def _state(tensors: dict[str, torch.Tensor], cid: str, steps: int, prefix: str = "") -> ClientState:
    """A client's state from a checkpoint's tensors, named `{prefix}{kind}/{cid}`."""
    found = {kind: tensors.get(f"{prefix}{kind}/{cid}") for kind in KINDS}
    return ClientState(found["residual"], steps, found["control"], found["personal"])
