"""AdamW and learning-rate schedules.

The schedule is a pure function of the optimizer step (``lr_at``), so resuming needs no
scheduler state beyond the step itself, and tests can check values at key steps directly.

Step convention: ``step`` is the 1-based number of the optimizer step about to be taken. With
``warmup=W`` the first step uses ``lr / W`` (never 0: the reference's ``LambdaLR`` started at
``step/warmup = 0`` and so wasted its first update), step ``W`` reaches the peak ``lr``, and the
decay runs from step ``W`` to ``total_steps``, ending exactly at ``lr * lr_min_ratio``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "linear", "wsd", "constant")


@dataclass
class OptimArgs:
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to norm gains)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    scheduler: str = "cosine"
    """One of cosine | linear | wsd | constant; all start with a linear warmup."""
    warmup: int = 100
    """Warmup length in optimizer steps (0: start at the peak)."""
    lr_min_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine, linear, wsd)."""
    decay_fraction: float = 0.1
    """wsd only: fraction of ``total_steps`` spent in the final linear decay (0: no decay)."""
    fused: bool | None = None
    """Fused AdamW kernel: None picks it where torch supports it for the parameters' device."""

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {'|'.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")


def lr_factor(step: int, args: OptimArgs, total_steps: int) -> float:
    """Multiplier of ``args.lr`` at optimizer step ``step`` (1-based) of ``total_steps``."""
    if step < 1:
        raise ValueError(f"optimizer steps are 1-based, got step={step}")
    if args.warmup > 0 and step < args.warmup:
        return step / args.warmup
    if args.scheduler == "constant":
        return 1.0
    low = args.lr_min_ratio
    if args.scheduler == "wsd":
        decay_steps = round(args.decay_fraction * total_steps)
        if decay_steps == 0:
            return 1.0
        start = total_steps - decay_steps
        if step <= start:
            return 1.0
        done = min(step - start, decay_steps) / decay_steps
        return 1.0 - (1.0 - low) * done
    span = total_steps - args.warmup
    progress = 1.0 if span <= 0 else min(max(step - args.warmup, 0) / span, 1.0)
    if args.scheduler == "linear":
        return 1.0 - (1.0 - low) * progress
    return low + 0.5 * (1.0 - low) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, args: OptimArgs, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based)."""
    return args.lr * lr_factor(step, args, total_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _fused_supported(params: list[nn.Parameter]) -> bool:
    """Fused AdamW exists for CUDA (and, in recent torch, CPU) float tensors. We probe with one
    tiny step on a scratch tensor of the same device and dtype, which is cheaper to maintain than
    a version table and correct for whatever build is installed."""
    if not params:
        return False
    p = params[0]
    probe = torch.zeros(2, device=p.device, dtype=p.dtype, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        torch.optim.AdamW([probe], lr=1e-3, fused=True).step()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def build_optimizer(model: nn.Module, args: OptimArgs) -> torch.optim.AdamW:
    """AdamW with two parameter groups: weight decay on tensors of rank >= 2 (linear layers and
    embeddings), none on vectors (norm gains), the usual choice since decaying a gain towards 0
    only fights the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    fused = _fused_supported(params) if args.fused is None else args.fused
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    logger.info("AdamW: %d decayed / %d undecayed tensors, fused=%s", len(decay), len(no_decay), fused)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
        fused=fused,
    )
