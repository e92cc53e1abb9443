"""The dashboard in a real headless browser (Debian's Chromium, driven by Playwright): the page of a
finished tiny run, a deployment in progress that updates when a round ends, and the token form.

Each test saves a screenshot in its tmp dir; with FEDTUNE_SCREENSHOT_DIR set they are copied there too
(`bench/results/dashboard.png` comes from `test_a_run_in_progress_updates_when_a_round_ends`). The tests
skip, saying why, only where no Chromium binary is installed (`make test` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from bench import chromium
from fedtune.dashboard import DashboardServer
from fedtune.store import Store
from tests.dashboard_fixtures import round_result

pytestmark = pytest.mark.skipif(chromium.BINARY is None, reason=chromium.MISSING)
TINY = [
    "model.name=tiny",
    "data.max_seq_len=32",
    "data.max_examples_per_client=24",
    "federation.num_clients=4",
    "federation.clients_per_round=2",
    "federation.rounds=2",
    "federation.local_steps=3",
    "train.lr=0.05",
    "lora.target_modules=['q_proj', 'v_proj', 'lm_head']",
    "eval.every=1",
]
UPDATE_MS = 8000  # the page polls every 2 s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = chromium.launch(pw)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("console", lambda msg: problems.append(msg.text) if _unexpected(msg.type, msg.text) else None)
    yield page
    context.close()
    assert problems == []  # no script error, no refused asset, no CSP violation


def _unexpected(kind: str, text: str) -> bool:
    return kind == "error" and "status of 401" not in text  # the token form's answer is expected


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from fedtune.config import load_config
    from fedtune.simulation import simulate

    out = tmp_path_factory.mktemp("finished") / "tiny"
    simulate(load_config(None, [*TINY, "run.name=tiny-pilot", f"run.dir={out}"]))
    return out


def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    keep = os.environ.get("FEDTUNE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def round_cells(page: Page) -> list[str]:
    return page.locator("#table-rounds tbody tr td:first-child").all_inner_texts()


def test_a_finished_tiny_run_shows_its_rounds(finished_run, page, tmp_path):
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    with DashboardServer(finished_run, port=0) as server:
        page.goto(server.url)
        page.wait_for_selector('body[data-state="finished"]', timeout=UPDATE_MS)
        assert page.locator("#title").inner_text() == "fedtune: tiny-pilot"
        assert round_cells(page) == ["2", "1", "0"]  # newest first
        first_eval = page.locator("#table-rounds tbody tr").last.locator("td").nth(5).inner_text()
        assert first_eval == f"{rows[0]['eval_loss']:.3f}"
        assert "2 of 2" in page.locator("#progress-facts").inner_text()
        for panel in ("loss", "time", "participation", "bytes", "clients"):
            assert page.locator(f"#panel-{panel}").is_visible(), panel
            if panel != "clients":
                assert page.locator(f"#chart-{panel} canvas").count() == 1
        for panel in ("privacy", "secagg", "attack", "open_round"):
            assert page.locator(f"#panel-{panel}").is_hidden(), panel
        clients = page.locator("#table-clients tbody tr").count()
        assert clients == len({c for r in rows for c in r.get("client_ids", [])}) >= 2
        screenshot(page, tmp_path, "dashboard-finished.png")


def test_a_run_in_progress_updates_when_a_round_ends(tmp_path, page):
    """A deployment under DP and secure aggregation as its server writes it: rows are appended (the last
    one half-written at first), and state.db holds the round in flight and a refused message."""
    run = tmp_path / "pilot"
    run.mkdir()
    (run / "config.toml").write_text(
        '[run]\nname = "pilot"\n[federation]\nrounds = 6\n[privacy]\nmode = "central"\n'
        "target_epsilon = 4.0\n[secure_aggregation]\nenabled = true\n"
    )
    sites = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    results = [
        round_result(0, ids=None, epsilon=0.0),
        round_result(1, ids=None, stragglers=("hospital-c",), epsilon=1.1, secagg=(4, 4, 3, 3)),
        round_result(
            2, ids=None, failures={"hospital-d": "update holds NaN"}, epsilon=1.6, secagg=(4, 3, 3, 3)
        ),
    ]
    lines = [json.dumps(r.to_row()) + "\n" for r in results]
    metrics = run / "metrics.jsonl"
    metrics.write_text(lines[0] + lines[1])
    with Store(run / "state.db") as store, DashboardServer(run, port=0) as server:
        store.start_run("")
        store.open_round(2, sites)
        store.set_participant(2, "hospital-a", "submitted")
        store.record_event(
            "refused_stale_round", "update for round 1 in round 2", round_num=2, client_id="hospital-b"
        )
        page.goto(server.url)
        page.wait_for_selector('body[data-latest-round="1"]', timeout=UPDATE_MS)
        assert page.locator("#badge").inner_text() == "running"
        assert "Round 2 in flight" in page.locator("#open-round-title").inner_text()
        assert "1 of 4 submitted" in page.locator("#open-round-title").inner_text()
        assert "update for round 1 in round 2" in page.locator("#table-refusals").inner_text()
        for panel in ("privacy", "secagg", "open_round", "refusals"):
            assert page.locator(f"#panel-{panel}").is_visible(), panel

        with metrics.open("a") as f:  # the server is writing round 2's row: half of it so far
            f.write(lines[2][:40])
        seen = page.locator("body").get_attribute("data-generated-at")
        page.wait_for_function(
            "(seen) => document.body.dataset.generatedAt !== seen", arg=seen, timeout=UPDATE_MS
        )
        assert page.locator("body").get_attribute("data-latest-round") == "1"

        store.finish_round(2, results[2].to_row(), None)  # the round ends: committed, then its row
        store.open_round(3, sites[:3])
        with metrics.open("a") as f:
            f.write(lines[2][40:])
        page.wait_for_selector('body[data-latest-round="2"]', timeout=UPDATE_MS)
        assert round_cells(page) == ["2", "1", "0"]
        assert "Round 3 in flight" in page.locator("#open-round-title").inner_text()
        assert "update holds NaN" in page.locator("#table-failures").inner_text()
        privacy = page.locator("#privacy-facts").inner_text()
        assert "1.6" in privacy and "4" in privacy and "40%" in privacy
        assert "not published under client-level DP" in page.locator("#notes").inner_text()
        page.wait_for_timeout(300)  # the charts' last frame
        screenshot(page, tmp_path, "dashboard.png")


def test_the_page_asks_for_the_token(tmp_path, page):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(round_result(0).to_row()) + "\n")
    with DashboardServer(tmp_path, port=0, token="let-me-in") as server:
        page.goto(server.url)
        page.wait_for_selector("#token-form:not([hidden])", timeout=UPDATE_MS)
        assert page.locator("#main").is_hidden()
        page.fill("#token", "wrong")
        page.click("#token-form button")
        page.wait_for_selector("#token-error:not([hidden])", timeout=UPDATE_MS)
        page.fill("#token", "let-me-in")
        page.click("#token-form button")
        page.wait_for_selector('body[data-latest-round="0"]', timeout=UPDATE_MS)
        assert page.locator("#token-form").is_hidden()
