"""The data-condition comparison (the paper's first experiment), composed from the pipeline stages.

    python -m apps.bolt.compare config=apps/bolt/configs/compare_synthetic.yaml [key=value ...]

Five ways to spend the same training budget when raw data is scarce, each trained from the same
base model for the same number of tokens and evaluated at several checkpoints:

=================== ======================================================= ========
condition           training data                                           layout
=================== ======================================================= ========
``latent_thoughts`` the constrained raw documents + the teacher's thoughts  random
``raw_repeat``      the constrained raw documents, repeated                 raw
``raw_fresh``       fresh documents (not data-constrained: the upper line)  raw
``wrap_orig``       the teacher's paraphrases of the constrained documents  pure
                    (4 styles, several passes; WRAP)
``wrap_cot``        paraphrases with the reasoning written in (WRAP-CoT)    pure
=================== ======================================================= ========

Stages, each skipped when complete and safe to rerun (the EM driver's, :mod:`apps.bolt.em`, on
the same folder layout): ``prepare`` (the constrained set, the fresh documents, the evaluation
tasks), the tokenizer, the ``base`` model, one ``teacher:<condition>`` per synthetic condition
(``gen_latents`` with the condition's teacher config), ``scan`` (tokens and leakage of every
condition's data: :mod:`apps.bolt.compare_data`), then one training run per condition and trial
with its evaluations in training (at ``eval_tokens``, ``eval.must_eval_tokens``), and the report
(:mod:`apps.bolt.compare_report`): ``results.json``, ``results.md``, ``conditions.csv`` and
``compare.png`` (accuracy against training tokens and against effective raw tokens).

Every condition gets the same ``train_tokens``. A condition's *effective raw tokens* at a
checkpoint are its training tokens divided by its synthetic-to-raw ratio, measured from its data
(packed tokens per pass over the constrained documents / their raw tokens), as the reference's
plots do. Runs execute as the EM driver's do (``executor``, ``local.jobs``), so the comparison
uses every core, or slurm.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.bolt.base_model import BaseArgs
from apps.bolt.em import EMArgs, EMDriver, StageConfig
from apps.bolt.em_exec import EXECUTORS, LocalArgs, SlurmArgs
from lingua.args import ConfigError, cli_config, dc_replace, dump_config, load_config
from lingua.errors import entry_point
from lingua.io import is_done

logger = logging.getLogger("apps.bolt.compare")

CONDITIONS: dict[str, tuple[str, bool]] = {
    # condition -> (training layout, built by a teacher from the constrained documents)
    "latent_thoughts": ("random", True),
    "raw_repeat": ("raw", False),
    "raw_fresh": ("raw", False),
    "wrap_orig": ("pure", True),
    "wrap_cot": ("pure", True),
}


def _teachers() -> dict[str, StageConfig]:
    return {"latent_thoughts": StageConfig("apps/bolt/configs/gen_oracle_warmstart.yaml"),
            "wrap_orig": StageConfig("apps/bolt/configs/gen_oracle_wrap.yaml"),
            "wrap_cot": StageConfig("apps/bolt/configs/gen_oracle_wrap_cot.yaml")}


@dataclass
class CompareArgs:
    name: str = "compare"
    dump_dir: str = "runs/compare"
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    trials: int = 1
    """Seeds 0..trials-1 of every condition's training run."""
    train_tokens: int = 2_000_000
    """Packed training tokens of every run, whatever the condition (the reference: 8e9)."""
    eval_tokens: list[int] = field(default_factory=list)
    """Training tokens at which each run is also evaluated (rounded to steps); the final step
    always is."""
    constrained: str = "warmstart"
    """The data-constrained raw documents: a dataset of ``DUMP/data`` (made by ``prepare``)."""
    fresh: str = "fresh"
    """Fresh raw documents for ``raw_fresh``: a dataset of ``DUMP/data``; it should hold at least
    ``train_tokens`` (the scan reports how many passes the run makes over it)."""
    teachers: dict[str, StageConfig] = field(default_factory=_teachers)
    """Teacher config of each synthetic condition (``gen_latents``; ``src``/``out`` are set here)."""
    eval_tasks: dict[str, str] = field(default_factory=dict)
    """Evaluation tasks of a condition when not the train config's ``eval.tasks`` (e.g. the
    chain-of-thought prompt for ``wrap_cot``)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Names of conditions in the figure and ``conditions.csv`` (default: the condition names), e.g.
    to plot a variant next to the main comparison."""
    final_tasks: dict[str, str] = field(default_factory=dict)
    """Another prompt for a condition's final models (e.g. the chain-of-thought prompt for the raw
    conditions, the direct one for WRAP-CoT): checks that the comparison does not hinge on the
    prompt format. Same harness settings as the in-training evaluations; evaluated in the
    driver's process; the report's "other prompts" table."""
    leakage_check: str = ""
    """``module:function(eval_dir) -> scanner`` that finds evaluation problems in text (the
    synthetic world's :func:`apps.bolt.compare_data.synthetic_leakage`); empty: not scanned."""
    base_ckpt: str = ""
    base: BaseArgs = field(default_factory=BaseArgs)
    """The base model every run starts from (:mod:`apps.bolt.base_model`), as in the EM driver."""
    synthetic_tokenizer: bool = True
    tokenizer_cache: str = ".cache/synthetic"
    threads: int = 0
    device: str = "cpu"
    executor: str = "local"
    slurm: SlurmArgs = field(default_factory=SlurmArgs)
    local: LocalArgs = field(default_factory=LocalArgs)
    prepare: StageConfig = field(default_factory=lambda: StageConfig("apps/bolt/configs/prepare_compare_synthetic.yaml"))
    train: StageConfig = field(default_factory=lambda: StageConfig("apps/bolt/configs/train_compare_synthetic.yaml"))

    def validate(self) -> None:
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown or not self.conditions or len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"conditions must be distinct names of {list(CONDITIONS)}, got {self.conditions}")
        missing = [c for c in self.conditions if CONDITIONS[c][1] and c not in self.teachers]
        if missing:
            raise ValueError(f"teachers: no teacher config for {missing}")
        if self.trials < 1 or self.train_tokens <= 0:
            raise ValueError("trials >= 1 and train_tokens > 0 are required")
        if any(not 0 < t < self.train_tokens for t in self.eval_tokens):
            raise ValueError(f"eval_tokens must lie in (0, train_tokens={self.train_tokens}), got {self.eval_tokens}")
        for name in ("eval_tasks", "final_tasks", "labels"):
            unknown = sorted(set(getattr(self, name)) - set(CONDITIONS))
            if unknown:
                raise ValueError(f"{name}: unknown conditions {unknown}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        self.base.validate()

    def em_args(self) -> EMArgs:
        """The EM driver's settings for the stages this driver borrows (no EM loop runs)."""
        return EMArgs(
            name=self.name, dump_dir=self.dump_dir, iterations=0, trials=self.trials, baselines=[],
            base_ckpt=self.base_ckpt, base=self.base, synthetic_tokenizer=self.synthetic_tokenizer,
            tokenizer_cache=self.tokenizer_cache, threads=self.threads, device=self.device,
            executor=self.executor, slurm=self.slurm, local=self.local, prepare=self.prepare, train=self.train,
        )


class CompareDriver:
    """The comparison's stages; prepare, tokenizer, base model, training runs and the stage
    ledger are the EM driver's (one owner for the folder layout and the resume rules)."""

    def __init__(self, cfg: CompareArgs, jobs: Any = None):
        self.cfg = cfg
        self.em = EMDriver(cfg.em_args(), jobs)
        self.root, self.data = self.em.root, self.em.data

    def source(self, condition: str) -> str:
        """The dataset of ``DUMP/data`` a condition trains on."""
        if condition == "raw_repeat":
            return self.cfg.constrained
        if condition == "raw_fresh":
            return self.cfg.fresh
        return f"{condition}_data"

    def teacher_config(self, condition: str):
        from apps.bolt.gen_latents import GenLatentsArgs

        section = self.cfg.teachers[condition]
        paths = [f"src={self.data / self.cfg.constrained}", f"out={self.data / self.source(condition)}"]
        try:
            return dc_replace(load_config(GenLatentsArgs, section.config, [*section.overrides, *paths]), progress=False)
        except ConfigError as e:
            raise ConfigError(f"teachers.{condition} ({section.config}): {e}") from None

    def train_config(self, condition: str, trial: int, run_dir: Path | None = None):
        layout = CONDITIONS[condition][0]
        return self.em.train_config(f"{condition}_t{trial}", self.source(condition), layout, self.cfg.train_tokens,
                                    trial, self.em.base_init, run_dir, extra=self.eval_overrides(condition))

    def eval_overrides(self, condition: str) -> tuple[str, ...]:
        """The in-training evaluation of a condition's runs: its tasks, the data root, and the
        checkpoints (``eval.must_eval_tokens``: the trainer turns them into steps of its batch)."""
        out = [f"eval.data_root={self.data}", f"eval.must_eval_tokens=[{','.join(map(str, self.cfg.eval_tokens))}]"]
        if condition in self.cfg.eval_tasks:
            out.append(f"eval.tasks={self.cfg.eval_tasks[condition]}")
        return tuple(out)

    def check(self) -> None:
        """Build every stage config before the first stage runs: a bad setting fails in seconds."""
        self.em.prepare_config()
        self.em.tokenizer_args()
        for c in self.cfg.conditions:
            if CONDITIONS[c][1]:
                self.teacher_config(c)
            tcfg = self.train_config(c, 0, Path("unused"))
            if not tcfg.eval.tasks:
                raise ConfigError(f"condition {c}: its runs evaluate no task (set eval.tasks in the train config or eval_tasks.{c})")

    def run(self) -> dict:
        from apps.bolt import compare_data, compare_report

        c = self.cfg
        c.validate()
        self.check()
        self.root.mkdir(parents=True, exist_ok=True)
        dump_config(c, self.root / "compare_config.yaml")
        if c.threads > 0:
            import torch

            torch.set_num_threads(c.threads)
        self.em.prepare()
        self.em.tokenizer()
        for cond in c.conditions:
            if CONDITIONS[cond][1]:
                tcfg = self.teacher_config(cond)
                self.em._stage(f"teacher:{cond}", lambda out=tcfg.out: is_done(out), lambda t=tcfg: self.em.stages.teacher(t))
        scan = compare_data.scan_stage(self, self.em.tokenizer_args())
        self.em.base_init = self.em.base()
        works = [lambda cond=cond, t=t: self.train(cond, t) for t in range(c.trials) for cond in c.conditions]
        runs = self.em.concurrently(works)
        others = [o for o in (self.other_prompt(r) for r in runs) if o is not None]
        limit = self.em.loaded("train").eval.harness.limit
        return compare_report.write_report(self.root, c, scan, runs, self.em.stage_seconds(), limit, others)

    def train(self, condition: str, trial: int) -> dict:
        """One condition's run for one seed; returns where it lives."""
        name = f"{condition}_t{trial}"
        layout = CONDITIONS[condition][0]
        self.em.train_run(name, self.source(condition), layout, self.cfg.train_tokens, trial, self.em.base_init,
                          extra=self.eval_overrides(condition))
        return {"condition": condition, "trial": trial, "run": name, "run_dir": str(self.em.runs / name)}


    def other_prompt(self, run: dict) -> dict | None:
        """The final model of ``run`` on its condition's ``final_tasks`` (None: none asked)."""
        tasks = self.cfg.final_tasks.get(run["condition"])
        if not tasks:
            return None
        from apps.bolt import eval as bolt_eval
        from apps.bolt.em_eval import task_accuracy

        out = self.root / "evals" / f"{run['run']}-{tasks.replace(',', '+')}"
        harness = self.em.loaded("train").eval.harness
        ecfg = bolt_eval.EvalArgs(ckpt=run["run_dir"], tasks=tasks, data_root=str(self.data), harness=harness,
                                  device=self.cfg.device, out_dir=str(out), metrics_file="none")
        ecfg.validate()
        self.em._stage(f"eval:{run['run']}:{tasks}", lambda: is_done(out), lambda: bolt_eval.run(ecfg))
        summary = json.loads((out / "summary.json").read_text())
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        accuracy = task_accuracy(summary, names)
        return {**{k: run[k] for k in ("condition", "trial", "run")}, "tasks": tasks,
                "accuracy": sum(accuracy.values()) / len(accuracy)}


def run(cfg: CompareArgs, jobs: Any = None) -> dict:
    return CompareDriver(cfg, jobs).run()


@entry_point("apps.bolt.compare")
def main(argv: list[str] | None = None) -> None:
    run(cli_config(CompareArgs, argv, "apps.bolt.compare"))


if __name__ == "__main__":
    main()
