"""`fedtune client`: one site's process. It connects out to the server, trains on its own file when
selected, evaluates the global adapter when asked, and keeps its client state (error-feedback residual,
DP-SGD steps, SCAFFOLD's control) to itself: in its folder (`site_state`), across its restarts.

Join (the server sends the run's config) -> load the model and the site's file once (`load_site`, the
same steps a simulation of this site's folder takes) -> the round engine's `Participant`, answering
what the server sends through `transport.site_driver`. With `[personalize]` the site's personal adapter
is written, in PEFT's format, to `personal/` in its folder at the run's last evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from fedtune.config import Config, load_config_text
from fedtune.config.plan import participant_spec
from fedtune.data import load_site
from fedtune.deploy.site_state import SiteRunIdentity, SiteStateStore
from fedtune.errors import DataError
from fedtune.local import load_model, make_personal_trainer, make_trainer, tokenizer_for, torch_threads
from fedtune.model.adapter import save_adapter
from fedtune.pki import common_name, load_identity
from fedtune.privacy.noise import os_entropy_rng
from fedtune.round.participant import Participant
from fedtune.round.state import ClientStateStore
from fedtune.transport.channel import Stub, open_channel, server_address
from fedtune.transport.site_driver import ClientError, ClientResult, SiteRun, take_part
from fedtune.transport.site_tls import diagnose, preflight

PERSONAL_DIR = "personal"  # the site's personal adapter, in PEFT's format, in its folder


def build_site(
    config: Config, data_path: Path, text_field: str, client_id: str, *, state_dir: Path | None = None
) -> SiteRun:
    """What the site builds once it knows the run: its data first (a bad file fails before the model
    loads), then the model, the trainer and the participant. `state_dir`: the folder its client state is
    kept in across restarts, when the run gives clients state to keep (`site_state`; a state file from
    another run is refused), and its personal adapter in (`personal/`, with `[personalize]`); None: in
    memory only."""
    model_dir, tokenizer = tokenizer_for(config)
    data = load_site(data_path, config.data, client_id, tokenizer, config.data_seed, text_field)
    local = load_model(config, model_dir, tokenizer.pad_token_id)
    spec = participant_spec(config)
    states = ClientStateStore(repeatable=True)
    if state_dir is not None and spec.keeps_state:
        states = SiteStateStore(state_dir, SiteRunIdentity.of(config, client_id, local.adapter.numel))

    def keep_personal(_client_id: str, flat: torch.Tensor) -> None:
        if state_dir is not None:  # the site's own folder, never the server's
            save_adapter(local.model, local.adapter, flat, state_dir / PERSONAL_DIR, model_dir)

    participant = Participant(
        data,
        local,
        make_trainer(config, local),
        states,
        spec,
        noise_rng=os_entropy_rng(),
        personal_trainer=make_personal_trainer(config, local),
        keep_personal=keep_personal,
    )
    return SiteRun(participant, local.adapter.numel, config.deploy.chunk_kib * 1024, len(data.train))


def run_client(
    server: str,
    data_path: Path,
    *,
    certs: Path | None,
    client_id: str | None = None,
    text_field: str = "text",
    give_up_after_s: float = 600.0,
    notify: Callable[[str], None] = lambda _msg: None,
    show: Callable[[str], None] = lambda _state: None,
    preflight_done: bool = False,
    state_dir: Path | None = None,
) -> ClientResult:
    """Take part in the server's run until it is done. `certs` is the site's folder from
    `fedtune certs issue` (None: plaintext, `client_id` names the client; for tests only). The folder is
    checked before connecting (`preflight`, unless the caller did: `preflight_done`), and a refused TLS
    handshake ends the site at once with the reason. The client state is kept in `state_dir`, by default
    the `certs` folder (plaintext without one: in memory only)."""
    server = server_address(server)
    if not preflight_done:  # the folder checked and one handshake, before anything loads
        preflight(server, certs)
    if certs is not None:
        client_id = common_name(load_identity(certs).cert_pem)
    if not client_id:
        raise ClientError("a client id is needed: pass --certs (its certificate names the client)")
    if not data_path.is_file():
        raise DataError(f"--data {str(data_path)!r} not found; pass the site's .jsonl, .csv or .parquet file")
    stub = Stub(open_channel(server, certs))
    cid, folder = client_id, state_dir if state_dir is not None else certs
    with ExitStack() as threads:  # the run's torch threads while the site takes part, restored after

        def build(config_toml: str) -> SiteRun:
            config = load_config_text(config_toml, "the server's config")
            threads.enter_context(torch_threads(config.run.threads))
            return build_site(config, data_path, text_field, cid, state_dir=folder)

        return take_part(
            stub,
            cid,
            build,
            give_up_after_s=give_up_after_s,
            notify=notify,
            show=show,
            diagnose=lambda: diagnose(server, certs),
        )
