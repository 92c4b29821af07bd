"""Harness options shared by the eval entry point and the training hooks (no heavy imports, so
configs that embed them load without pulling in lm-eval or torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class HarnessOptions:
    """How lm-eval and the bolt LM run (shared by the CLI config and the training hook)."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """One evaluation per seed; several give a mean and a standard error."""
    limit: Optional[int] = None
    """Documents per task (None: all). For smoke tests only."""
    num_fewshot: Optional[int] = None
    """Override every task's shot count (None: the YAML's)."""
    max_gen_tokens: int = 512
    """Cap on new tokens per generation (a task's own ``max_gen_toks`` applies below it)."""
    context_window: int = 0
    """Tokens the model sees, prompt + generation; 0: the model's ``max_seqlen``."""
    overflow: str = "truncate"
    """Prompts longer than the window minus the new tokens: ``truncate`` (left, reported) or ``error``."""
    log_samples: bool = True
    """Write every document's prompt, generation and score to ``samples_seed<S>.jsonl``."""
    bootstrap_iters: int = 0
    """lm-eval's bootstrap for per-seed stderr of non-mean metrics (mean metrics get a closed form
    whenever this is > 0); 0 skips stderr."""

    def validate(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.overflow not in ("truncate", "error"):
            raise ValueError(f"overflow must be truncate or error, got {self.overflow!r}")
        if self.max_gen_tokens < 1 or self.context_window < 0:
            raise ValueError("max_gen_tokens must be >= 1 and context_window >= 0")
