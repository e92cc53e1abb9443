"""The `[clients]` config section: heterogeneous clients in simulation, and their resolution per client.

A profile (`[[clients.profiles]]`) picks clients by `match` (a glob on client ids, `fnmatch`), or by
`fraction` (that share of the population, drawn with the run seed; the fraction profiles take disjoint
shares), or neither (every client); the first profile that picks a client is its profile. A profile sets
any of, in the shape FedScale uses:
- `local_steps`: the client's optimizer steps per round (replaces federation.local_steps/local_epochs;
  a drawn value is rounded, at least 1);
- `seconds_per_example`: per-sample compute latency; compute time = it x train.batch_size x steps;
- `upload_mbps`, `download_mbps`: link bandwidth; transfer time = bytes x 8 / (Mbit/s x 1e6);
- `availability`: the probability the client is online in a round (drawn per round and client);
- `rank`: a LoRA rank (validated; any rank other than lora.rank is refused until heterogeneous-rank
  aggregation exists).
A value is a number, or a distribution drawn once per client with the run seed:
`{ lognormal = { median = 0.05, sigma = 0.5 } }` or `{ uniform = [low, high] }`. What no profile sets
is the default: no compute time, infinitely fast links, always online, the federation's local work, so
with no profile the simulated clock reads 0 and nothing changes. `resolve_profiles` is pure and seeded.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any

from pydantic import (
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fedtune.round.plan import LocalWork, ParticipantSpec
from fedtune.section import PositiveInt, Section
from fedtune.seeding import derive_seed, numpy_rng


class Lognormal(Section):
    """exp(N(log median, sigma^2)), drawn once per client; in TOML `{ lognormal = { median, sigma } }`."""

    median: float = Field(gt=0.0)
    sigma: float = Field(ge=0.0)

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, value: Any) -> Any:
        return value["lognormal"] if isinstance(value, dict) and list(value) == ["lognormal"] else value

    @model_serializer(mode="wrap")
    def _wrap(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {"lognormal": handler(self)}

    def draw(self, u: float, z: float) -> float:
        return self.median * math.exp(self.sigma * z)

    @property
    def support(self) -> tuple[float, float]:
        return (0.0, math.inf) if self.sigma > 0 else (self.median, self.median)


class Uniform(Section):
    """Uniform on [low, high], drawn once per client; in TOML `{ uniform = [low, high] }`."""

    low: float
    high: float

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, value: Any) -> Any:
        if not (isinstance(value, dict) and list(value) == ["uniform"]):
            return value
        bounds = value["uniform"]
        if not isinstance(bounds, list | tuple) or len(bounds) != 2:
            raise PydanticCustomError("uniform_bounds", "give [low, high]")
        if all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds) and not (
            math.isfinite(bounds[0]) and math.isfinite(bounds[1]) and bounds[0] <= bounds[1]
        ):
            raise PydanticCustomError("uniform_bounds", "give finite [low, high] with low <= high")
        return {"low": bounds[0], "high": bounds[1]}

    @model_serializer(mode="wrap")
    def _wrap(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {"uniform": [data["low"], data["high"]]}

    def draw(self, u: float, z: float) -> float:
        return self.low + (self.high - self.low) * u

    @property
    def support(self) -> tuple[float, float]:
        return (self.low, self.high)


def _kind(value: Any) -> str | None:
    if isinstance(value, Lognormal | Uniform):
        return type(value).__name__.lower()
    if isinstance(value, dict):
        keys = list(value)
        return keys[0] if len(keys) == 1 and keys[0] in ("lognormal", "uniform") else None
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else None


_KIND = Discriminator(
    _kind,
    custom_error_type="value_kind",
    custom_error_message="give a number, { lognormal = { median = M, sigma = S } } or { uniform = [A, B] }",
)
_DRAWN = Annotated[Lognormal, Tag("lognormal")] | Annotated[Uniform, Tag("uniform")]
Value = Annotated[Annotated[float, Tag("number")] | _DRAWN, _KIND]
Steps = Annotated[Annotated[int, Tag("number")] | _DRAWN, _KIND]  # a drawn count is rounded, at least 1

# what each field's values may be: (lowest, highest, whether the lowest is excluded)
_RANGES = {
    "local_steps": (1.0, math.inf, False),
    "seconds_per_example": (0.0, math.inf, False),
    "upload_mbps": (0.0, math.inf, True),
    "download_mbps": (0.0, math.inf, True),
    "availability": (0.0, 1.0, False),
}


class ProfileConfig(Section):
    """One `[[clients.profiles]]` entry: which clients, and what they are like (unset: the default)."""

    match: str | None = None  # a glob on client ids, e.g. 'phone-*'
    fraction: float | None = Field(None, gt=0.0, le=1.0)  # a seeded share of the population
    local_steps: Steps | None = None  # replaces the federation's local work for these clients
    seconds_per_example: Value | None = None  # compute latency per training example (default 0)
    upload_mbps: Value | None = None  # default: infinitely fast
    download_mbps: Value | None = None  # default: infinitely fast
    availability: Value | None = None  # probability of being online in a round (default 1)
    rank: PositiveInt | None = None  # LoRA rank (only lora.rank until heterogeneous ranks are aggregated)

    def problem(self) -> str | None:
        """What is wrong with this profile (its field named after `clients.profiles[i].`), or None."""
        if self.match is not None and self.fraction is not None:
            return (
                f"match = {self.match!r} and fraction = {self.fraction:g}: give one (or neither, for every "
                "client)"
            )
        for name, (low, high, open_low) in _RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            lo, hi = (float(value), float(value)) if isinstance(value, int | float) else value.support
            if lo < low or hi > high or (open_low and lo <= low):
                allowed = f"{'above' if open_low else 'at least'} {low:g}" + (
                    f" and at most {high:g}" if math.isfinite(high) else ""
                )
                return f"{name} = {_show(value)}: its values must be {allowed}"
        return None


def _show(value: object) -> str:
    if isinstance(value, Lognormal):
        return f"{{ lognormal = {{ median = {value.median:g}, sigma = {value.sigma:g} }} }}"
    if isinstance(value, Uniform):
        return f"{{ uniform = [{value.low:g}, {value.high:g}] }}"
    return f"{value:g}" if isinstance(value, float) else repr(value)


class ClientsConfig(Section):
    """Heterogeneous clients, simulation only: `[[clients.profiles]]`, the first that picks a client wins."""

    profiles: list[ProfileConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _valid(self) -> ClientsConfig:
        for i, profile in enumerate(self.profiles):
            problem = profile.problem()
            if problem is not None:
                raise ValueError(f"clients.profiles[{i}].{problem}")
        total = sum(p.fraction or 0.0 for p in self.profiles)
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"clients.profiles: the fractions add up to {total:g}; the shares of the population they "
                "draw are disjoint, so keep their sum at most 1"
            )
        return self

    @property
    def active(self) -> bool:
        return bool(self.profiles)


@dataclass(frozen=True)
class ClientProfile:
    """One client as the simulated clock sees it (the defaults: no profile)."""

    client_id: str
    local_steps: int | None = None  # None: the federation's local work
    seconds_per_example: float = 0.0
    upload_mbps: float = math.inf
    download_mbps: float = math.inf
    availability: float = 1.0
    rank: int | None = None  # its LoRA rank (at most lora.rank, with flexlora or hetlora); None: lora.rank
    profile: int | None = None  # the index of the profile that picked it


def _value(value: float | Lognormal | Uniform, seed: int, field: str, client_id: str) -> float:
    if isinstance(value, int | float):
        return float(value)
    rng = numpy_rng(seed, "client-profile", field, client_id)
    u, z = rng.random(), rng.standard_normal()
    return float(value.draw(u, z))


def _picked(profiles: Sequence[ProfileConfig], population: Sequence[str], seed: int) -> list[int | None]:
    """The index of each client's profile (first that picks it), or None."""
    n = len(population)
    order = numpy_rng(seed, "client-profile-fraction").permutation(n)
    shares: dict[int, set[int]] = {}
    start = 0
    for i, p in enumerate(profiles):
        if p.fraction is not None:
            size = round(p.fraction * n)
            shares[i] = {int(j) for j in order[start : start + size]}
            start += size
    out: list[int | None] = []
    for j, client_id in enumerate(population):
        chosen = None
        for i, p in enumerate(profiles):
            if (p.fraction is not None and j in shares[i]) or (
                p.fraction is None and (p.match is None or fnmatch.fnmatchcase(client_id, p.match))
            ):
                chosen = i
                break
        out.append(chosen)
    return out


def resolve_profiles(config: ClientsConfig, population: Sequence[str], seed: int) -> dict[str, ClientProfile]:
    """Each client's profile: the first profile that picks it, its distributions drawn with `seed` (one
    draw per client and field, named by the client id: the same whatever the rest of the population)."""
    out: dict[str, ClientProfile] = {}
    for client_id, index in zip(population, _picked(config.profiles, population, seed), strict=True):
        if index is None:
            out[client_id] = ClientProfile(client_id)
            continue
        p = config.profiles[index]
        got = {
            name: _value(getattr(p, name), seed, name, client_id)
            for name in _RANGES
            if getattr(p, name) is not None
        }
        steps = got.pop("local_steps", None)
        out[client_id] = ClientProfile(
            client_id,
            local_steps=None if steps is None else max(1, round(steps)),
            **{k: min(v, 1.0) if k == "availability" else v for k, v in got.items()},
            rank=p.rank,
            profile=index,
        )
    return out


def online(profile: ClientProfile, round_num: int, seed: int) -> bool:
    """Whether the client is online in `round_num`: a seeded draw per round and client."""
    if profile.availability >= 1.0:
        return True
    draw = numpy_rng(derive_seed(seed, "client-availability"), round_num, profile.client_id).random()
    return bool(draw < profile.availability)


def spec_for(spec: ParticipantSpec, profile: ClientProfile) -> ParticipantSpec:
    """The participant spec of a client with this profile: its own local steps and LoRA rank, if it has
    them."""
    if profile.local_steps is not None:
        spec = replace(spec, work=LocalWork(steps=profile.local_steps))
    if profile.rank is not None:
        spec = replace(spec, rank=profile.rank)
    return spec


def client_ranks(
    profiles: Mapping[str, ClientProfile], population: Sequence[str], rank: int
) -> tuple[int, ...] | None:
    """Each client's LoRA rank by population index (a profile's, else `rank`), or None when all are `rank`."""
    ranks = tuple(profiles[cid].rank or rank for cid in population)
    return None if all(r == rank for r in ranks) else ranks
