"""Reading a config: TOML plus `--set section.key=value` overrides, validated once, with one line per problem.

Every error names the field, the value given and what is allowed; a key that has moved says where to.
`to_toml` writes the resolved config back, and `load_config` of it gives an equal `Config`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin

import tomli_w
from pydantic import BaseModel, ValidationError

from fedtune.config.checks import check
from fedtune.config.schema import Config
from fedtune.errors import ConfigError

MOVED_KEYS = {
    ("deploy", "min_clients"): "federation.min_clients (it applies to simulation too; default 1)",
}


def _parse_value(text: str) -> Any:
    """A `--set` value is read as a TOML value (3, 0.5, true, [\"a\"]); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested dict, returning a new dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, for example federation.rounds=3")
        section, field = parts
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: {section!r} is not a section")
        target[field] = _parse_value(value.strip())
    return out


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    kind = error["type"]
    if kind == "extra_forbidden":
        moved = MOVED_KEYS.get(tuple(str(p) for p in error["loc"]))
        if moved is not None:
            return f"{where} has moved: set {moved}"
        model: type[BaseModel] = Config
        for part in error["loc"][:-1]:
            if isinstance(part, int):  # an entry of a list of sections
                continue
            field = model.model_fields.get(str(part))
            annotation = None if field is None else field.annotation
            if get_origin(annotation) is list:
                annotation = get_args(annotation)[0]
            if not isinstance(annotation, type):
                break
            model = annotation
        allowed = ", ".join(model.model_fields)
        return f"{where}: unknown key; allowed here: {allowed}"
    if kind == "value_error":
        return str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
    given = error.get("input")
    return f"{where} = {given!r}: {error['msg'][0].lower()}{error['msg'][1:]}"


def validate(raw: dict[str, Any]) -> Config:
    """Build a Config from a nested dict: every section's fields, then the rules across sections."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ConfigError("invalid config: " + "; ".join(lines)) from None
    try:
        check(config)
    except ConfigError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    return config


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or start from defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass an existing TOML file")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    return validate(apply_overrides(raw, overrides or []))


def load_config_text(text: str, origin: str = "the run's config") -> Config:
    """A Config from TOML text (a stored or received config), validated like a file."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin} is not valid TOML: {exc}") from None
    return validate(raw)


def to_toml(config: Config) -> str:
    """The resolved config as TOML; `load_config` of it gives back an equal Config."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True, by_alias=True))
