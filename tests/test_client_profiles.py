"""`[clients]` profiles: who each profile picks, seeded draws, validation that names the field, refusals."""

from __future__ import annotations

import math

import pytest

from fedtune.config import load_config, to_toml
from fedtune.config.checks import check
from fedtune.config.load import load_config_text
from fedtune.errors import ConfigError
from fedtune.round.plan import LocalWork, ParticipantSpec, WeightRule
from fedtune.round.profiles import ClientProfile, ClientsConfig, resolve_profiles, spec_for

IDS = [f"site-{i:02d}" for i in range(20)] + ["phone-a", "phone-b"]


def clients(*profiles: dict) -> ClientsConfig:
    return ClientsConfig.model_validate({"profiles": list(profiles)})


def test_no_profile_is_the_default_client():
    resolved = resolve_profiles(ClientsConfig(), IDS, seed=0)
    assert set(resolved) == set(IDS)
    assert all(p == ClientProfile(cid) for cid, p in resolved.items())
    default = ClientProfile("x")
    assert default.seconds_per_example == 0.0 and math.isinf(default.upload_mbps)
    assert math.isinf(default.download_mbps) and default.availability == 1.0 and default.local_steps is None


def test_match_fraction_and_first_profile_wins():
    config = clients(
        {"fraction": 0.25, "upload_mbps": 2.0},
        {"match": "phone-*", "upload_mbps": 1.0},
        {"match": "site-0*", "upload_mbps": 3.0},
        {"upload_mbps": 4.0},  # neither: every client not picked yet
    )
    resolved = resolve_profiles(config, IDS, seed=0)
    share = [cid for cid, p in resolved.items() if p.profile == 0]
    assert len(share) == 6  # round(0.25 x 22)
    for cid, p in resolved.items():
        expected = (
            0 if cid in share else 1 if cid.startswith("phone") else 2 if cid.startswith("site-0") else 3
        )
        assert p.profile == expected and p.upload_mbps == [2.0, 1.0, 3.0, 4.0][expected]
    assert {p.profile for p in resolved.values()} == {0, 1, 2, 3}
    # the share is drawn from the seed
    assert share == [cid for cid, p in resolve_profiles(config, IDS, seed=0).items() if p.profile == 0]
    assert share != [cid for cid, p in resolve_profiles(config, IDS, seed=1).items() if p.profile == 0]


def test_two_fraction_profiles_take_disjoint_shares():
    config = clients({"fraction": 0.5, "availability": 0.1}, {"fraction": 0.5, "availability": 0.2})
    resolved = resolve_profiles(config, IDS, seed=4)
    assert sorted(p.profile for p in resolved.values()) == [0] * 11 + [1] * 11


def test_distributions_are_drawn_once_per_client_from_the_seed():
    config = clients(
        {
            "seconds_per_example": {"lognormal": {"median": 0.05, "sigma": 0.5}},
            "download_mbps": {"uniform": [5.0, 50.0]},
            "local_steps": {"uniform": [1, 10]},
        }
    )
    a, b = resolve_profiles(config, IDS, seed=0), resolve_profiles(config, IDS, seed=0)
    assert a == b
    c = resolve_profiles(config, IDS, seed=1)
    assert a != c
    latencies = [p.seconds_per_example for p in a.values()]
    assert len(set(latencies)) == len(IDS) and all(x > 0 for x in latencies)
    assert 0.02 < sorted(latencies)[len(latencies) // 2] < 0.12  # around the median
    assert all(5.0 <= p.download_mbps <= 50.0 for p in a.values())
    assert all(isinstance(p.local_steps, int) and 1 <= p.local_steps <= 10 for p in a.values())
    # a client's draw is named by its id: the same whatever else is in the population
    alone = resolve_profiles(config, ["site-03"], seed=0)
    assert alone["site-03"] == a["site-03"]
    fixed = resolve_profiles(
        clients({"seconds_per_example": {"lognormal": {"median": 0.2, "sigma": 0}}}), IDS, 0
    )
    assert all(p.seconds_per_example == pytest.approx(0.2) for p in fixed.values())


def test_a_profiles_local_steps_become_the_clients_local_work():
    spec = ParticipantSpec(0, LocalWork(epochs=2), None, WeightRule(), 8, 8)  # type: ignore[arg-type]
    assert spec_for(spec, ClientProfile("a")) is spec
    own = spec_for(spec, ClientProfile("a", local_steps=3))
    assert own.work == LocalWork(steps=3) and own.seed == spec.seed


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ("[{match='a', fraction=0.5}]", r"clients\.profiles\[0\]\.match = 'a' and fraction = 0\.5"),
        ("[{}, {availability=1.5}]", r"clients\.profiles\[1\]\.availability = 1\.5: .* at most 1"),
        ("[{upload_mbps=0}]", r"clients\.profiles\[0\]\.upload_mbps = 0: its values must be above 0"),
        (
            "[{download_mbps={uniform=[0, 2]}}]",
            r"clients\.profiles\[0\]\.download_mbps = \{ uniform = \[0, 2\] \}",
        ),
        ("[{availability={lognormal={median=0.5, sigma=1}}}]", r"clients\.profiles\[0\]\.availability"),
        ("[{local_steps=0}]", r"clients\.profiles\[0\]\.local_steps = 0"),
        ("[{local_steps=2.5}]", r"clients\.profiles\.0\.local_steps"),
        (
            "[{seconds_per_example={normal=1}}]",
            r"clients\.profiles\.0\.seconds_per_example = .*give a number",
        ),
        (
            "[{seconds_per_example={lognormal={median=-1, sigma=1}}}]",
            r"seconds_per_example\.lognormal\.median",
        ),
        ("[{seconds_per_example={uniform=[3, 1]}}]", r"seconds_per_example\.uniform = .*low <= high"),
        ("[{speed=1}]", r"clients\.profiles\.0\.speed: unknown key; allowed here: match, fraction"),
        ("[{fraction=0.6}, {fraction=0.6}]", r"clients\.profiles: the fractions add up to 1\.2"),
        (
            "[{rank=4}]",
            r"clients\.profiles\[0\]\.rank = 4 differs from lora\.rank = 8: .*'flexlora' or 'hetlora'",
        ),
    ],
)
def test_validation_names_the_field(setting, names):
    with pytest.raises(ConfigError, match=names):
        load_config(None, [f"clients.profiles={setting}"])


def test_a_profile_rank_equal_to_lora_rank_is_accepted_and_profiles_round_trip():
    config = load_config(
        None,
        [
            "lora.rank=4",
            "federation.round_deadline_s=30.0",
            "clients.profiles=[{match='phone-*', rank=4, upload_mbps={uniform=[1.0, 10.0]}}, "
            "{fraction=0.5, seconds_per_example={lognormal={median=0.05, sigma=0.5}}, local_steps=3}]",
        ],
    )
    assert load_config_text(to_toml(config)) == config
    assert config.clients.profiles[1].local_steps == 3


def test_deployment_refuses_the_simulated_clock():
    allow = "deploy.clients=['a', 'b', 'c', 'd']"
    with pytest.raises(ConfigError, match=r"federation\.round_deadline_s = 30 .*deploy\.round_timeout_s"):
        check(load_config(None, [allow, "federation.round_deadline_s=30"]), "deploy")
    with pytest.raises(
        ConfigError, match=r"clients\.profiles \(1 given\) .*remove \[\[clients\.profiles\]\]"
    ):
        check(load_config(None, [allow, "clients.profiles=[{availability=0.5}]"]), "deploy")
    config = load_config(
        None, [allow, "clients.profiles=[{availability=0.5}]", "federation.round_deadline_s=3"]
    )
    check(config, "simulate")  # both are the simulation's
    check(load_config(None, [allow]), "deploy")  # and without them a deployment is as before
