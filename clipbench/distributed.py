"""Data-parallel feature extraction across ``torch.distributed`` ranks (``torchrun``, SLURM ``srun``).

Design: rank 0 leads, the other ranks serve shards.

* Rank 0 runs the ordinary single-process pipeline (:class:`clipbench.pipeline.Evaluator`): it alone
  decides cache hits and existing records, reads and writes the feature cache, runs the tasks and
  writes records. So the cache directory and the output directory only have to exist on rank 0's
  machine, and no decision ever has to be agreed on by several ranks.
* When rank 0 misses the image-feature cache for a split, its encoder (:meth:`DistContext.encode`)
  broadcasts a request ``(spec, role)`` to the other ranks; every rank loads that split with the same
  adapter call, checks that it sees the same content as rank 0, encodes its shard, and the shards are
  gathered to rank 0 in dataset order. Between requests the other ranks wait in
  :meth:`DistContext.serve`; rank 0 tells them to exit in :meth:`DistContext.close`, or, in a run of
  several models, to load the next one (:meth:`DistContext.next_model`).
* A shard is a contiguous block of whole batches (:func:`shard_range`), so every image is encoded in
  exactly the batch it would be in a single process: per-image features do not depend on the number
  of ranks. Shard sizes differ by at most one batch; the last, partial batch is handled like in a
  single process; no image is dropped or encoded twice.

Failures: a rank that cannot encode its shard (missing data) reports the error to rank 0, which
fails that dataset like a single process would, and the job goes on. Unreadable images are not
failures of a rank: each rank reports the indices and reasons of its shard's unreadable images with
its rows, rank 0 merges them, and ``--on-bad-image`` applies as in a single process (``skip``
works distributed too). A rank that dies
makes the collective calls of the others fail: they raise :class:`DistributedError` naming
themselves (torchrun's summary names the rank that died) and exit non-zero. Records and cache entries
of finished datasets are on disk (written atomically), so rerunning the same command resumes.

Environment: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun) or ``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID`` (srun, with ``MASTER_ADDR`` and optionally ``MASTER_PORT``);
``CLIPBENCH_DIST_TIMEOUT`` (minutes, default 30): how long a collective call waits for a hung rank
while features are exchanged; ``CLIPBENCH_DIST_IDLE_TIMEOUT`` (minutes, default 1440): how long
serving ranks wait for rank 0's next request while rank 0 runs tasks (a linear probe can take hours).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from clipbench.errors import ClipbenchError
from clipbench.features import EncodedImages

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_MIN = 30.0
DEFAULT_IDLE_TIMEOUT_MIN = 24 * 60.0
DEFAULT_MASTER_PORT = 29500
#: Largest message of one gather call; keeps gloo buffers bounded for ImageNet-sized splits.
GATHER_CHUNK_BYTES = 1 << 28
#: Test-only: the rank named here exits abruptly when rank 0's second request arrives.
FAIL_RANK_ENV = "CLIPBENCH_TEST_FAIL_RANK"


class DistributedError(ClipbenchError):
    """A collective call failed: another rank died or hung. Not a per-dataset failure."""


def shard_range(n_samples: int, batch_size: int, rank: int, world_size: int) -> range:
    """The sample indices that ``rank`` encodes: a contiguous block of whole batches.

    Batches are those of a single process (``[0, b)``, ``[b, 2b)``, ...); rank r gets batches
    ``[r * n_batches // world_size, (r + 1) * n_batches // world_size)``. The ranges of all ranks are
    disjoint, in rank order, and cover ``range(n_samples)``; some are empty when there are fewer
    batches than ranks.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad shard request: batch_size={batch_size}, rank={rank}, world_size={world_size}")
    n_batches = -(-n_samples // batch_size)
    first = rank * n_batches // world_size
    last = (rank + 1) * n_batches // world_size
    return range(min(first * batch_size, n_samples), min(last * batch_size, n_samples))


def _minutes(environ: Mapping[str, str], name: str, default: float) -> timedelta:
    text = environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ClipbenchError(f"{name}={text!r} is not a positive number of minutes; set it to e.g. {default:g}.")
    return timedelta(minutes=value)


def _int_env(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ClipbenchError(f"Environment variable {name}={environ[name]!r} must be an integer.") from None


@dataclass
class DistContext:
    """This process's place in a (possibly) distributed run.

    ``world_size == 1`` (the default, no environment variables) is the plain single-process run:
    every method is then a no-op or a direct call.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout: timedelta = timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    idle_timeout: timedelta = timedelta(minutes=DEFAULT_IDLE_TIMEOUT_MIN)
    _control: Any = field(default=None, repr=False)
    _requests: int = field(default=0, repr=False)
    _broken: bool = field(default=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- setup ------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "auto", environ: Mapping[str, str] | None = None) -> "DistContext":
        """Read torchrun's or SLURM's variables and, when there are several ranks, join the group.

        The default process group uses NCCL for CUDA tensors and gloo for CPU tensors (``device``
        ``auto``/``cuda`` with CUDA available), gloo alone otherwise; clipbench exchanges features
        in host memory, over gloo. A second gloo group with ``idle_timeout`` carries rank 0's
        requests.

        Raises:
            ClipbenchError: inconsistent variables (a rank outside the world, SLURM without
                ``MASTER_ADDR``) or a bad timeout value.
        """
        env = os.environ if environ is None else environ
        timeout = _minutes(env, "CLIPBENCH_DIST_TIMEOUT", DEFAULT_TIMEOUT_MIN)
        idle = _minutes(env, "CLIPBENCH_DIST_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT_MIN)
        init_method = None
        if env.get("WORLD_SIZE"):
            world, rank = _int_env(env, "WORLD_SIZE"), _int_env(env, "RANK") if env.get("RANK") else 0
            local = _int_env(env, "LOCAL_RANK") if env.get("LOCAL_RANK") else 0
            init_method = "env://"
        elif env.get("SLURM_NTASKS") and _int_env(env, "SLURM_NTASKS") > 1:
            world, rank = _int_env(env, "SLURM_NTASKS"), _int_env(env, "SLURM_PROCID")
            local = _int_env(env, "SLURM_LOCALID") if env.get("SLURM_LOCALID") else 0
            if not env.get("MASTER_ADDR"):
                raise ClipbenchError(
                    f"SLURM started {world} tasks but MASTER_ADDR is not set, so the ranks cannot find "
                    "each other. In the batch script, before srun, add: export MASTER_ADDR=$(scontrol "
                    "show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) (and optionally MASTER_PORT)."
                )
            init_method = f"tcp://{env['MASTER_ADDR']}:{env.get('MASTER_PORT') or DEFAULT_MASTER_PORT}"
        else:
            return cls(timeout=timeout, idle_timeout=idle)
        if world < 1 or not 0 <= rank < world:
            raise ClipbenchError(f"Rank {rank} is outside a world of {world} processes; check RANK/WORLD_SIZE.")
        ctx = cls(rank=rank, world_size=world, local_rank=local, timeout=timeout, idle_timeout=idle)
        if world == 1:
            return ctx
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            kwargs = {} if init_method == "env://" else {"rank": rank, "world_size": world}
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method=init_method,
                                    timeout=timeout, **kwargs)
        ctx._control = dist.new_group(backend="gloo", timeout=idle)
        log.info("rank %d of %d (local rank %d) joined the process group", rank, world, local)
        return ctx

    def device(self, requested: str) -> str:
        """The device for this rank: ``cuda:LOCAL_RANK`` when CUDA is requested or auto-detected
        in a distributed run, else ``requested`` unchanged."""
        if self.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def _fail(self, what: str, error: BaseException) -> DistributedError:
        self._broken = True
        return DistributedError(
            f"rank {self.rank}: {what} failed ({type(error).__name__}: {str(error).strip()[:300]}). "
            "Another rank has most likely died or hung; its own error, and torchrun's summary, name "
            "it. Records and cached features of finished datasets are kept: rerun the same command "
            "to resume (raise CLIPBENCH_DIST_TIMEOUT if a rank is merely slow)."
        )

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (RuntimeError, ValueError, ConnectionError) as error:  # DistError subclasses RuntimeError
            raise self._fail(what, error) from error

    def _all_gather(self, what: str, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out

    def main_first(self, load: Callable[[], T], what: str = "loading the model") -> T:
        """Run ``load`` on rank 0, then (if it succeeded) on the other ranks, so that downloads
        happen once. When rank 0 fails, the other ranks fail too, with rank 0's message."""
        if not self.distributed:
            return load()
        box: list[Any] = [None]
        if self.is_main:
            try:
                result = load()
            except Exception as exc:
                box[0] = f"{exc}"
                self._collective(what, lambda: dist.broadcast_object_list(box, src=0, group=self._control))
                raise
            self._collective(what, lambda: dist.broadcast_object_list(box, src=0, group=self._control))
            return result
        self._collective(what, lambda: dist.broadcast_object_list(box, src=0, group=self._control))
        if box[0] is not None:
            raise ClipbenchError(f"rank {self.rank}: rank 0 failed {what}: {box[0]}")
        return load()

    def check_same_model(self, model: Any) -> None:
        """Refuse to run when the ranks loaded different weights or preprocessing."""
        if not self.distributed:
            return
        mine = (model.name, model.pretrained, model.weights_digest, model.precision, repr(model.preprocess))
        seen = self._all_gather("comparing the loaded models", mine)
        differing = [r for r, other in enumerate(seen) if other != seen[0]]
        if differing:
            raise ClipbenchError(
                f"Ranks {differing} loaded a different model than rank 0 ({seen[differing[0]][2]} vs "
                f"{seen[0][2]}). Every rank must see the same --pretrained file; use a path on a "
                "shared filesystem or identical copies."
            )

    # -- rank 0 -----------------------------------------------------------------------------
    def encode(self, model: Any, samples: Any, *, spec: Any, role: str, batch_size: int = 256,
               workers: int = 4, desc: str = "images", max_image_pixels: int | None = None,
               indices: range | None = None, decode: str | None = None) -> EncodedImages:
        """Rank 0's image encoder (the ``encoder`` hook of :class:`clipbench.pipeline.Evaluator`):
        features of every readable sample of ``samples`` (or of the contiguous ``indices``, one
        chunk of a chunked extraction, which starts on a batch boundary), encoded by all ranks, in
        dataset order.

        Returns:
            :class:`clipbench.features.EncodedImages`, as :func:`clipbench.features.encode_image_batches`
            (the unreadable images of every shard in ``bad``).
        """
        from clipbench.features import DEFAULT_DECODE, encode_image_batches

        if not self.distributed:
            return encode_image_batches(model, samples, indices=indices, batch_size=batch_size, workers=workers,
                                        desc=desc, max_image_pixels=max_image_pixels, decode=decode or DEFAULT_DECODE)
        span = range(len(samples)) if indices is None else indices
        if span.step != 1 or span.start % batch_size:
            raise ValueError(f"a distributed encode takes a contiguous range starting on a batch boundary, not {span}")
        request = {"op": "encode", "spec": spec, "role": role, "n": len(samples), "start": span.start,
                   "stop": span.stop,
                   "digest": samples.listing_digest(), "batch_size": batch_size, "workers": workers,
                   "max_image_pixels": max_image_pixels, "decode": decode or DEFAULT_DECODE}
        self._collective(f"sending the request for {spec.name}/{role}",
                         lambda: dist.broadcast_object_list([request], src=0, group=self._control))
        result = self._encode_shard(model, samples, request)
        assert result is not None
        return result

    def next_model(self) -> None:
        """Rank 0, between two models of one run: the serving ranks return from :meth:`serve` and
        load the next model with rank 0 (after the last model, :meth:`close` stops them instead)."""
        if self.distributed and self.is_main:
            self._collective("sending the next model", lambda: dist.broadcast_object_list(
                [{"op": "next"}], src=0, group=self._control))

    def close(self) -> None:
        """Rank 0: tell the serving ranks to exit. Every rank: leave the process group.

        Called in a ``finally``. After a failed exchange nothing more is sent: a hung rank would
        never answer."""
        if not self.distributed or not dist.is_initialized():
            return
        try:
            if self.is_main and not self._broken:
                dist.broadcast_object_list([{"op": "stop"}], src=0, group=self._control)
            dist.destroy_process_group()
        except (RuntimeError, ValueError, ConnectionError) as error:
            log.debug("rank %d: leaving a broken process group (%s)", self.rank, error)

    # -- other ranks ------------------------------------------------------------------------
    def serve(self, model: Any, load_samples: Callable[[Any, str], Any]) -> None:
        """Ranks > 0: encode shards of the splits rank 0 asks for, until rank 0 says stop (or, in
        a run of several models, moves on to the next one: :meth:`next_model`).

        ``load_samples(spec, role)`` is the pipeline's loader
        (:meth:`clipbench.pipeline.Evaluator.load_samples`); a request carries the dataset spec and
        split role.
        """
        fail_on = os.environ.get(FAIL_RANK_ENV)
        while True:
            box: list[Any] = [None]
            self._collective("waiting for rank 0's next request",
                             lambda: dist.broadcast_object_list(box, src=0, group=self._control))
            request = box[0]
            if request["op"] in ("stop", "next"):
                return
            self._requests += 1
            if fail_on is not None and int(fail_on) == self.rank and self._requests > 1:
                log.error("rank %d: exiting abruptly (%s, a test hook)", self.rank, FAIL_RANK_ENV)
                os._exit(1)
            spec, role = request["spec"], request["role"]
            samples, error = None, None
            try:
                samples = load_samples(spec, role)
                if len(samples) != request["n"] or samples.listing_digest() != request["digest"]:
                    error = (f"rank {self.rank} sees a different {spec.name}/{role} than rank 0 "
                             f"({len(samples)} vs {request['n']} samples, or other files/labels): "
                             "every rank needs the same data under --data-root (a shared "
                             "filesystem or identical copies)")
            except Exception as exc:  # reported to rank 0, which fails this dataset
                log.exception("rank %d: loading %s/%s failed", self.rank, spec.name, role)
                error = f"rank {self.rank} could not load {spec.name}/{role}: {exc}"
            self._encode_shard(model, samples, request, error)

    # -- all ranks --------------------------------------------------------------------------
    def _encode_shard(self, model: Any, samples: Any, request: dict, error: str | None = None
                      ) -> EncodedImages | None:
        """Encode this rank's shard and gather every shard to rank 0 (None elsewhere)."""
        from clipbench.features import DEFAULT_DECODE, encode_image_batches

        spec, role = request["spec"], request["role"]
        start = request.get("start", 0)
        local = shard_range(request.get("stop", request["n"]) - start, request["batch_size"], self.rank, self.world_size)
        shard = range(start + local.start, start + local.stop)  # whole batches of the single-process run
        projected = pre = np.zeros((0, 0), np.float32)
        bad: dict[int, str] = {}
        if error is None:
            try:
                encoded = encode_image_batches(
                    model, samples, indices=shard, batch_size=request["batch_size"],
                    workers=request["workers"], desc=f"{spec.name}/{role} rank {self.rank}",
                    max_image_pixels=request.get("max_image_pixels"),
                    decode=request.get("decode", DEFAULT_DECODE))
                projected, pre, bad = encoded.projected, encoded.pre_projection, encoded.bad
            except Exception as exc:  # reported to rank 0, which fails this dataset
                log.exception("rank %d: encoding %s/%s failed", self.rank, spec.name, role)
                error = f"rank {self.rank} failed encoding {spec.name}/{role}: {exc}"
        what = f"gathering the features of {spec.name}/{role}"
        meta = self._all_gather(what, (len(projected), projected.shape[1], pre.shape[1], error, bad))
        errors = [m[3] for m in meta if m[3] is not None]
        if errors:
            if self.is_main:
                raise ClipbenchError("; ".join(errors))
            return None
        counts = [m[0] for m in meta]
        dims = (max(m[1] for m in meta), max(m[2] for m in meta))
        gathered = [self._gather_rows(what, array, counts, dim) for array, dim in zip((projected, pre), dims)]
        if not self.is_main:
            return None
        log.info("%s/%s: gathered %s images from %d ranks", spec.name, role, counts, self.world_size)
        # shards are contiguous blocks in rank order, so their bad indices merge in index order
        return EncodedImages(gathered[0], gathered[1], {i: r for m in meta for i, r in m[4].items()})

    def _gather_rows(self, what: str, local: np.ndarray, counts: list[int], dim: int) -> np.ndarray | None:
        """Concatenate every rank's ``(counts[r], dim)`` float32 rows on rank 0, in rank order.

        Shards are padded to the largest one and sent in chunks of at most GATHER_CHUNK_BYTES."""
        local = np.ascontiguousarray(local, dtype=np.float32).reshape(counts[self.rank], dim)
        parts = [np.empty((c, dim), np.float32) for c in counts] if self.is_main else None
        step = max(1, GATHER_CHUNK_BYTES // (4 * max(dim, 1)))
        for start in range(0, max(counts), step):
            stop = min(start + step, max(counts))
            send = torch.zeros(stop - start, dim)
            mine = local[start:stop]
            send[:len(mine)] = torch.from_numpy(mine)
            recv = [torch.empty_like(send) for _ in range(self.world_size)] if self.is_main else None
            self._collective(what, lambda: dist.gather(send, recv, dst=0))
            if parts is not None:
                for rank, chunk in enumerate(recv):
                    take = min(counts[rank], stop) - start
                    if take > 0:
                        parts[rank][start:start + take] = chunk[:take].numpy()
        return np.concatenate(parts) if parts is not None else None
