"""Multi-process training with ``torch.distributed`` (launched by ``torchrun`` or SLURM).

The training loop (``training.Trainer``) is the only user. What lives here:

- :func:`init_from_env` starts the process group when the launcher's environment variables
  (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) say there is more
  than one process: backend ``nccl`` for CUDA, ``gloo`` for the CPU; each process takes the GPU
  ``cuda:LOCAL_RANK``.
- :class:`DistContext`, the rank / world size of this process and the few collectives the loop
  needs (sums of metrics, an agreement on whether a loss is finite).
- :func:`shard` splits a global batch over the ranks. ``--batch-size`` is the *global* batch:
  every rank draws the same global batches (the permutation of an epoch comes from the seed and
  the epoch), and rank r trains on its contiguous share of each. With the loss of rank r scaled
  by ``n_r · world_size / n`` before DistributedDataParallel averages the gradients, the update
  is that of one process on the whole batch, also when ``n`` does not divide evenly; a rank
  whose share is empty (a last batch smaller than the world) contributes a zero-weighted loss.
  Because the batch of a step does not depend on the number of ranks, a checkpoint written by
  N ranks resumes on any other number.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Before any process group exists: torch.distributed.nn (which DistributedDataParallel imports)
# binds ``group.WORLD`` as the default argument of its functions when it is first imported.
# Imported after init_process_group, it would hold the group for the life of the process, and
# DistContext.close could not free it.
if dist.is_available():
    import torch.distributed.nn  # noqa: F401

__all__ = ["DistContext", "init_from_env", "shard", "launched_distributed"]


def launched_distributed() -> bool:
    """True when a launcher (torchrun, srun with the variables set) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, and
    the ``device`` it trains on. ``world_size == 1`` is the single-process case, where every
    collective is the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, checkpoints, models and plots."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sums of scalar ``values`` over the ranks (float64, one collective)."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (so that all ranks take the same branch)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        """Leave the process group (started by :func:`init_from_env`) and stop its threads.

        The caller drops its DistributedDataParallel model first; the garbage collection here
        frees what reference cycles keep of it, so that destroying the group frees the
        backend, whose destructor joins its worker threads while the interpreter is still
        whole. A gloo worker left running finishes its last collective on its own time; when
        that happens during interpreter shutdown, releasing the collective's tensors needs the
        GIL, and the process aborts ("terminate called without an active exception") after a
        run that succeeded."""
        if self.enabled and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> DistContext:
    """The process group of a ``torchrun``/SLURM launch, or a single-process context.

    ``device`` is ``"cpu"`` or ``"cuda"``; under a multi-process launch with ``"cuda"`` each
    process uses ``cuda:LOCAL_RANK`` and the ``nccl`` backend, on the CPU ``gloo``. A process
    group that is already initialised (by the caller) is used as it is."""
    if not launched_distributed() and not dist.is_initialized():
        return DistContext(device=torch.device(device))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise RuntimeError(f"injflow: LOCAL_RANK={local_rank} but this node has {n} visible "
                               "GPUs; start at most one process per GPU (torchrun "
                               f"--nproc-per-node {n})")
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"injflow: WORLD_SIZE={world} but {var} is not set; launch "
                                   "with torchrun (it sets MASTER_ADDR/MASTER_PORT) or set them "
                                   "as in docs/slurm.md")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if backend == "nccl" else {}))
    else:
        backend = dist.get_backend()
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank, device=dev, backend=backend)


def shard(n: int, rank: int, world_size: int) -> tuple:
    """The ``[start, stop)`` share of rank ``rank`` in ``n`` items split over ``world_size``
    ranks as evenly as possible (the first ``n % world_size`` ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
