"""The `fedtune` command line: parse, build a config, call one function. Nothing runs at import."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.transport.handshake_log import HandshakeLogTap

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)
certs_app = typer.Typer(no_args_is_help=True, help="A private CA and per-client certificates for mutual TLS.")
app.add_typer(certs_app, name="certs")

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: --set federation.rounds=3 (repeatable)."),
]
ConfigArg = Annotated[Path | None, typer.Argument(help="A TOML config file; defaults are used without one.")]
CertsDirOption = Annotated[Path, typer.Option("--dir", help="Folder with the CA and each party's folder.")]
DaysOption = Annotated[int, typer.Option(min=1, help="How many days the certificates stay valid.")]


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # peft still calls a transformers API that warns of its own deprecation on every LoRA attach
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@app.command()
def run(config: ConfigArg = None, set_: SetOption = None) -> None:
    """Run one federated fine-tuning job in simulation and write runs/<name>/."""
    from fedtune.config import load_config

    cfg = load_config(config, set_ or [])  # a bad config stops here, before torch's libraries load
    _quiet_libraries()
    if cfg.federation.topology == "decentralized":
        _run_decentralized(cfg)
        return
    from fedtune.progress import RichObserver
    from fedtune.simulation import simulate

    with RichObserver(console) as observer:
        result = simulate(cfg, observer, notify=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    change = (result.after.perplexity / result.before.perplexity - 1) * 100
    console.print(
        f"[bold green]done[/] in {result.seconds:.0f}s: eval perplexity "
        f"{result.before.perplexity:.2f} -> {result.after.perplexity:.2f} ({change:+.1f}%)"
    )
    personal = result.after.personal
    if personal is not None:
        own = (personal.perplexity / result.before.perplexity - 1) * 100
        console.print(
            f"personal adapters ({cfg.personalize.method}): eval perplexity {personal.perplexity:.2f} "
            f"({own:+.1f}% against the base), in {result.run_dir / 'personal'}"
        )
    console.print(f"adapter: {result.run_dir / 'adapter'}   report: {result.run_dir / 'report.md'}")


def _run_decentralized(cfg: Config) -> None:
    from fedtune.decentral import run_decentralized
    from fedtune.decentral.results import round_line
    from fedtune.progress import RichObserver

    rounds = cfg.federation.rounds
    with RichObserver(console) as observer:
        result = run_decentralized(
            cfg,
            observer,
            notify=lambda msg: console.print(f"[dim]{escape(msg)}[/dim]"),
            on_round=lambda r: console.print(round_line(r, rounds), highlight=False, markup=False),
        )
    console.print("\n".join(result.lines()), highlight=False, markup=False)


@app.command("compare")
def compare_arms(
    config: ConfigArg = None,
    set_: SetOption = None,
    seeds: Annotated[int, typer.Option(min=1, help="Repetitions, run.seed upward.")] = 3,
) -> None:
    """Does federation pay off? Base, local-only, centralized, federated (and personalized) on the same
    clients, for several seeds, with a verdict; writes runs/<name>/compare/."""
    from fedtune.config import load_config

    cfg = load_config(config, set_ or [])
    _quiet_libraries()
    from fedtune.compare.runner import compare
    from fedtune.progress import RichObserver

    def notify(message: str) -> None:
        console.print(f"[dim]{escape(message)}[/dim]")

    with RichObserver(console) as observer:
        outcome = compare(cfg, seeds, notify=notify, observer=observer)
    console.print("\n".join(outcome.lines), highlight=False, markup=False)
    console.print(f"report: {outcome.folder / 'report.md'}")


@app.command("audit")
def audit(config: ConfigArg = None, set_: SetOption = None) -> None:
    """Empirical privacy: run the simulation with [audit]'s canaries planted, and put the epsilon lower
    bound they give next to the accountant's; writes runs/<name>/ with audit.json."""
    from fedtune.config import load_config

    cfg = load_config(config, ["audit.enabled=true", *(set_ or [])])
    _quiet_libraries()
    from fedtune.progress import RichObserver
    from fedtune.simulation import simulate

    with RichObserver(console) as observer:
        result = simulate(cfg, observer, notify=lambda msg: console.print(f"[dim]{escape(msg)}[/dim]"))
    a = result.audit
    if a is None:  # audit.enabled is set above
        raise FedtuneError("the run ended without an audit")
    w = a.white_box
    accounted = "privacy off" if a.accounted_epsilon is None else f"{a.accounted_epsilon:.3g}"
    lines = [
        f"epsilon lower bound {w.epsilon:.3f} at {w.confidence:.0%} confidence, delta {a.delta:.3g} "
        f"(delta 0: {a.pure_epsilon:.3f}); accountant: {accounted}",
        f"{w.canaries} canaries, {w.included} included; {w.guesses} guessed included, {w.correct} correctly",
    ]
    if a.exposures is not None and (a.exposures.inserted or a.exposures.controls):
        e = a.exposures
        mean = [f"{sum(v) / len(v):.2f}" if v else "-" for v in (e.inserted, e.controls)]
        lines.append(
            f"canary text exposure (of {e.max_possible:.2f} bits): inserted {mean[0]} mean, "
            f"not inserted {mean[1]} mean"
        )
    if a.exceeds_accountant:
        lines.append("the lower bound EXCEEDS the accounted epsilon: the DP code or its accounting is wrong")
    console.print("\n".join(lines), highlight=False, markup=False)
    console.print(f"audit: {result.run_dir / 'audit.json'}   report: {result.run_dir / 'report.md'}")
    if a.exceeds_accountant:
        raise typer.Exit(1)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    adapter: Annotated[Path, typer.Option(help="An adapter directory, e.g. runs/default/adapter.")] = Path(
        "runs/default/adapter"
    ),
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 60,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding.")] = 0.8,
    seed: int = 0,
    compare: Annotated[bool, typer.Option(help="Also show the base model's continuation.")] = False,
) -> None:
    """Continue PROMPT with the base model plus a trained adapter."""
    from fedtune.generate import base_dir_of
    from fedtune.generate import generate as run_generate

    _quiet_libraries()
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    if compare:
        base = run_generate(None, prompt, base_dir=base_dir_of(adapter), **options)
        console.print(f"[bold]base model:[/]\n{prompt}{base}\n")
        console.print("[bold]with adapter:[/]")
    console.print(f"{prompt}{run_generate(adapter, prompt, **options)}")


@app.command("config")
def show_config(config: ConfigArg = None, set_: SetOption = None) -> None:
    """Print the resolved config (defaults, file and overrides) as TOML."""
    from fedtune.config import load_config, to_toml

    console.print(to_toml(load_config(config, set_ or [])), markup=False, highlight=False)


@certs_app.command("init")
def certs_init(
    certs_dir: CertsDirOption = Path("certs"),
    server_name: Annotated[
        list[str] | None,
        typer.Option("--server-name", help="A DNS name clients use to reach the server (repeatable)."),
    ] = None,
    server_ip: Annotated[
        list[str] | None,
        typer.Option("--server-ip", help="An IP address clients use to reach the server (repeatable)."),
    ] = None,
    days: DaysOption = 825,
) -> None:
    """Make a new CA and the server's certificate in --dir (default: certs/)."""
    from fedtune.pki import CA_KEY_FILE, DEFAULT_SERVER_IPS, DEFAULT_SERVER_NAMES, SERVER_DIR, init_ca

    names = server_name or list(DEFAULT_SERVER_NAMES)
    ips = server_ip or list(DEFAULT_SERVER_IPS)
    ca_pem = init_ca(certs_dir, server_names=names, server_ips=ips, days=days)
    server_dir = certs_dir / SERVER_DIR
    lines = [
        f"CA certificate: {ca_pem}",
        f"CA key:         {certs_dir / CA_KEY_FILE}  (keep it here; never hand it out)",
        f"server folder:  {server_dir}/  (for {', '.join([*names, *ips])})",
        f"hand {server_dir}/ to the server host as it is",
        "next: `fedtune certs issue CLIENT_ID` for each site",
    ]
    console.print("\n".join(lines), highlight=False, markup=False)


@certs_app.command("issue")
def certs_issue(
    client_id: Annotated[str, typer.Argument(help="The site's id, e.g. site-01; it becomes the cert's CN.")],
    certs_dir: CertsDirOption = Path("certs"),
    days: DaysOption = 825,
    force: Annotated[bool, typer.Option("--force", help="Replace this client's certificate.")] = False,
) -> None:
    """Issue a certificate for CLIENT_ID from the CA in --dir."""
    from fedtune.pki import issue_client

    folder = issue_client(certs_dir, client_id, days=days, force=force)
    message = f"hand {folder}/ to site {client_id} as it is (ca.pem, cert.pem, key.pem)"
    console.print(message, highlight=False, markup=False)


@app.command()
def server(
    config: ConfigArg = None,
    set_: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in run.dir after a stop.")
    ] = False,
    unsafe_insecure: Annotated[
        bool, typer.Option("--unsafe-insecure", help="Plaintext, no client certificates: tests only.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show gRPC's own log.")] = False,
    dashboard: Annotated[
        int | None,
        typer.Option("--dashboard", min=0, max=65535, help="Also serve the run's live page on this port."),
    ] = None,
    dashboard_host: Annotated[
        str, typer.Option("--dashboard-host", help="Where the page listens; not loopback: with a token.")
    ] = "127.0.0.1",
) -> None:
    """Coordinate a deployed run: serve gRPC with mutual TLS, run the rounds, keep state in run.dir."""
    from fedtune.transport.handshake_log import HandshakeLogTap, enable_trace

    page = None if dashboard is None else (dashboard_host, dashboard)
    enable_trace(os.environ)  # before gRPC loads: refused handshakes are in its log, which the tap reads
    with HandshakeLogTap(verbose=verbose) as handshakes:
        _serve(config, set_ or [], resume=resume, insecure=unsafe_insecure, handshakes=handshakes, page=page)


def _serve(
    config: Path | None,
    set_: list[str],
    *,
    resume: bool,
    insecure: bool,
    handshakes: HandshakeLogTap,
    page: tuple[str, int] | None,
) -> None:
    from fedtune.config import load_config

    cfg = load_config(config, set_)
    if page is not None:
        with _dashboard(cfg.run.resolved_dir, *page):
            _serve_run(cfg, resume=resume, insecure=insecure, handshakes=handshakes)
    else:
        _serve_run(cfg, resume=resume, insecure=insecure, handshakes=handshakes)


def _serve_run(cfg: Config, *, resume: bool, insecure: bool, handshakes: HandshakeLogTap) -> None:
    _quiet_libraries()
    from fedtune.deploy.server import serve
    from fedtune.progress import round_line
    from fedtune.round.results import RoundResult

    _log_to_stderr()

    def show(result: RoundResult) -> None:
        console.print(round_line(result, cfg.federation.rounds), highlight=False, markup=False)

    result = serve(
        cfg,
        resume=resume,
        insecure=insecure,
        notify=lambda msg: console.print(f"[dim]{escape(msg)}[/dim]"),
        on_round=show,
        handshakes=handshakes,
    )
    if result.complete:
        console.print(f"[bold green]done[/] in {result.seconds:.0f}s: adapter {result.run_dir / 'adapter'}")


@app.command()
def client(
    server: Annotated[str, typer.Option("--server", help="The server's HOST:PORT.")],
    data: Annotated[Path, typer.Option("--data", help="This site's .jsonl, .csv or .parquet file.")],
    certs: Annotated[
        Path | None, typer.Option("--certs", help="This site's folder from `fedtune certs issue`.")
    ] = None,
    text_field: Annotated[str, typer.Option(help="The file's text column.")] = "text",
    give_up_after: Annotated[
        float, typer.Option(help="Seconds without the server before giving up.")
    ] = 600.0,
    unsafe_insecure: Annotated[
        bool, typer.Option("--unsafe-insecure", help="Plaintext, no certificate: tests only.")
    ] = False,
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="With --unsafe-insecure only: this client's id.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show gRPC's own log and retries.")] = False,
) -> None:
    """Take part in a deployed run: connect out to --server, train on --data when selected."""
    from fedtune.errors import ConfigError

    if unsafe_insecure == (certs is not None):
        raise ConfigError("pass --certs DIR (mutual TLS), or --unsafe-insecure with --client-id for tests")
    if certs is not None and client_id is not None:
        raise ConfigError(
            "--client-id is for --unsafe-insecure; with --certs the certificate names the client"
        )
    _grpc_log(verbose)
    from fedtune.transport.channel import server_address
    from fedtune.transport.site_tls import preflight

    preflight(server_address(server), certs)  # in a second: no model or torch loaded yet
    from fedtune.deploy.site import run_client
    from fedtune.progress import SiteDisplay

    _quiet_libraries()
    _log_to_stderr(verbose)
    with SiteDisplay(console) as display:
        result = run_client(
            server,
            data,
            certs=certs,
            client_id=client_id,
            text_field=text_field,
            give_up_after_s=give_up_after,
            notify=display.line,
            show=display.show,
            preflight_done=True,
        )
    console.print(f"done: trained in {result.rounds_trained} rounds; {result.reason}")


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="A deployed run's directory (holds state.db).")] = Path(
        "runs/default"
    ),
    rounds: Annotated[int, typer.Option(min=1, help="How many recent rounds to show.")] = 10,
) -> None:
    """Show a deployed run's rounds, participants, stragglers and refused messages."""
    from fedtune.errors import StateError
    from fedtune.status import status_lines
    from fedtune.store import REFUSED_EVENT_PREFIX, STATE_FILE, Store

    path = run_dir / STATE_FILE
    if not path.is_file():
        raise StateError(f"no {STATE_FILE} in {run_dir}; pass the run directory of a `fedtune server` run")
    with Store(path, read_only=True) as store:
        refusals = store.latest_events(REFUSED_EVENT_PREFIX, last=10)
        lines = status_lines(store.rounds(), store.event_counts(), last=rounds, refusals=refusals)
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


@app.command("dashboard")
def dashboard_command(
    run_dir: Annotated[Path, typer.Argument(help="A run's directory (runs/<run.name>, or run.dir).")] = Path(
        "runs/default"
    ),
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="The port to listen on (0: any free one).")
    ] = 8050,
    host: Annotated[
        str, typer.Option(help="Where to listen; anything but loopback requires the printed token.")
    ] = "127.0.0.1",
) -> None:
    """Serve a live page of a run (simulation or deployment) while it happens; read-only; Ctrl-C stops."""
    import threading

    from fedtune.errors import ConfigError

    if not run_dir.is_dir():
        raise ConfigError(f"no run directory at {run_dir}: pass the folder a run writes (runs/<run.name>)")
    with _dashboard(run_dir, host, port):
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            console.print("dashboard stopped")


@contextmanager
def _dashboard(run_dir: Path, host: str, port: int) -> Iterator[None]:
    """The run's dashboard in a daemon thread for the body of the `with`; says where, and the token."""
    from fedtune.dashboard import DashboardServer

    with DashboardServer(run_dir, host=host, port=port) as page:
        console.print(f"dashboard of {run_dir}: {page.url}", highlight=False, markup=False)
        if page.token is not None:
            console.print(
                f"dashboard token (the page asks for it): {page.token}", highlight=False, markup=False
            )
        yield


def _grpc_log(verbose: bool) -> None:
    """gRPC's own log (read once, when grpc is first imported): its lines reach the terminal only with
    --verbose; fedtune says in its own words what went wrong."""
    os.environ.setdefault("GRPC_VERBOSITY", "INFO" if verbose else "NONE")


def _log_to_stderr(verbose: bool = False) -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    try:
        app()
    except FedtuneError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise SystemExit(2) from None
