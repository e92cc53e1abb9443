"""Secure aggregation (SecAgg+): the server learns only the sum of the clients' updates.

Bell et al. (CCS 2020) over the original protocol of Bonawitz et al. (CCS 2017): pairwise masks on a
random k-regular neighbour graph, self masks, and t-of-(k+1) Shamir shares of the secrets that remove them,
so the round survives clients dropping at any stage. Files follow a round: `encoding` (fixed point),
`graph`, `crypto` (X25519, HKDF, AES-GCM), `prg` (AES-CTR mask expansion), `shamir`, `messages`, the state
machines `client` and `server`, `stages` (the one server-side stage driver every transport uses),
`in_process` (a whole round for vectors in hand) and `settings` (the `[secure_aggregation]` section). No
file draws from a non-cryptographic generator; secrets come from `secrets` and `cryptography`.
"""

from fedtune.secagg.client import SecAggClient
from fedtune.secagg.errors import ProtocolViolation, SecAggAbort, SecAggError
from fedtune.secagg.fixedpoint import FixedPoint, check_overflow, max_bits
from fedtune.secagg.graph import default_neighbours, effective_neighbours, neighbour_graph
from fedtune.secagg.in_process import SecAggResult, run_secagg_round
from fedtune.secagg.messages import Stage
from fedtune.secagg.params import SecAggParams, default_threshold
from fedtune.secagg.server import SecAggServer, UnmaskedSum
from fedtune.secagg.settings import SecureAggregationConfig
from fedtune.secagg.stages import SecAggStages, StageLedger

__all__ = [
    "FixedPoint",
    "ProtocolViolation",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "SecAggStages",
    "SecureAggregationConfig",
    "Stage",
    "StageLedger",
    "UnmaskedSum",
    "check_overflow",
    "default_neighbours",
    "default_threshold",
    "effective_neighbours",
    "max_bits",
    "neighbour_graph",
    "run_secagg_round",
]
