"""A site's client state on disk, so a site that restarts keeps what it keeps between rounds.

What a client carries from round to round (SCAFFOLD's control c_i, the error-feedback residual, its DP-SGD
steps) lives in its `ClientStateStore`; at a site that store is a `SiteStateStore`, which writes itself to
`client_state.safetensors` in the site's folder after every commit and reads it back when the site starts.
The write is atomic (a temporary file in the same folder, fsynced, then `os.replace`): a crash leaves the
old file or the new one, never half of one. The file is the owner's only (0600, as `tempfile.mkstemp`
creates it): its values derive from the site's data. It holds the latest state and the one from before
the last round (the store is repeatable), so a round the server hands out again after either end
restarted starts from the same state and yields the same update.

The file says whose it is: the client id, the run's name and seed, the adapter's size, and a fingerprint
of the run's config without the keys `fedtune server --resume` may change (`deploy.resume`), so the file
survives a resumed server. A file from another run (or another client, or another model) is refused with
StateError naming the file and the fix, never merged. A new run with the very same config is caught at its
first round: the store refuses to start a round earlier than the file's last committed one. Tensors are
safetensors, the rest strict JSON: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedtune.config import Config
from fedtune.deploy.resume import SAFE_KEYS
from fedtune.errors import StateError
from fedtune.round.state import ClientState, ClientStateStore

STATE_FILE = "client_state.safetensors"
FORMAT = "fedtune-client-state/1"


@dataclass(frozen=True)
class SiteRunIdentity:
    """What names the run a state file belongs to."""

    client_id: str
    run_name: str
    run_seed: int
    adapter_numel: int
    config_fingerprint: str  # `fingerprint(config)`

    @classmethod
    def of(cls, config: Config, client_id: str, adapter_numel: int) -> SiteRunIdentity:
        return cls(client_id, config.run.name, config.run.seed, adapter_numel, fingerprint(config))

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "client_id": self.client_id,
            "run_name": self.run_name,
            "run_seed": str(self.run_seed),
            "adapter_numel": str(self.adapter_numel),
            "config_fingerprint": self.config_fingerprint,
        }


RESUMABLE_KEYS = SAFE_KEYS | {"federation.rounds", "deploy.clients"}


def fingerprint(config: Config) -> str:
    """A hash of the run's config without the keys a resumed server may change."""
    dumped = config.model_dump(mode="json")
    kept = {
        section: {k: v for k, v in keys.items() if f"{section}.{k}" not in RESUMABLE_KEYS}
        for section, keys in dumped.items()
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:32]


class SiteStateStore(ClientStateStore):
    """A repeatable client-state store saved to `folder / STATE_FILE` after every commit."""

    def __init__(self, folder: Path, identity: SiteRunIdentity) -> None:
        super().__init__(repeatable=True)
        self.path = folder / STATE_FILE
        self.identity = identity
        if self.path.exists():
            self._load()

    def begin(self, client_id: str, round_num: int) -> ClientState:
        try:
            return super().begin(client_id, round_num)
        except StateError as err:
            raise StateError(
                f"{err}: the site's state file {self.path} is from a later point of a run with this config; "
                f"delete it if this is a new run, or give this run's site another folder"
            ) from None

    def commit(self, client_id: str, round_num: int, state: ClientState) -> None:
        super().commit(client_id, round_num, state)
        self.save()

    def save(self) -> None:
        tensors, meta = self.state_dict()
        metadata = {**self.identity.metadata(), "states": json.dumps(meta)}
        plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", dir=self.path.parent)
        os.close(fd)
        try:
            save_file(plain, tmp, metadata=metadata)
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self) -> None:
        fix = f"delete {self.path} if it is from another run, or give this run's site another folder"
        try:
            with safe_open(str(self.path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise StateError(f"the site's state file {self.path} is corrupt ({err}): {fix}") from err
        expected = self.identity.metadata()
        for key, value in expected.items():
            if metadata.get(key) != value:
                raise StateError(
                    f"the site's state file {self.path} belongs to another run ({key} = "
                    f"{metadata.get(key)!r}, this run's is {value!r}): {fix}"
                )
        try:
            meta = json.loads(metadata["states"])
        except (KeyError, json.JSONDecodeError) as err:
            raise StateError(f"the site's state file {self.path} is corrupt ({err}): {fix}") from err
        numel = self.identity.adapter_numel
        if any(not t.dtype.is_floating_point or t.numel() != numel for t in tensors.values()):
            raise StateError(f"the site's state file {self.path} holds tensors of another size: {fix}")
        self.load_state_dict(tensors, meta)
