"""Config: defaults, overrides, round trip, and one clear line per bad value."""

import tomllib
from pathlib import Path

import pytest

from fedtune.config import Config, load_config, to_toml, validate
from fedtune.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(None, ["federation.rounds=3", "lora.target_modules=['q_proj']"])
    assert cfg.federation.rounds == 3
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.model.name == "smollm2-135m"
    assert cfg.run.resolved_dir == Path("runs/default")
    assert load_config(None, ["run.dir=/tmp/x"]).run.resolved_dir == Path("/tmp/x")


def test_resolved_config_round_trips():
    cfg = load_config(None, ["data.partition='dirichlet'", "data.source=x.csv", "eval.max_clients=3"])
    assert validate(tomllib.loads(to_toml(cfg))) == cfg


def test_file_plus_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[run]\nname = "exp"\n[federation]\nrounds = 9\n')
    cfg = load_config(path, ["federation.rounds=2"])
    assert (cfg.run.name, cfg.federation.rounds) == ("exp", 2)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["federation.rounds=0"],
            "federation.rounds = 0: input should be greater than or equal to 1",
        ),
        (["lora.rank=-4"], "lora.rank = -4"),
        (["federation.roundz=3"], "federation.roundz: unknown key; allowed here: rounds"),
        (["nosuch.key=1"], "nosuch: unknown key; allowed here: run, model"),
        (["lora.rank=abc"], "lora.rank = 'abc'"),
        (["data.source=mine.jsonl"], "needs data.client_field"),
        (["federation.clients_per_round=50"], "exceeds federation.num_clients = 16"),
        (["data.partition='iid'", "federation.num_clients='all'"], "needs a number of clients"),
        (["rounds=3"], "expected section.key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_config_is_frozen():
    with pytest.raises(Exception, match="frozen"):
        Config().federation.rounds = 5  # type: ignore[misc]


def test_a_moved_key_says_where_it_went():
    with pytest.raises(ConfigError, match=r"deploy\.min_clients has moved: set federation\.min_clients"):
        load_config(None, ["deploy.min_clients=2"])


def test_each_mode_refuses_what_it_cannot_honour():
    from fedtune.config import check

    dropouts = load_config(
        None, ["secure_aggregation.dropout_rate=0.1", "deploy.clients=['a', 'b', 'c', 'd']"]
    )
    assert check(dropouts, "simulate") == []  # simulated dropouts are the simulation's
    with pytest.raises(ConfigError, match="clients drop by themselves"):
        check(dropouts, "deploy")
    fraction = load_config(None, ["federation.fraction_per_round=0.5", "deploy.clients=['a', 'b']"])
    with pytest.raises(ConfigError, match="fraction_per_round is for simulation"):
        check(fraction, "deploy")
    with pytest.raises(ConfigError, match=r"deploy\.clients is empty"):
        check(load_config(None, []), "deploy")
    with pytest.raises(ConfigError, match=r"federation\.min_clients = 5 exceeds the 4"):
        load_config(None, ["federation.min_clients=5"])


def test_a_folder_source_is_a_natural_split_by_file(tmp_path):
    (tmp_path / "sites").mkdir()
    assert load_config(None, [f"data.source='{tmp_path / 'sites'}'"]).data.partition == "natural"
    with pytest.raises(ConfigError, match=r"needs data\.client_field"):
        load_config(None, [f"data.source='{tmp_path / 'one.jsonl'}'"])
