"""TensorBoard: a row's metrics as scalars at step = round, in event files under the run directory.

torch's `SummaryWriter` (it needs the `tensorboard` package) queues each scalar for its own writer thread,
so a round's call only builds small protobufs; the thread flushes every `FLUSH_S` seconds and at the end.
The resolved config is a text entry (`config`), as TOML. `tensorboard --logdir <run dir>/tensorboard`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.tracking.rows import scalars, step_of

FLUSH_S = 10  # the most a live TensorBoard lags the run


class TensorBoardTracker:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # an optional extra: imported when asked for

        self.log_dir = log_dir
        self.writer: SummaryWriter | None = SummaryWriter(log_dir=str(log_dir), flush_secs=FLUSH_S)

    def log_params(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        if self.writer is not None:
            self.writer.add_text("config", "```toml\n" + tomli_w.dumps(config) + "```", global_step=0)

    def log_row(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        step = step_of(row)
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=step)

    def finish(self, adapter_dir: Path) -> None:
        self.close()  # TensorBoard keeps no files: the adapter stays in the run directory

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
