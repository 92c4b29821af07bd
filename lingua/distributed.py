"""Process setup and model parallelisation (FSDP2), CPU and CUDA alike.

A run is either one plain process (no process group, no sharding: the fastest path on a CPU
and the one tests use) or ``torchrun`` with ``WORLD_SIZE > 1``: gloo on CPU, nccl on CUDA, every
transformer block and then the root wrapped with ``fully_shard``. bf16 mixed precision exists
only on CUDA (on the CPU machines bf16 is ~10x slower than fp32), through FSDP's policy when
sharded and through autocast in a single process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class DistributedArgs:
    data_shards: int = 0
    """Number of data streams making up the global batch (0: the world size). It is fixed for a
    run: each rank reads ``data_shards / world_size`` of them, one after the other within an
    optimizer step, so a run (or its checkpoint) sees identical batches at any world size that
    divides it."""
    compile: bool = False
    """torch.compile each transformer block."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs ~1/3 more compute)."""
    mixed_precision: bool = True
    """bf16 compute with fp32 master weights and fp32 gradient reduction; CUDA only."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered block weights after forward (saves memory, costs a re-gather)."""
    matmul_allow_tf32: bool = False
    backend: str = ""
    """Process-group backend override; empty picks nccl on CUDA and gloo on CPU."""

    def validate(self) -> None:
        if self.data_shards < 0:
            raise ValueError(f"data_shards must be >= 0, got {self.data_shards}")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank, the world, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(args: DistributedArgs) -> DistEnv:
    """Read the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); start the process
    group when there is more than one process. A plain ``python`` launch is rank 0 of 1."""
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = args.matmul_allow_tf32
        torch.backends.cudnn.allow_tf32 = args.matmul_allow_tf32
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        logger.info("process group: backend=%s rank=%d world=%d", backend, rank, world)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars across ranks in one collective (float64 so counts stay exact)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _checkpointed(module: nn.Module) -> None:
    """Make ``module`` recompute its activations in backward. The instance's ``forward`` is
    replaced (rather than wrapping the module) so state-dict keys stay unchanged."""
    from torch.utils.checkpoint import checkpoint

    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def parallelize(model: nn.Module, args: DistributedArgs, env: DistEnv) -> nn.Module:
    """Apply activation checkpointing, FSDP2 (one unit per block plus the root) and compilation
    to a model exposing ``layers``, in the order torchtitan recommends: AC, compile, shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = list(model.layers)  # type: ignore[attr-defined]
    if args.activation_checkpointing:
        for block in blocks:
            _checkpointed(block)
    if args.compile:
        for block in blocks:
            block.compile()
    if not env.sharded:
        return model
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    if env.device.type == "cuda" and args.mixed_precision:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for i, block in enumerate(blocks):
        # the last block's weights are needed again at once by backward: keep them gathered
        reshard = args.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=args.reshard_after_forward)
    # Gradients are reduced by SUM: the trainer already divides each rank's loss by the global
    # number of loss tokens, so a mean over ranks would count every token world_size times less.
    # (A divide factor of 1 alone would select PREMUL_SUM, which gloo lacks; forcing plain sums
    # gives ReduceOp.SUM with no scaling at all, on gloo and nccl alike.)
    # Both settings are per FSDP unit, so every block gets them, not just the root.
    for unit in [*blocks, model]:
        unit.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
    return model


def autocast(args: DistributedArgs, env: DistEnv) -> contextlib.AbstractContextManager:
    """bf16 autocast for an unsharded CUDA model; FSDP's policy covers the sharded case."""
    if env.device.type == "cuda" and args.mixed_precision and not env.sharded:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Within gradient accumulation, keep FSDP gradients local until the last micro-step."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None or not skip:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (sharded or not) and return the norm before clipping.
    ``max_norm <= 0`` only measures."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor: the norm is a replicated scalar
        norm = norm.full_tensor()
    return float(norm)
