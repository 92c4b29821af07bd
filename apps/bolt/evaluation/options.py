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
    """Documents per task (None: all); which ones: ``subset``. A limit at or above a task's size
    scores all of it. The results record what was scored (``subset`` in the JSON files)."""
    subset: str = "stratified"
    """Which ``limit`` documents: ``stratified`` (a seeded sample, allocated over the strata named by
    the task YAML's ``metadata.stratify`` in proportion to their sizes, largest-remainder rounding,
    kept in test order; uniform when the task names none) or ``first`` (the first ``limit``
    documents, lm-eval's own rule: not representative when the file is ordered, as the synthetic
    world's is). See :mod:`apps.bolt.evaluation.subset`."""
    subset_seed: int = 0
    """Seed of the stratified subset; independent of ``seeds``, so every seed scores the same documents."""
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
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all documents), got {self.limit}")
        if self.subset not in ("stratified", "first"):
            raise ValueError(f"subset must be stratified or first, got {self.subset!r}")
        if self.subset_seed < 0:
            raise ValueError(f"subset_seed must be >= 0, got {self.subset_seed}")
        if self.max_gen_tokens < 1 or self.context_window < 0:
            raise ValueError("max_gen_tokens must be >= 1 and context_window >= 0")
