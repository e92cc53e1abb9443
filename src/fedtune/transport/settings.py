"""The `[deploy]` config section: where the gRPC server listens, who may join, round timing and limits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from fedtune.section import PositiveInt, Section


class DeployConfig(Section):
    """The gRPC deployment (`fedtune server`): where it listens, who may join, round timing and limits."""

    address: str = Field("127.0.0.1:50051", min_length=3)  # host:port the server listens on
    certs: Path = Path("certs/server")  # ca.pem, cert.pem, key.pem from `fedtune certs init`
    clients: list[str] = Field(default_factory=list)  # the allow-list: client ids (certificate subjects)
    min_connected: PositiveInt | Literal["all"] = "all"  # clients connected before a round starts
    over_selection: float = Field(0.0, ge=0.0, le=1.0)  # select this much more than clients_per_round
    round_timeout_s: float = Field(600.0, gt=0.0)  # a round closes then with what has arrived
    stage_timeout_s: float = Field(60.0, gt=0.0)  # secure aggregation: each key or unmasking stage
    eval_timeout_s: float = Field(600.0, gt=0.0)  # how long an evaluation waits for the clients' losses
    wait_for_clients_s: float = Field(3600.0, gt=0.0)  # how long a round waits for min_connected
    session_timeout_s: float = Field(60.0, gt=0.0)  # a client not heard from this long is away
    poll_interval_s: float = Field(1.0, gt=0.0)  # how often an idle client asks for work
    max_update_mib: float = Field(256.0, gt=0.0)  # refused before allocation when larger
    max_concurrent_uploads: PositiveInt = 4  # update buffers held at once; the rest wait their turn
    chunk_kib: int = Field(1024, ge=1, le=3072)  # streamed message size
