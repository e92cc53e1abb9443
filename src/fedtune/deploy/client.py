"""`fedtune client`: one site's process. It connects out to the server (no inbound port at the site), trains
on its local data when selected, sends its update, and waits for the next round.

Join (the server sends the run's config) -> load the model and the local file once -> loop: ask for a task,
receive the global adapter in chunks, evaluate it on the held-out split, train with the seed a simulation
would use, encode (clip -> compress -> quantize, the same `ClientEncoding`), stream the update back. When the
server is away the client retries with exponential backoff and jitter; when it comes back without the
session (a restart) the client joins again. A task for a round it already encoded (the server restarted
mid-round) is trained again from the same error-feedback residual, so the update is the same.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch

from fedtune.adapter import FlatAdapter, attach_lora
from fedtune.client import ClientUpdate, LocalTrainer, Trainer
from fedtune.config import Config, load_config_text
from fedtune.data import ClientData
from fedtune.data.population import cap_and_shuffle, num_eval
from fedtune.data.sources import read_file
from fedtune.data.tokens import tokenize
from fedtune.deploy.secure_client import SecureParticipant
from fedtune.deploy.server import grpc_options
from fedtune.encoding import ClientEncoding
from fedtune.errors import DataError, FedtuneError
from fedtune.evaluate import evaluate
from fedtune.models import load_base_model, load_tokenizer, resolve_model_dir
from fedtune.privacy.clip import clip_l2
from fedtune.seeding import derive_seed, numpy_rng, torch_generator
from fedtune.transport import fedtune_v1_pb2 as pb
from fedtune.transport.tls import channel_credentials, warn_insecure
from fedtune.transport.wire import PROTOCOL_VERSION, SERVICE, chunked, float32_bytes, float32_values

log = logging.getLogger("fedtune.client")
# the server is away, restarting (CANCELLED: it shut down mid-call), or still holds our old session
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ALREADY_EXISTS,
}
CALL_TIMEOUT_S = 120.0
MAX_CHUNK_BYTES = 3072 * 1024  # the largest deploy.chunk_kib a server may use


class ClientError(FedtuneError):
    """The server refused this client for good (not on the allow-list, wrong identity or version)."""


@dataclass
class ClientResult:
    rounds_trained: int
    reason: str  # why the client stopped


@dataclass
class Backoff:
    """Exponential backoff with full jitter, capped; `give_up_after_s` of continuous failure ends it."""

    initial_s: float = 0.2
    max_s: float = 5.0
    give_up_after_s: float = 600.0
    _failing_since: float | None = None
    _attempt: int = 0
    _jitter: random.Random = field(default_factory=random.Random)  # timing jitter only, never a secret

    def wait(self, why: str) -> None:
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if now - self._failing_since > self.give_up_after_s:
            raise ClientError(f"gave up after {self.give_up_after_s:g} s without the server: {why}")
        delay = self._jitter.uniform(0, min(self.max_s, self.initial_s * 2**self._attempt))
        self._attempt += 1
        log.info("server unavailable (%s); retrying in %.2f s", why, delay)
        time.sleep(delay)

    def reset(self) -> None:
        self._failing_since, self._attempt = None, 0


class Stub:
    """The three calls over a channel, as raw bytes in and out (the schema is `fedtune_v1_pb2`)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.join = channel.unary_unary(f"/{SERVICE}/Join")
        self.get_task = channel.unary_stream(f"/{SERVICE}/GetTask")
        self.submit = channel.stream_unary(f"/{SERVICE}/SubmitUpdate")
        self.secagg = channel.unary_unary(f"/{SERVICE}/SecAgg")


def open_channel(server: str, certs: Path | None, chunk_bytes: int = MAX_CHUNK_BYTES) -> grpc.Channel:
    """A channel to `server` (host:port): mutual TLS with the site's certificate folder, or plaintext."""
    options = grpc_options(chunk_bytes)
    if certs is None:
        warn_insecure()
        return grpc.insecure_channel(server, options=options)
    return grpc.secure_channel(server, channel_credentials(certs), options=options)


def load_site_data(
    path: Path, text_field: str, config: Config, client_id: str, tokenizer: object
) -> ClientData:
    """The site's file as one client: capped and shuffled with the run's seed, split, tokenized."""
    records = read_file(path, text_field, None, None)
    cfg = config.data
    rng = numpy_rng(config.run.seed, "site-data", client_id)
    chosen = cap_and_shuffle(np.arange(len(records.texts)), cfg.max_examples_per_client, rng)
    token_ids = tokenize([records.texts[i] for i in chosen.tolist()], tokenizer, cfg.max_seq_len)
    examples = [ids for ids in token_ids if len(ids) >= 2]
    if len(examples) < cfg.min_examples:
        raise DataError(
            f"{path} has {len(examples)} usable examples in field {text_field!r}; this run needs at least "
            f"data.min_examples = {cfg.min_examples}"
        )
    held_out = num_eval(len(examples), cfg.eval_fraction)
    return ClientData(client_id, train=examples[held_out:], eval=examples[:held_out])


class Site:
    """What a client builds once it knows the run: model, adapter, trainer, data, encoding."""

    def __init__(self, config: Config, data_path: Path, text_field: str, client_id: str) -> None:
        self.config = config
        if config.run.threads is not None:
            torch.set_num_threads(config.run.threads)
        model_dir = resolve_model_dir(config.model.name)
        tokenizer = load_tokenizer(model_dir)
        self.data = load_site_data(data_path, text_field, config, client_id, tokenizer)
        self.model = attach_lora(
            load_base_model(model_dir), config.lora, torch_generator(config.run.seed, "lora")
        )
        self.adapter = FlatAdapter(self.model)
        self.trainer: Trainer = LocalTrainer(self.model, self.adapter, config.train, tokenizer.pad_token_id)
        self.encoding = ClientEncoding(config)
        self._encoded_round: tuple[int, torch.Tensor | None] | None = None  # residual before that round

    def work(
        self, task: pb.Task, global_flat: torch.Tensor, secure: SecureParticipant | None = None
    ) -> tuple[pb.UpdateHeader, bytes]:
        """Evaluate the received adapter, train, encode (and mask, in a secure round): the update's header
        and data."""
        cfg, fed = self.config, self.config.federation
        round_num, index = int(task.round), int(task.client_index)
        self.adapter.load(global_flat)
        eval_result = evaluate(self.model, [self.data], cfg.eval, self.trainer.pad_id)
        update = self.trainer.train(
            global_flat,
            self.data,
            seed=derive_seed(cfg.run.seed, "train", round_num, index),
            steps=None if fed.local_epochs is not None else fed.local_steps,
            epochs=fed.local_epochs,
        )
        header = pb.UpdateHeader(
            round=round_num,
            nonce=task.nonce,
            num_examples=update.num_examples,
            num_steps=update.num_steps,
            train_loss=update.train_loss if np.isfinite(update.train_loss) else 0.0,
            eval_loss=eval_result.loss,
            eval_examples=min(len(self.data.eval), cfg.eval.max_examples_per_client),
        )
        if update.delta is None:
            header.encoding, header.error = pb.ENCODING_REFUSED, update.error or "refused"
            return header, b""
        data, fits = self._encode(update, task, round_num, index, masked=secure is not None)
        header.fits_clip = fits
        if secure is not None:
            assert isinstance(data, torch.Tensor)  # the values secure aggregation masks
            weight = min(update.num_examples, secure.max_weight)
            header.encoding = pb.ENCODING_MASKED
            payload = np.ascontiguousarray(secure.mask(data, weight), dtype="<u4").tobytes()
        elif isinstance(data, torch.Tensor):
            header.encoding, payload = pb.ENCODING_FLOAT32, float32_bytes(data.numpy())
        else:
            header.encoding, payload = pb.ENCODING_PAYLOAD, data
        header.total_bytes = len(payload)
        return header, payload

    def _encode(
        self, update: ClientUpdate, task: pb.Task, round_num: int, index: int, *, masked: bool
    ) -> tuple[torch.Tensor | bytes, bool]:
        cid = self.data.client_id
        residuals = self.encoding.residuals
        if self._encoded_round is not None and self._encoded_round[0] == round_num:
            before = self._encoded_round[1]  # this round again (server restart): start from the same residual
            residuals.put(cid, before) if before is not None else residuals.discard(cid)
        self._encoded_round = (round_num, residuals.get(cid))
        clip: Callable[[torch.Tensor], tuple[torch.Tensor, bool]] | None = None
        if task.clip_l2_norm > 0:
            norm = float(task.clip_l2_norm)

            def clip(delta: torch.Tensor) -> tuple[torch.Tensor, bool]:
                result = clip_l2(delta, norm)
                return result.delta, not result.clipped

        assert update.delta is not None
        return self.encoding.encode(update.delta, cid, round_num, index, masked=masked, clip=clip)


def run_client(
    server: str,
    data_path: Path,
    *,
    certs: Path | None,
    client_id: str | None = None,
    text_field: str = "text",
    give_up_after_s: float = 600.0,
    notify: Callable[[str], None] = lambda _msg: None,
) -> ClientResult:
    """Take part in the server's run until it is done. `certs` is the site's folder from
    `fedtune certs issue` (None: plaintext, `client_id` names the client; for tests only)."""
    if certs is not None:
        from fedtune.pki import common_name, load_identity

        client_id = common_name(load_identity(certs).cert_pem)
    if not client_id:
        raise ClientError("a client id is needed: pass --certs (its certificate names the client)")
    if not data_path.is_file():
        raise DataError(f"--data {str(data_path)!r} not found; pass the site's .jsonl, .csv or .parquet file")
    stub = Stub(open_channel(server, certs))
    backoff = Backoff(give_up_after_s=give_up_after_s)
    site: Site | None = None
    session: bytes | None = None
    trained = 0
    while True:
        try:
            if session is None:
                reply = _join(stub, client_id, site)
                session = reply.session
                backoff.reset()
                if site is None:
                    config = load_config_text(reply.config_toml, "the server's config")
                    site = Site(config, data_path, text_field, client_id)
                    notify(f"{client_id}: joined; {len(site.data.train)} training examples")
                continue
            assert site is not None
            found = _get_task(stub, session, site.adapter.numel)
            backoff.reset()
            if isinstance(found, pb.Done):
                return ClientResult(trained, found.reason)
            if isinstance(found, pb.Wait):
                time.sleep(found.retry_after_ms / 1000)
                continue
            task, global_flat = found
            secure = None
            if task.HasField("secagg"):
                secure = SecureParticipant(stub, session, task, site.config.run.seed)
                if not secure.share_keys():
                    notify(f"{client_id}: round {task.round}: {secure.left_out}")
                    continue
            header, payload = site.work(task, global_flat, secure)
            header.session = session
            stream = _update_stream(header, payload, site.config.deploy.chunk_kib * 1024)
            reply_bytes = stub.submit(stream, timeout=CALL_TIMEOUT_S)
            reply = pb.SubmitReply.FromString(reply_bytes)
            if secure is not None and reply.accepted:
                secure.unmask()
            trained += 1
            notify(f"{client_id}: round {task.round}: {reply.detail}")
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED and session is not None:
                session = None  # the server restarted: join again
                continue
            if code == grpc.StatusCode.FAILED_PRECONDITION and session is not None:
                log.info("%s: %s", client_id, exc.details())  # a stale round: ask for the next task
                continue
            if code in RETRYABLE:
                backoff.wait(f"{code.name}: {exc.details()}")
                continue
            raise ClientError(f"the server refused {client_id}: {code.name}: {exc.details()}") from None


def _join(stub: Stub, client_id: str, site: Site | None) -> pb.JoinReply:
    request = pb.JoinRequest(
        protocol_version=PROTOCOL_VERSION,
        client_id=client_id,
        num_examples=0 if site is None else len(site.data.train),
    )
    return pb.JoinReply.FromString(stub.join(request.SerializeToString(), timeout=CALL_TIMEOUT_S))


def _get_task(stub: Stub, session: bytes, numel: int) -> tuple[pb.Task, torch.Tensor] | pb.Wait | pb.Done:
    """The next task with its global adapter, or a Wait or Done."""
    replies = stub.get_task(pb.TaskRequest(session=session).SerializeToString(), timeout=CALL_TIMEOUT_S)
    first = pb.TaskReply.FromString(next(iter(replies)))
    kind = first.WhichOneof("kind")
    if kind == "wait":
        return first.wait
    if kind == "done":
        return first.done
    if kind != "task":
        raise ClientError(f"the server sent {kind} where a task was expected")
    task = first.task
    if task.adapter_numel != numel:
        raise ClientError(f"the server's adapter has {task.adapter_numel} values, this client's {numel}")
    buffer = bytearray()
    for raw in replies:
        buffer += pb.TaskReply.FromString(raw).adapter_chunk
        if len(buffer) > numel * 4:
            raise ClientError("the server sent more adapter bytes than the task declared")
    values = float32_values(buffer, numel, "the global adapter")
    return task, torch.from_numpy(values.copy())


def _update_stream(header: pb.UpdateHeader, payload: bytes, chunk_bytes: int) -> Iterator[bytes]:
    yield pb.UpdateChunk(header=header).SerializeToString()
    for chunk in chunked(payload, chunk_bytes):
        yield pb.UpdateChunk(data=bytes(chunk)).SerializeToString()
