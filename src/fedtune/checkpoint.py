"""A checkpoint, and how it is kept in the state file: tensors as safetensors, the rest as strict JSON.

On load the adapter blob must hold one 1-D float32 tensor "global" (and, under SCAFFOLD, the server control
"control" of the same shape, nothing else), and every JSON part must parse; anything else is a corrupt file
(StateError), never a pickle. Metrics are strict JSON: NaN and Inf are stored as null, numpy and torch
numbers as Python ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedtune.errors import StateError
from fedtune.jsonstate import dumps, loads


@dataclass(frozen=True)
class Checkpoint:
    round_num: int  # the last completed round (0 = the initial adapter)
    global_flat: torch.Tensor  # float32, 1-D
    optimizer_state: dict[str, torch.Tensor]
    dp_state: dict[str, Any] | None = None  # ClientLevelDp.state_dict(): JSON-able
    extra: dict[str, Any] | None = None  # JSON-able, e.g. {"rows_written": 3}
    control: torch.Tensor | None = None  # SCAFFOLD's server control c (float32, the adapter's shape)


Encoded = tuple[bytes, bytes, str | None, str | None]


def encode_checkpoint(checkpoint: Checkpoint) -> Encoded:
    flat = checkpoint.global_flat
    if flat.dim() != 1 or flat.dtype != torch.float32:
        raise StateError(
            f"checkpoint adapter is {flat.dtype} with shape {tuple(flat.shape)}; "
            "pass the flat float32 adapter"
        )
    tensors = {"global": _plain(flat)}
    if checkpoint.control is not None:
        if checkpoint.control.shape != flat.shape or checkpoint.control.dtype != torch.float32:
            raise StateError("checkpoint control is not a float32 tensor of the adapter's shape")
        tensors["control"] = _plain(checkpoint.control)
    adapter = save_tensors(tensors)
    optimizer = save_tensors({k: _plain(v) for k, v in checkpoint.optimizer_state.items()})
    return adapter, optimizer, dumps(checkpoint.dp_state, "dp_state"), dumps(checkpoint.extra, "extra")


def decode_checkpoint(
    round_num: int, adapter: object, optimizer: object, dp_state: str | None, extra: str | None, *, where: str
) -> Checkpoint:
    corrupt = f"the checkpoint of round {round_num} in {where} is corrupt"
    fix = "restore the state file from a backup or start a new run.dir"
    if not isinstance(adapter, bytes) or not isinstance(optimizer, bytes):
        raise StateError(f"{corrupt} (not a blob): {fix}")
    try:
        tensors = load_tensors(adapter)
        optimizer_state = load_tensors(optimizer)
    except SafetensorError as err:
        raise StateError(f"{corrupt} ({err}): {fix}") from err
    flat, control = tensors.get("global"), tensors.get("control")
    if (
        not set(tensors) <= {"global", "control"}
        or flat is None
        or flat.dim() != 1
        or flat.dtype != torch.float32
        or (control is not None and (control.shape != flat.shape or control.dtype != torch.float32))
    ):
        found = {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
        raise StateError(
            f"{corrupt} (adapter holds {found}, not one 1-D float32 'global' and its 'control'): {fix}"
        )
    return Checkpoint(
        round_num=int(round_num),
        global_flat=flat,
        optimizer_state=optimizer_state,
        dp_state=loads(dp_state, f"DP state of round {round_num}"),
        extra=loads(extra, f"extra state of round {round_num}"),
        control=control,
    )


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy with its own storage, as safetensors wants."""
    return tensor.detach().to("cpu").contiguous().clone()
