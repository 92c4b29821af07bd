"""The training run's configuration (:class:`TrainArgs` and its ``eval`` / ``val`` sections) and
what may change when a run resumes (:func:`check_resume_config`). The loop is
:mod:`lingua.trainer`, which re-exports these names.

Resuming with other settings: the resumed checkpoint's ``config.yaml`` is compared with the new
config. Keys that only change how the run is watched or executed may change freely
(``TrainArgs.RESUME_SAFE``: name, dump_dir, stop_at_step, log_freq, ``eval.*``, evals, ``val.*``,
``checkpoint.*``, ``logging.*``, ``distributed.*`` (data shards are checked on their own),
data prefetching). Any other change (learning rate, schedule, steps or
token budget, batch, data, model, tokenizer, seeds, layout) alters the run from there on, so it is
refused with one line listing the keys, unless ``checkpoint.allow_config_change=true``: then it is
appended to ``config_changes.jsonl`` (step, old and new values) and the config that trained up to
that step is kept as ``config.<step>.yaml``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Collection
from typing import Any, ClassVar

from lingua.args import ConfigError
from lingua.checkpoint import CONFIG, CheckpointArgs
from lingua.data import DataArgs
from lingua.distributed import DistributedArgs
from lingua.io import atomic_write_text
from lingua.metrics import LoggingArgs
from lingua.optim import OptimArgs
from lingua.tokenizer import TokenizerArgs
from lingua.transformer import TransformerArgs

logger = logging.getLogger("lingua.trainer")

EVAL_MODES = ("inprocess", "launch")

@dataclass
class ValArgs:
    source: str = ""
    """Held-out source (a subfolder of ``data.root_dir``) for validation loss; empty: none."""
    every: int = 0
    """Validate every N steps (0: only at the end) when ``source`` is set."""
    batches: int = 4
    """Batches per data shard in one validation (always the first ones: comparable over time)."""
    format: str = "text"
    """Registered formatter for the held-out documents. The default reads them as plain text,
    whatever the training layout: held-out sets are raw documents, and a latent layout would
    reject every one of them. ``train`` uses the training formatter (``format_fn`` / ``data.format``)."""

    def validate(self) -> None:
        if self.every < 0 or self.batches < 1:
            raise ValueError(f"val.every must be >= 0 and val.batches >= 1, got {self.every}, {self.batches}")


@dataclass
class EvalArgs:
    """When the eval hooks run (the ``eval`` section). An app extends it with what to evaluate
    (BoLT: :class:`apps.bolt.evaluation.in_training.InTrainingEvalArgs`)."""

    every: int = 0
    """Run the eval hooks every N steps (0: only at ``must_eval_steps`` and the final step)."""
    must_eval_steps: list[int] = field(default_factory=list)
    """Steps evaluated whatever ``every`` says (the hooks, and the core validation when
    ``val.source`` is set); a checkpoint is saved at each of them too. The final step is always
    evaluated."""
    must_eval_tokens: list[int] = field(default_factory=list)
    """Training tokens at which to evaluate as well (curves over tokens that do not depend on the
    batch or the number of GPUs): each is the step whose tokens reach it, ``tokens // (global
    batch x seq_len)`` (at least 1), resolved when the run knows its global batch; from then on a
    must-evaluate step like the others."""
    keep_checkpoints: bool = True
    """Cleanup never removes the checkpoints of ``must_eval_steps`` (false: it may once their
    evaluation is recorded, like any other checkpoint)."""
    mode: str = "inprocess"
    """``inprocess``: the hooks evaluate the live model, their results go into the step's metrics
    row. ``launch``: the hooks start a job that evaluates the step's checkpoint (so every
    evaluation step saves one); its pending record stays until the job has recorded its result."""

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0, got {self.every}")
        bad = [s for s in self.must_eval_steps if s < 1]
        if bad:
            raise ValueError(f"must_eval_steps must be steps >= 1, got {bad}")
        if any(t < 1 for t in self.must_eval_tokens):
            raise ValueError(f"must_eval_tokens must be token counts >= 1, got {self.must_eval_tokens}")
        if self.mode not in EVAL_MODES:
            raise ValueError(f"mode must be one of {EVAL_MODES}, got {self.mode!r}")

    def is_eval_step(self, step: int, total_steps: int, must: Collection[int]) -> bool:
        """Every ``every`` steps, the must-evaluate steps (``must``: the run's, ``must_eval_steps``
        and the resolved ``must_eval_tokens``) and the final step."""
        return step == total_steps or step in must or bool(self.every and step % self.every == 0)

    def token_steps(self, tokens_per_step: int) -> set[int]:
        """The steps of ``must_eval_tokens`` for a run of ``tokens_per_step`` tokens per step."""
        return {max(1, t // tokens_per_step) for t in self.must_eval_tokens}


@dataclass
class TrainArgs:
    name: str = "run"
    """Run name (log labels; the wandb run is named after it, its id adds a hash of the run folder)."""
    dump_dir: str = ""
    """Run folder; required. Rerunning with the same folder resumes."""
    seed: int = 42
    """Seeds the process RNGs (derived per rank). Weights use ``model.seed``, data ``data.seed``."""
    steps: int = 1000
    """Optimizer steps, unless ``num_tokens`` is set."""
    num_tokens: int = 0
    """Token budget (> 0 overrides ``steps``): steps = num_tokens // (global batch * seq_len)."""
    grad_acc_steps: int = 1
    """Micro-batches per data shard per optimizer step."""
    grad_clip: float = 1.0
    """Max global gradient norm, applied once per optimizer step (<= 0: no clipping)."""
    stop_at_step: int = 0
    """Stop after this step (saving a checkpoint) without finishing, e.g. to fit a time-limited
    allocation; rerunning with the same ``dump_dir`` resumes. 0: run to the end."""
    log_freq: int = 10
    """Log metrics every N steps (and at the last step)."""
    evals: list[str] = field(default_factory=list)
    """Names of registered eval hooks (``register_eval_hook``) to run."""
    eval: EvalArgs = field(default_factory=EvalArgs)
    """When the eval hooks run: ``eval.every``, ``eval.must_eval_steps``, ``eval.mode``."""
    val: ValArgs = field(default_factory=ValArgs)
    model: TransformerArgs = field(default_factory=TransformerArgs)
    data: DataArgs = field(default_factory=DataArgs)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)

    RESUME_SAFE: ClassVar[tuple[str, ...]] = (
        "name", "dump_dir", "stop_at_step", "log_freq", "eval", "evals", "val", "checkpoint", "logging",
        "distributed", "data.prefetch", "data.prefetch_depth",
    )
    """Keys (a section name covers its keys) that may change when a run resumes: they change how
    it is watched, saved or executed, not what it computes. See the module docstring."""

    def validate(self) -> None:
        if not self.dump_dir:
            raise ValueError("dump_dir is required (the run folder)")
        if self.steps < 1 and self.num_tokens <= 0:
            raise ValueError(f"steps must be >= 1 (or set num_tokens), got {self.steps}")
        if self.grad_acc_steps < 1 or self.log_freq < 1:
            raise ValueError("grad_acc_steps and log_freq must be >= 1")
        if self.data.seq_len > self.model.max_seqlen:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seqlen={self.model.max_seqlen}")

    def global_batch(self, data_shards: int) -> int:
        """Sequences per optimizer step."""
        return self.data.batch_size * data_shards * self.grad_acc_steps

    def total_steps(self, data_shards: int) -> int:
        if self.num_tokens <= 0:
            return self.steps
        steps = self.num_tokens // (self.global_batch(data_shards) * self.data.seq_len)
        if steps < 1:
            raise ConfigError(f"num_tokens={self.num_tokens} is less than one step of {self.global_batch(data_shards)}x{self.data.seq_len} tokens")
        return steps


CONFIG_CHANGES = "config_changes.jsonl"
"""Run-folder log of the settings changed on resume with ``checkpoint.allow_config_change``."""
_ABSENT = object()


def _leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the config's fields (a dict-valued field, e.g. ``data.sources``, is one key)."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        keys += _leaf_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return keys


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def check_resume_config(cfg: TrainArgs, run_dir: Path, resume_dir: Path, config_yaml: str, is_main: bool) -> None:
    """Refuse (or, with ``checkpoint.allow_config_change``, record) settings that differ from the
    ones the resumed checkpoint was trained with; see the module docstring."""
    import yaml

    saved_text = (resume_dir / CONFIG).read_text()
    old, new = yaml.safe_load(saved_text) or {}, yaml.safe_load(config_yaml)
    safe = type(cfg).RESUME_SAFE
    changed = {}
    for key in _leaf_keys(cfg):
        if any(key == s or key.startswith(s + ".") for s in safe):
            continue
        before, after = _lookup(old, key), _lookup(new, key)
        if before is not _ABSENT and before != after:  # absent: a key added since the run started
            changed[key] = {"old": before, "new": after}
    if not changed:
        return
    step = json.loads((resume_dir / "train_state.json").read_text())["step"]
    shown = ", ".join(f"{k} {v['old']!r} -> {v['new']!r}" for k, v in changed.items())
    if not cfg.checkpoint.allow_config_change:
        raise ConfigError(
            f"{run_dir} resumes at step {step} with changed settings: {shown}; restore them, use a new dump_dir, "
            f"or pass checkpoint.allow_config_change=true to continue with them (recorded in {CONFIG_CHANGES})"
        )
    logger.warning("resuming at step %d with changed settings (allowed): %s", step, shown)
    if is_main:
        atomic_write_text(run_dir / f"config.{step}.yaml", saved_text)  # the config of steps 1..step
        record = {"step": step, "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "checkpoint": str(resume_dir), "changes": changed}
        with open(run_dir / CONFIG_CHANGES, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
