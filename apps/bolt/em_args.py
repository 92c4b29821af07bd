"""The EM driver's configuration (:class:`EMArgs`): what ``python -m apps.bolt.em config=...``
reads. The driver itself is :mod:`apps.bolt.em`, which re-exports these names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from apps.bolt.base_model import BaseArgs
from apps.bolt.em_exec import EXECUTORS, LocalArgs, SlurmArgs

BASELINES = ("raw_token_match", "raw_flops_match")


@dataclass
class StageConfig:
    """A stage's YAML config plus overrides; the driver adds the paths and budgets it derives."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class EMArgs:
    name: str = "em"
    dump_dir: str = "runs/em"
    iterations: int = 2
    trials: int = 1
    """Seeds 0..trials-1 for every training run (the E-step uses trial 0's model, as the reference)."""
    warmstart_tokens: int = 200_000
    """Packed training tokens of the warmstart run (the reference: 0.8e9)."""
    mstep_tokens: int = 400_000
    """Packed training tokens of each M-step run (the reference: 13e9)."""
    warmstart_epochs: float = 0.0
    """When > 0: the warmstart budget is this many passes over the teacher's latent data, measured
    in packed tokens (``random`` layout, this run's tokenizer); overrides ``warmstart_tokens``."""
    mstep_epochs: float = 0.0
    """When > 0: each M-step's budget is this many passes over its own E-step's latent data (the
    reference: about 2), measured like ``warmstart_epochs``; overrides ``mstep_tokens``. The raw
    baselines then get the same number of passes over the raw bootstrap text (token-matched) and
    the iteration-1 M-step's budget (FLOP-matched). Budgets are recorded in ``budgets.json``."""
    mstep_init: str = "base"
    """base: every M-step starts from the base initialization (the reference); previous: from the
    previous iteration's model."""
    base_ckpt: str = ""
    """Consolidated base model (e.g. imported TinyLlama); empty: a fresh seeded initialization."""
    base: BaseArgs = field(default_factory=BaseArgs)
    """Pretrain a base model once (cached across experiments) and start every run from it: the
    TinyLlama analog of the synthetic world (:mod:`apps.bolt.base_model`). Off when tokens is 0."""
    final_estep: bool = False
    """Also run an E-step with the last model (``iter{T+1}_latents``, no M-step on it): measures the
    thoughts the last iteration writes (latent quality per iteration, including the last; with
    ``iterations: 0``, the warmstart's). In the results' E-step table."""
    warmstart_trials: int = 0
    """Warmstart runs to train (seeds 0..n-1); 0: ``trials``. The E-steps use trial 0's, so 1
    saves the other trials' cost when the warmstart's own spread is not wanted."""
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    k_ablation: list[int] = field(default_factory=list)
    """Extra iteration-1 E-step + M-step with these K (e.g. [1])."""
    estep_docs: int | None = None
    """Use only the first N bootstrap documents (toy runs; None: all). They are written once as
    their own dataset, ``bootstrap_first{N}``, which both the E-steps and the raw baselines read:
    the M-steps and the baselines see the same raw text, as in the reference."""
    synthetic_tokenizer: bool = True
    """Train the synthetic world's tokenizer (else the train config's tokenizer is used)."""
    tokenizer_cache: str = ".cache/synthetic"
    eval_val_docs: int = 100
    """Held-out raw documents for validation NLL."""
    eval_elbo_docs: int = 20
    """Held-out documents for the ELBO of latent models (0: skip)."""
    eval_data_root: str | None = None
    """``data_root`` of the task evaluation; None: this run's data folder (the synthetic world's
    tasks are prepared there); "": the Hugging Face Hub; a folder: local copies of hub datasets."""
    threads: int = 0
    """CPU intra-op threads for the in-process stages (``torch.set_num_threads``); 0 keeps torch's
    default. On a small shared CPU, 1 avoids OpenMP threads spinning against other work."""
    device: str = "cpu"
    """Device of the models in the stages (in the jobs, with ``executor: slurm``)."""
    executor: str = "local"
    """``local``: every stage on this machine (see ``local``); ``slurm``: heavy stages as jobs."""
    slurm: SlurmArgs = field(default_factory=SlurmArgs)
    local: LocalArgs = field(default_factory=LocalArgs)
    """With ``executor: local``: ``local.jobs`` heavy processes at once (0: one per CPU core; 1:
    training and evaluation in this process, one stage after another) and the E-step as
    ``local.estep_procs`` shard processes, merged as on a cluster (:mod:`apps.bolt.em_local`)."""
    prepare: StageConfig = field(default_factory=lambda: StageConfig("apps/bolt/configs/prepare_synthetic.yaml"))
    teacher: StageConfig = field(default_factory=lambda: StageConfig("apps/bolt/configs/gen_oracle_warmstart.yaml"))
    train: StageConfig = field(default_factory=lambda: StageConfig("apps/bolt/configs/train_em_synthetic.yaml"))
    estep: StageConfig = field(default_factory=lambda: StageConfig("apps/bolt/configs/estep_synthetic.yaml"))
    eval: StageConfig = field(default_factory=lambda: StageConfig("apps/bolt/configs/eval_synthetic.yaml"))
    finetune_eval: bool = False
    """Also finetune every model (warmstart, iterations, ablations, raw baselines) on the task's
    train split and evaluate it by sampling (:mod:`apps.bolt.finetune`: the paper's headline
    metric); the results table gets its columns."""
    finetune: StageConfig = field(default_factory=lambda: StageConfig("apps/bolt/configs/finetune_synthetic.yaml"))

    def validate(self) -> None:
        if self.iterations < 0 or self.trials < 1:
            raise ValueError("iterations >= 0 and trials >= 1 are required")
        if self.mstep_init not in ("base", "previous"):
            raise ValueError(f"mstep_init must be base or previous, got {self.mstep_init!r}")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; known: {BASELINES}")
        if self.warmstart_tokens <= 0 or self.mstep_tokens <= 0:
            raise ValueError("warmstart_tokens and mstep_tokens must be positive")
        if self.warmstart_epochs < 0 or self.mstep_epochs < 0:
            raise ValueError("warmstart_epochs and mstep_epochs must be >= 0 (0: use the token budgets)")
        if any(k < 1 for k in self.k_ablation):
            raise ValueError(f"k_ablation: every K must be >= 1, got {self.k_ablation}")
        if self.estep_docs is not None and self.estep_docs < 1:
            raise ValueError(f"estep_docs must be >= 1 (or null: all documents), got {self.estep_docs}")
        if not 0 <= self.warmstart_trials <= self.trials:
            raise ValueError(f"warmstart_trials must be in 0..trials ({self.trials}), got {self.warmstart_trials}")
        self.base.validate()
        if self.base.tokens and self.base_ckpt and not Path(self.base_ckpt).exists():
            raise ValueError(f"base_ckpt {self.base_ckpt} does not exist")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
