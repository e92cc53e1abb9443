"""Deployment cost, measured over loopback gRPC with mutual TLS (issue 5; results go to bench/RESULTS.md by
hand, with the machine).

1. Round overhead: one round of 50 clients on the tiny model, deployed (`serve` in a thread, 50
   `run_client` threads, each with its own certificate and JSONL file, all in this process) against the
   same round in simulation (one JSONL file holding the 50 sites' texts, `data.client_field = client`).
   Same config, same local steps, same evaluation work (the round engine's: after the last round every
   client evaluates the new global adapter on its held-out split, in both modes). Round 2 is compared,
   round 1 being the warm-up. Alternated `--repeats` times; the ratio uses the fastest of each side.
   `run.threads = 1` on both sides by default (`--torch-threads`). Reported next to the walls: the
   process CPU time of round 2 on each side, the simulation's train and eval seconds, and on the deployed
   side the time outside client work (round opened -> first participant's training, last one done ->
   round closed: the transport on the critical path, timed by wrapping those methods in this process only).
2. Throughput: a server (`serve` in a child process) whose adapter is LoRA rank 51 on the tiny model's
   lm_head (2,510,016 float32 values, 10.04 MB); raw-protocol clients (join, GetTask, SubmitUpdate of a
   random float32 delta, no model) time each download and upload alone (a lock serializes them).
3. Server peak memory vs clients: the same server for N clients that all download and upload at once
   (FedAvg, 2 rounds). The child resets its peak RSS (`/proc/self/clear_refs`) once it serves, so
   peak - baseline is what the rounds cost, compared with N x the update size.
FedAvg in the clear only: secure aggregation over the network needs clients that run the SecAgg+ key
stages, which these raw clients do not.

    .venv/bin/python bench/deploy.py            # all three parts (several minutes)
    .venv/bin/python bench/deploy.py --quick    # small sizes: a smoke check

Writes bench/out/deploy.json (or --out) with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THROUGHPUT_LORA = ("lora.target_modules=['lm_head']", "lora.rank=51")  # 51 x (64 + 49,152) values
ALLOCATORS = {"glibc default": {}, "mmap threshold 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def machine() -> dict[str, Any]:
    import grpc
    import torch

    model = platform.processor()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "commit": source_version(),
    }


def source_version() -> str:
    """The commit measured, marked when src/ has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted src/ changes" if git("status", "--porcelain", "src") else "")


def cpu_seconds() -> float:
    """This process's CPU time, all threads, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def vm_kib(field_name: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field_name + ":")))


# ---- set-up: certificates, site files, configs -----------------------------------------------------------


def site_ids(n: int) -> list[str]:
    return [f"site-{i:03d}" for i in range(n)]


def make_certs(root: Path, sites: list[str]) -> Path:
    from fedtune.pki import init_ca, issue_client

    certs = root / "certs"
    init_ca(certs)
    for site in sites:
        issue_client(certs, site)
    return certs


def make_site_data(root: Path, sites: list[str], examples: int) -> tuple[dict[str, Path], Path]:
    """One JSONL file per site, and one file with every site's texts and a client column."""
    paths, combined = {}, []
    for k, site in enumerate(sites):
        rows = [
            {"client": site, "text": f"{site} says line {i}: to be or not to be, {k * 7 + i}"}
            for i in range(examples)
        ]
        paths[site] = root / f"{site}.jsonl"
        paths[site].write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
        combined += rows
    all_path = root / "all-sites.jsonl"
    all_path.write_text("".join(json.dumps(r) + "\n" for r in combined))
    return paths, all_path


def make_config(root: Path, run_name: str, certs: Path, sites: list[str], *overrides: str) -> Any:
    from fedtune.config import load_config

    return load_config(
        None,
        [
            "model.name=tiny",
            f"run.dir='{root / run_name}'",
            "federation.rounds=2",
            f"federation.num_clients={len(sites)}",
            f"federation.clients_per_round={len(sites)}",
            f"deploy.clients={json.dumps(sites)}",
            "deploy.address='127.0.0.1:0'",
            f"deploy.certs='{certs / 'server'}'",
            "deploy.round_timeout_s=600",
            "deploy.wait_for_clients_s=600",
            *overrides,
        ],
    )


# ---- 1. one round deployed vs simulated ------------------------------------------------------------------


@dataclass
class RoundMarks:
    """(wall, process CPU) when each round finished, and the rows."""

    marks: list[tuple[float, float]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def finished(self, result: Any) -> None:
        row = result.to_row()
        if row["round"] >= 1:
            self.marks.append((time.perf_counter(), cpu_seconds()))
            self.rows.append(row)

    def round2(self) -> dict[str, Any]:
        """Round 2's own seconds and the CPU and wall between the ends of rounds 1 and 2."""
        (w1, c1), (w2, c2) = self.marks[0], self.marks[1]
        row = self.rows[1]
        return {
            "seconds": row["seconds"],
            "window_wall_s": w2 - w1,
            "window_cpu_s": c2 - c1,
            "train_seconds": row.get("train_seconds"),
            "eval_seconds": row.get("eval_seconds"),
            "clients": row["clients"],
            "bytes_up": row["bytes_up"],
        }


def simulated_round(config: Any) -> dict[str, Any]:
    from fedtune.simulation import Silent, simulate

    marks = RoundMarks()

    class Marker(Silent):
        def round_finished(self, result: Any) -> None:
            marks.finished(result)

    simulate(config, Marker())
    return marks.round2()


@contextmanager
def serving_thread(config: Any, on_round: Any) -> Iterator[str]:
    """`serve` in a thread of this process; yields its target (host:port)."""
    from fedtune.deploy.server import serve

    port: list[int] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            serve(config, stop=stop, bound_port=port, on_round=on_round)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while not port and not failure:
        time.sleep(0.02)
    if failure:
        raise failure[0]
    try:
        yield f"localhost:{port[0]}"
        thread.join()
    finally:
        stop.set()
        thread.join(timeout=30)
    if failure:
        raise failure[0]


@contextmanager
def timeline() -> Iterator[dict[str, Any]]:
    """When the server opens and closes each training round and when each participant trains (train,
    encode): the methods are wrapped for the duration (this benchmark only) and restored."""
    from fedtune.round.messages import TrainRequest
    from fedtune.round.participant import Participant
    from fedtune.round.transport import Purpose
    from fedtune.transport.coordinator import Coordinator

    events: dict[str, Any] = {"open": {}, "close": {}, "work": [], "waits": []}
    targets = [
        (Coordinator, "open_round"),
        (Coordinator, "close_round"),
        (Coordinator, "next_task"),
        (Participant, "respond"),
    ]
    saved = [getattr(owner, name) for owner, name in targets]
    open_round, close_round, next_task, respond = saved

    def timed_open(self: Any, round_num: int, purpose: Any, *args: Any, **kwargs: Any) -> None:
        if purpose == Purpose.TRAIN:
            events["open"][round_num] = time.perf_counter()
        open_round(self, round_num, purpose, *args, **kwargs)

    def timed_close(self: Any, *args: Any, **kwargs: Any) -> Any:
        current = self._round
        refused = close_round(self, *args, **kwargs)
        if current is not None and current.purpose == Purpose.TRAIN:
            events["close"][current.round_num] = time.perf_counter()
        return refused

    def timed_next_task(self: Any, session: Any) -> Any:
        found = next_task(self, session)
        if found is None:
            events["waits"].append(time.perf_counter())
        return found

    def timed_respond(self: Any, message: Any) -> Any:
        started = time.perf_counter()
        try:
            return respond(self, message)
        finally:
            if isinstance(message, TrainRequest):
                events["work"].append((message.task.round_num, started, time.perf_counter()))

    wrappers = (timed_open, timed_close, timed_next_task, timed_respond)
    for (owner, name), wrapped in zip(targets, wrappers, strict=True):
        setattr(owner, name, wrapped)
    try:
        yield events
    finally:
        for (owner, name), original in zip(targets, saved, strict=True):
            setattr(owner, name, original)


def critical_path(events: dict[str, Any], round_num: int) -> dict[str, float]:
    """A deployed round cut at the first client's start and the last client's end of local work."""
    spans = [(start, end) for r, start, end in events["work"] if r == round_num]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    opened, closed = events["open"][round_num], events["close"][round_num]
    return {
        "wait_replies": sum(opened <= t <= closed for t in events["waits"]),
        "open_to_first_work_s": first - opened,
        "work_span_s": last - first,
        "last_work_to_close_s": closed - last,
        "mean_client_work_s": statistics.mean(e - s for s, e in spans),
    }


def deployed_round(config: Any, certs: Path, paths: dict[str, Path]) -> dict[str, Any]:
    from fedtune.deploy.site import run_client

    marks = RoundMarks()
    results: dict[str, Any] = {}
    with timeline() as events, serving_thread(config, marks.finished) as target:

        def client(site: str) -> None:
            try:
                results[site] = run_client(
                    target, paths[site], certs=certs / "clients" / site, give_up_after_s=60
                )
            except Exception as exc:  # reported below
                results[site] = exc

        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in paths]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = {s: r for s, r in results.items() if isinstance(r, Exception)}
        if failed:
            raise RuntimeError(f"{len(failed)} clients failed, e.g. {next(iter(failed.items()))}")
    return marks.round2() | critical_path(events, 2)


def round_overhead(
    root: Path, clients: int, steps: int, examples: int, poll_s: float, threads: int, repeats: int
) -> dict:
    sites = site_ids(clients)
    certs = make_certs(root, sites)
    paths, all_sites = make_site_data(root, sites, examples)
    common = (
        f"federation.local_steps={steps}",
        f"data.source='{all_sites}'",
        "data.client_field=client",
        f"deploy.poll_interval_s={poll_s}",
        f"run.threads={threads}",
    )
    sim, dep = [], []
    for r in range(repeats):
        for side in ("sim", "dep") if r % 2 == 0 else ("dep", "sim"):
            config = make_config(root, f"round-{side}-{r}", certs, sites, *common)
            if side == "sim":
                sim.append(simulated_round(config))
                m = sim[-1]
            else:
                dep.append(deployed_round(config, certs, paths))
                m = dep[-1]
            print(
                f"  repeat {r}: {side} round 2 {m['seconds']:.2f}s, CPU {m['window_cpu_s']:.2f}s "
                f"({m['clients']} updates)",
                flush=True,
            )
    best_sim = min(sim, key=lambda m: m["seconds"])
    best_dep = min(dep, key=lambda m: m["seconds"])
    return {
        "clients": clients,
        "local_steps": steps,
        "examples_per_site": examples,
        "poll_interval_s": poll_s,
        "torch_threads": threads,
        "simulated": sim,
        "deployed": dep,
        "ratio": best_dep["seconds"] / best_sim["seconds"],
        "cpu_ratio": min(m["window_cpu_s"] for m in dep) / min(m["window_cpu_s"] for m in sim),
    }


# ---- 2 and 3. a server in a child process, raw-protocol clients ------------------------------------------


def server_child(config_path: str) -> None:
    """Runs in a fresh process: serve the config, report the port and baseline, then the peak."""
    from fedtune.config import load_config
    from fedtune.deploy.server import serve

    config = load_config(Path(config_path))
    port: list[int] = []
    done: dict[str, Any] = {}

    def target() -> None:
        try:
            done["rows"] = [r.to_row() for r in serve(config, bound_port=port).rounds]
        except BaseException as exc:
            done["error"] = repr(exc)

    thread = threading.Thread(target=target)
    thread.start()
    while not port and not done:
        time.sleep(0.01)
    if port:
        time.sleep(0.5)  # let the server settle (thread pool, TLS context)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        cpu0 = cpu_seconds()
        print(json.dumps({"port": port[0], "baseline_rss_kib": vm_kib("VmRSS")}), flush=True)
    thread.join()
    print(
        json.dumps(
            {
                "peak_rss_kib": vm_kib("VmHWM"),
                "final_rss_kib": vm_kib("VmRSS"),
                "serving_cpu_s": cpu_seconds() - cpu0 if port else None,
                **done,
            }
        ),
        flush=True,
    )


@contextmanager
def server_process(
    root: Path, config: Any, env: dict[str, str] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The server in a child process (`env` added to its environment); yields (target, report), the
    report filled in when it exits."""
    from fedtune.config import to_toml

    config_path = root / f"{config.run.resolved_dir.name}.toml"
    config_path.write_text(to_toml(config))
    log_path = config_path.with_suffix(".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--server-child", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **(env or {})},
        )
    assert proc.stdout is not None
    report: dict[str, Any] = {}
    try:
        first = json.loads(proc.stdout.readline() or "{}")
        if "port" not in first:
            raise RuntimeError(f"the server did not start: {first}; see {log_path}")
        report.update(first)
        yield f"localhost:{first['port']}", report
        report.update(json.loads(proc.stdout.readline() or "{}"))
        proc.wait(timeout=120)
        if "error" in report or "peak_rss_kib" not in report:
            raise RuntimeError(f"the server failed: {report.get('error')}; see {log_path}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Transfer:
    direction: str  # "down" (GetTask with the adapter) or "up" (SubmitUpdate)
    round_num: int
    nbytes: int
    seconds: float


def raw_client(
    target: str, certs: Path, numel: int, chunk_bytes: int, serial: threading.Lock | None, out: list[Transfer]
) -> None:
    """Join, then until Done: fetch the task and submit a random float32 delta of the adapter's size."""
    import grpc
    import numpy as np

    from fedtune.pki import common_name, load_identity
    from fedtune.transport import fedtune_v2_pb2 as pb
    from fedtune.transport.channel import Stub, open_channel
    from fedtune.transport.site_driver import CALL_TIMEOUT_S, get_task, join, update_stream
    from fedtune.transport.wire import float32_bytes

    client_id = common_name(load_identity(certs).cert_pem)
    channel = open_channel(target, certs)
    stub = Stub(channel)
    rng = np.random.default_rng(list(client_id.encode()))
    session = join(stub, client_id, 0).session
    guard = serial or nullcontext()
    try:
        while True:
            with guard:
                t = time.perf_counter()
                found = get_task(stub, session, numel)
                seconds = time.perf_counter() - t
            if isinstance(found, pb.Done):
                return
            if isinstance(found, pb.Wait):
                time.sleep(found.retry_after_ms / 1000)
                continue
            task, _global_flat = found
            out.append(Transfer("down", int(task.round), numel * 4, seconds))
            if task.kind == pb.TASK_EVALUATE:  # the engine's evaluation rounds: report a loss, no data
                report = pb.UpdateHeader(
                    session=session,
                    round=task.round,
                    nonce=task.nonce,
                    encoding=pb.ENCODING_EVALUATION,
                    eval_nll=1.0,
                    eval_tokens=1,
                )
                stub.submit(update_stream(report, b"", chunk_bytes), timeout=CALL_TIMEOUT_S)
                continue
            payload = float32_bytes(rng.standard_normal(numel, dtype=np.float32) * 1e-3)
            header = pb.UpdateHeader(
                session=session,
                round=task.round,
                nonce=task.nonce,
                encoding=pb.ENCODING_FLOAT32,
                total_bytes=len(payload),
                num_examples=1,
                num_steps=1,
            )
            with guard:
                t = time.perf_counter()
                reply = pb.SubmitReply.FromString(
                    stub.submit(update_stream(header, payload, chunk_bytes), timeout=CALL_TIMEOUT_S)
                )
                seconds = time.perf_counter() - t
            if not reply.accepted:
                raise RuntimeError(f"{client_id}: round {task.round}: {reply.detail}")
            out.append(Transfer("up", int(task.round), len(payload), seconds))
    except grpc.RpcError as exc:
        raise RuntimeError(f"{client_id}: {exc.code().name}: {exc.details()}") from None
    finally:
        channel.close()


def raw_round_trip(
    root: Path, name: str, clients: int, rounds: int, serial: bool, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """A child-process server with the ~10 MB adapter and `clients` raw clients in threads."""
    sites = site_ids(clients)
    certs = root / "certs"
    config = make_config(
        root,
        name,
        certs,
        sites,
        *THROUGHPUT_LORA,
        f"federation.rounds={rounds}",
        "deploy.poll_interval_s=0.1",
    )
    numel = 51 * (64 + 49_152)
    transfers: list[Transfer] = []
    errors: list[Exception] = []
    lock = threading.Lock() if serial else None
    started = time.perf_counter()
    with server_process(root, config, env) as (target, report):

        def client(site: str) -> None:
            try:
                raw_client(
                    target, certs / "clients" / site, numel, config.deploy.chunk_kib * 1024, lock, transfers
                )
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in sites]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    rows = report.get("rows", [])
    return {
        "clients": clients,
        "rounds": rounds,
        "adapter_numel": numel,
        "update_bytes": numel * 4,
        "transfers": [t.__dict__ for t in transfers],
        "round_seconds": [r["seconds"] for r in rows],
        "round_clients": [r["clients"] for r in rows],
        "baseline_rss_mib": report["baseline_rss_kib"] / 1024,
        "peak_rss_mib": report["peak_rss_kib"] / 1024,
        "final_rss_mib": report["final_rss_kib"] / 1024,
        "server_cpu_s": report["serving_cpu_s"],
        "wall_s": time.perf_counter() - started,
    }


def throughput(root: Path, clients: int, rounds: int) -> dict[str, Any]:
    run = raw_round_trip(root, "throughput", clients, rounds, serial=True)
    for direction in ("down", "up"):
        rates = [t["nbytes"] / t["seconds"] / 1e6 for t in run["transfers"] if t["direction"] == direction]
        run[f"{direction}_mb_s"] = {
            "n": len(rates),
            "median": statistics.median(rates),
            "best": max(rates),
            "worst": min(rates),
        }
    return run


def memory(root: Path, sizes: list[int]) -> list[dict[str, Any]]:
    """Each size twice: glibc as it comes, then with the mmap threshold pinned at its initial 128 KiB, so
    that freed update-sized buffers go back to the OS (the difference is memory the allocator keeps)."""
    out = []
    for n in sizes:
        for allocator, env in ALLOCATORS.items():
            run = raw_round_trip(root, f"memory-{n}-{len(out)}", n, 2, serial=False, env=env)
            run["allocator"] = allocator
            run["growth_mib"] = run["peak_rss_mib"] - run["baseline_rss_mib"]
            run["n_updates_mib"] = n * run["update_bytes"] / 2**20
            del run["transfers"]
            out.append(run)
            print(
                f"  {n:>4} clients, {allocator}: baseline {run['baseline_rss_mib']:.0f} MiB, "
                f"peak {run['peak_rss_mib']:.0f} MiB "
                f"(+{run['growth_mib']:.0f}; N x update = {run['n_updates_mib']:.0f} MiB), "
                f"rounds {', '.join(f'{s:.1f}s' for s in run['round_seconds'])}",
                flush=True,
            )
    return out


# ---- report ----------------------------------------------------------------------------------------------


def tables(report: dict[str, Any]) -> str:
    lines = []
    if "round" in report:
        o = report["round"]
        lines += [
            f"\n{o['clients']} clients, tiny model, {o['local_steps']} local steps, round 2 "
            f"(deploy.poll_interval_s = {o['poll_interval_s']}, run.threads = {o['torch_threads']}). "
            "Client work = evaluate + train + encode: "
            "one after another in simulation, the first start to the last end when deployed (clients in "
            "parallel threads); outside = the rest of the round's wall time.\n",
            "| side | repeat | round 2 wall (s) | process CPU (s) | client work (s) "
            "| outside client work (s) | mean work per client (s) | polls answered Wait |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r, m in enumerate(o["simulated"]):
            work = m["train_seconds"] + (m["eval_seconds"] or 0.0)
            lines.append(
                f"| simulated | {r + 1} | {m['seconds']:.2f} | {m['window_cpu_s']:.2f} | {work:.2f} "
                f"| {m['seconds'] - work:.2f} | {work / o['clients']:.3f} | – |"
            )
        for r, m in enumerate(o["deployed"]):
            lines.append(
                f"| deployed (mTLS loopback) | {r + 1} | {m['seconds']:.2f} | {m['window_cpu_s']:.2f} "
                f"| {m['work_span_s']:.2f} | {m['seconds'] - m['work_span_s']:.2f} "
                f"(to first work {m['open_to_first_work_s']:.2f}, "
                f"after last {m['last_work_to_close_s']:.2f}) "
                f"| {m['mean_client_work_s']:.3f} | {m['wait_replies']} |"
            )
        lines.append(
            f"\noverhead ratio deployed / simulated (fastest of each): **{o['ratio']:.2f}** wall, "
            f"{o['cpu_ratio']:.2f} CPU"
        )
    if "throughput" in report:
        t = report["throughput"]
        lines += [
            f"\nThroughput, one transfer at a time, update = {t['update_bytes']:,} B "
            f"({t['adapter_numel']:,} float32):\n",
            "| direction | transfers | median MB/s | best MB/s | worst MB/s |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for direction, label in (("down", "download (GetTask + adapter)"), ("up", "upload (SubmitUpdate)")):
            d = t[f"{direction}_mb_s"]
            lines.append(f"| {label} | {d['n']} | {d['median']:.0f} | {d['best']:.0f} | {d['worst']:.0f} |")
    if "memory" in report:
        lines += [
            "\nServer peak RSS, FedAvg in the clear (secure aggregation not measured), all clients "
            "download and upload at once:\n",
            "| clients | server allocator | baseline RSS (MiB) | peak RSS (MiB) | peak - baseline (MiB) "
            "| N x update (MiB) | round 1 (s) | round 2 (s) | server CPU (s) |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for m in report["memory"]:
            rs = m["round_seconds"] + [float("nan")] * 2
            lines.append(
                f"| {m['clients']} | {m['allocator']} | {m['baseline_rss_mib']:.0f} "
                f"| {m['peak_rss_mib']:.0f} "
                f"| {m['growth_mib']:.0f} | {m['n_updates_mib']:.0f} | {rs[0]:.1f} | {rs[1]:.1f} "
                f"| {m['server_cpu_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    parser.add_argument("--clients", type=int, default=50, help="part 1: clients in the round")
    parser.add_argument("--steps", type=int, default=4, help="part 1: local steps per client")
    parser.add_argument("--examples", type=int, default=24, help="part 1: texts per site")
    parser.add_argument("--poll-interval", type=float, default=0.1, help="part 1: deploy.poll_interval_s")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1, help="part 1: run.threads (both sides)")
    parser.add_argument("--sizes", default="10,50,100", help="part 3: numbers of clients")
    parser.add_argument("--parts", default="round,throughput,memory")
    parser.add_argument("--out", default="bench/out/deploy.json")
    parser.add_argument("--server-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.server_child is not None:
        server_child(args.server_child)
        return
    if args.quick:
        args.clients, args.steps, args.repeats, args.sizes = 4, 2, 1, "2,4"
    parts = args.parts.split(",")
    sizes = [int(x) for x in args.sizes.split(",")]
    report: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-deploy-") as tmp:
        root = Path(tmp)
        if "round" in parts:
            print(f"1. one round, {args.clients} clients: deployed vs simulated", flush=True)
            report["round"] = round_overhead(
                root / "round",
                args.clients,
                args.steps,
                args.examples,
                args.poll_interval,
                args.torch_threads,
                args.repeats,
            )
        if "throughput" in parts or "memory" in parts:
            raw_root = root / "raw"
            raw_root.mkdir()
            make_certs(raw_root, site_ids(max([2, *sizes])))
            if "throughput" in parts:
                print("2. throughput of a 10 MB update", flush=True)
                report["throughput"] = throughput(raw_root, 2, 2 if args.quick else 5)
            if "memory" in parts:
                print(f"3. server peak RSS for {sizes} clients", flush=True)
                report["memory"] = memory(raw_root, sizes)
    report["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(tables(report))
    print(f"\nload average at end: {report['load_average_at_end']}; written to {out}")


if __name__ == "__main__":
    main()
