"""A deployed server with a robust rule against a site that misbehaves on purpose.

Four real sites over mutual TLS on loopback; one of them wraps its honest trainer in the `scale` attack
(its delta x 20, `attack.trainer`), as a compromised site would. The server runs `multi_krum` (f = 1,
keeping n - f = 3 updates) through a rule that records the round's update matrix, so the test can
compare the aggregate with the honest sites' mean: multi-Krum keeps the round's result at the honest
mean, where FedAvg's mean of the same updates is pulled far off.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from fedtune.aggregate import multi_krum
from fedtune.attack import AttackPlan, PoisonedTrainer
from fedtune.config import load_config_text
from fedtune.deploy.site import build_site, run_client
from fedtune.pki import common_name, load_identity
from fedtune.transport.channel import Stub, open_channel
from fedtune.transport.site_driver import SiteRun, take_part
from tests.deploy_fixtures import deploy_config, make_certs, make_site_data, running_server

SITES = ("site-a", "site-b", "site-c", "site-d")
ATTACKER = "site-d"
BOOST = 20.0


def misbehaving_site(target: str, certs: Path, data: Path) -> None:
    """`fedtune client`'s own steps, with the site's trainer wrapped in the scale attack."""
    client_id = common_name(load_identity(certs).cert_pem)

    def build(config_toml: str) -> SiteRun:
        site = build_site(load_config_text(config_toml), data, "text", client_id)
        plan = AttackPlan("scale", (client_id,), BOOST, 10.0, 1.0, "std", None, batch_size=4)
        site.participant.trainer = PoisonedTrainer(site.participant.trainer, plan)
        return site

    take_part(Stub(open_channel(target, certs)), client_id, build, give_up_after_s=60)


def test_multi_krum_keeps_a_deployed_round_at_the_honest_mean(tmp_path: Path) -> None:
    certs = make_certs(tmp_path, SITES)
    data = make_site_data(tmp_path, SITES)
    config = deploy_config(
        tmp_path,
        certs,
        SITES,
        "federation.rounds=1",
        "eval.every=1",
        "server.rule='multi_krum'",
        "server.byzantine=1",
    )
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recording_multi_krum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        kept = multi_krum(deltas, weights, byzantine=1)
        seen.append((deltas.clone(), weights.clone(), kept.clone()))
        return kept

    errors: list[BaseException] = []

    def site(sid: str, target: str) -> None:
        try:
            site_certs = certs / "clients" / sid
            if sid == ATTACKER:
                misbehaving_site(target, site_certs, data[sid])
            else:
                run_client(target, data[sid], certs=site_certs, give_up_after_s=60)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with running_server(config, rule=recording_multi_krum) as server:
        threads = [threading.Thread(target=site, args=(s, server.target), daemon=True) for s in SITES]
        for t in threads:
            t.start()
        server.thread.join(timeout=300)
        assert "result" in server.result, server.result.get("error")
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors

    ((deltas, weights, kept),) = seen  # what the server's rule saw, and the delta it applied
    assert deltas.shape[0] == 4
    norms = deltas.norm(dim=1)
    bad = int(norms.argmax())
    assert float(norms[bad]) > 10 * float(norms.median())  # the boosted update is in the round
    honest = [i for i in range(4) if i != bad]
    w = weights[honest]
    honest_mean = (w @ deltas[honest]) / w.sum()
    fedavg = (weights @ deltas) / weights.sum()
    scale = float(honest_mean.norm())
    assert float((kept - honest_mean).norm()) < 1e-6 * max(scale, 1.0)
    assert float((fedavg - honest_mean).norm()) > 2 * scale  # what the attack does to plain FedAvg
    assert server.trained()[0]["clients"] == 4
