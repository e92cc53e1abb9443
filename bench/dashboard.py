"""The dashboard with a long run: page load time and memory for a 1,000-round run directory.

The run directory is made here: 1,000 star rounds as the engine writes them (`RoundResult.to_row`), 10 of
200 clients a round with per-client eval losses, DP figures and secure-aggregation survivors, and a
config.toml. Measured, in one sitting, `--repeats` times each, medians reported:
- `/api/run`: the first request (reads and summarizes the whole metrics.jsonl) and later ones (the file
  already read: only new lines are parsed), seconds and response bytes;
- the page in headless Chromium (Debian's, driven by Playwright): from navigation until every round is in
  the rounds table and the charts are drawn (`body[data-latest-round="1000"]`), in a fresh browser context
  each time; the page's JS heap after loading (Chrome DevTools Protocol `Performance.getMetrics`);
- the serving process's resident memory (VmRSS): a process of its own that imports `fedtune.dashboard`
  alone, as `fedtune dashboard` does (no torch), after it starts and after the loads.

    .venv/bin/python bench/dashboard.py [--rounds 1000] [--repeats 5]

Writes bench/results/dashboard.json. Run it on a quiet machine (no test suite or other benchmark beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import chromium  # bench/chromium.py, beside this script

SERVE = """
import sys
from pathlib import Path
from fedtune.dashboard import DashboardServer
server = DashboardServer(Path(sys.argv[1]), port=0).start()
print(server.url, flush=True)
sys.stdin.read()  # until the parent closes it
server.stop()
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_run(run: Path, rounds: int, population: int = 200, cohort: int = 10) -> int:
    """A finished run's directory of `rounds` rounds; returns metrics.jsonl's size in bytes."""
    from fedtune.privacy.dpfedavg import PrivacyMetrics
    from fedtune.round.results import EvalSummary, RoundResult, SecAggMetrics

    run.mkdir(parents=True)
    (run / "config.toml").write_text(
        f'[run]\nname = "long-pilot"\n[federation]\nrounds = {rounds}\nnum_clients = {population}\n'
        '[privacy]\nmode = "central"\ntarget_epsilon = 8.0\n[secure_aggregation]\nenabled = true\n'
    )
    clients = [f"client-{i:03d}" for i in range(population)]
    lines = []
    for t in range(rounds + 1):
        ids = tuple(clients[(t * cohort + k) % population] for k in range(cohort)) if t else ()
        loss = 4.0 - 1.5 * t / rounds
        per_client = {c: loss + 0.01 * (i % 7) for i, c in enumerate(ids)}
        result = RoundResult(
            round_num=t,
            selected=0 if t == 0 else cohort,
            clients=len(ids),
            client_ids=ids,
            stragglers=(clients[t % population],) if t % 9 == 0 and t else (),
            failures={clients[t % population]: "update holds NaN"} if t % 50 == 0 and t else {},
            train_loss=None if t == 0 else loss + 0.05,
            eval=EvalSummary(loss, 2.718**loss, per_client, len(per_client), 0.2, 1000)
            if t % 10 == 0
            else None,
            bytes_up=0 if t == 0 else cohort * 3_686_400,
            bytes_down=0 if t == 0 else cohort * 3_686_400,
            refused_messages={"stale_round": 1} if t % 25 == 0 and t else {},
            seconds=12.0,
            train_seconds=10.0,
            privacy=PrivacyMetrics(8.0 * t / rounds, 16.0 * t / rounds, 1.0, 0.5, None),
            secagg=None
            if t == 0
            else SecAggMetrics((cohort, cohort, cohort - 1, cohort - 1), 4, 3, 0, 0, 1e5, 2e5, 0.1, None),
        )
        lines.append(json.dumps(result.to_row()) + "\n")
    (run / "metrics.jsonl").write_text("".join(lines))
    return (run / "metrics.jsonl").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    if chromium.BINARY is None:
        raise SystemExit(chromium.MISSING)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "long"
        size = write_run(run, args.rounds)
        api_first, api_later, page_s, heap_mib, rss_start, rss_end = [], [], [], [], [], []
        body = b""
        with sync_playwright() as pw:
            browser = chromium.launch(pw)
            for _ in range(args.repeats):  # a fresh server each time: its first read is cold
                server = subprocess.Popen(
                    [sys.executable, "-c", SERVE, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
                assert server.stdout is not None and server.stdin is not None
                url = server.stdout.readline().decode().strip()
                rss_start.append(rss_mib(server.pid))
                for k in range(6):
                    started = time.perf_counter()
                    with urllib.request.urlopen(url + "api/run") as reply:
                        body = reply.read()
                    (api_first if k == 0 else api_later).append(time.perf_counter() - started)
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                started = time.perf_counter()
                page.goto(url)
                page.wait_for_selector(f'body[data-latest-round="{args.rounds}"]', timeout=60_000)
                page_s.append(time.perf_counter() - started)
                cdp = context.new_cdp_session(page)
                cdp.send("Performance.enable")
                metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
                heap_mib.append(metrics["JSHeapUsedSize"] / 2**20)
                context.close()
                rss_end.append(rss_mib(server.pid))
                server.stdin.close()
                server.wait(timeout=30)
            browser.close()
    out = {
        "rounds": args.rounds,
        "metrics_jsonl_bytes": size,
        "api_response_bytes": len(body),
        "api_first_s_median": statistics.median(api_first),
        "api_later_s_median": statistics.median(api_later),
        "page_load_s_median": statistics.median(page_s),
        "page_load_s": page_s,
        "page_js_heap_mib_median": statistics.median(heap_mib),
        "server_rss_mib_started_median": statistics.median(rss_start),
        "server_rss_mib_after_loads_median": statistics.median(rss_end),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
    }
    path = Path("bench/results/dashboard.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
