"""The `fedtune` command line: parse, build a config, call one function. Nothing runs at import."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedtune.errors import FedtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: --set federation.rounds=3 (repeatable)."),
]
ConfigArg = Annotated[Path | None, typer.Argument(help="A TOML config file; defaults are used without one.")]


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
    from fedtune.progress import RichObserver
    from fedtune.simulation import simulate

    cfg = load_config(config, set_ or [])
    _quiet_libraries()
    with RichObserver(console) as observer:
        result = simulate(cfg, observer, notify=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    change = (result.after.perplexity / result.before.perplexity - 1) * 100
    console.print(
        f"[bold green]done[/] in {result.seconds:.0f}s: eval perplexity "
        f"{result.before.perplexity:.2f} -> {result.after.perplexity:.2f} ({change:+.1f}%)"
    )
    console.print(f"adapter: {result.run_dir / 'adapter'}   report: {result.run_dir / 'report.md'}")


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


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    try:
        app()
    except FedtuneError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise SystemExit(2) from None
