"""The EM driver: bootstrapping latent thoughts, composed from the pipeline stages.

    python -m apps.bolt.em config=apps/bolt/configs/em_synthetic.yaml [key=value ...]

Stages (each one its module's ``run(cfg)``, in this process or as jobs, each with its own folder
and marker, so a rerun skips what is complete and a crash resumes at the failed stage; training
resumes from its last checkpoint):

1. ``prepare``: raw corpora (validation, warmstart, bootstrap, eval tasks) into ``DUMP/data``;
2. ``tokenizer``: the synthetic world's small tokenizer (or the one named in the train config);
3. ``teacher``: warmstart latents from the teacher (the oracle in the synthetic world; GPT-4o-mini
   through the Batch API on the cluster) into ``DUMP/data/warmstart_latents``;
4. ``warmstart``: train on the teacher latents (``random`` layout);
5. for iteration t = 1..T: ``estep`` with the previous model (trial 0, as the reference) on the
   fixed bootstrap corpus into ``DUMP/data/iter{t}_latents``; ``mstep``: train every trial on them
   from the base initialization (``mstep_init=base``, as the reference; or ``previous``);
6. ``baselines``: raw-data runs with budgets computed, not hand-set: ``raw_token_match`` sees as
   many raw tokens as the M-step run did (its packed budget times the raw share of the latent
   data, measured), ``raw_flops_match`` the same number of packed tokens, i.e. the same FLOPs;
7. ``ablations``: an extra E-step + M-step at iteration 1 for each K in ``k_ablation``;
8. evaluation of every model (task accuracy, validation NLL per raw token, ELBO for latent
   models; :mod:`apps.bolt.em_eval`) and the results table (``results.json``, ``results.md``)
   and plots (``accuracy.png``, ``bootstrap.png``).

``executor: local`` (the default) runs every stage on this machine, ``local.jobs`` heavy processes
at once (:mod:`apps.bolt.em_local`; 1: one after another in this process). ``executor: slurm``
submits the heavy ones (training, E-step shards, evaluation, optionally the teacher) as jobs with
the resources of the ``slurm`` section, waits for them, and reads their outputs from disk; a
rerun re-attaches to jobs still running instead of submitting them again (:mod:`apps.bolt.em_exec`,
docs/cluster.md). Prepare, the E-step merge, budgets and the report always run here. Run
concurrently (slurm, ``local.jobs`` > 1): a group's trials; the K ablations (after the warmstart)
and the raw baselines (after iteration 1's E-step) beside the iterations.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apps.bolt.em_args import BASELINES, EMArgs, StageConfig  # noqa: F401  (re-exported)
from apps.bolt.em_exec import Branches, build_stages, final_consolidated
from lingua.args import ConfigError, cli_config, dc_replace, dump_config, load_config
from lingua.backends import require_installed
from lingua.errors import entry_point
from lingua.io import atomic_write_json, is_done, mark_done, write_jsonl

logger = logging.getLogger("apps.bolt.em")

class EMDriver:
    """Runs the stages in order; every stage is a method that skips itself when complete."""

    def __init__(self, cfg: EMArgs, jobs: Any = None):
        """``jobs``: the slurm executor's job backend (default :mod:`lingua.launch`; tests fake it)."""
        self.cfg = cfg
        self.root = Path(cfg.dump_dir)
        self.data = self.root / "data"
        self.runs = self.root / "runs"
        self.ledger = self.root / "stages.jsonl"
        self.tokenizer_changes: dict[str, Any] = {}  # the synthetic tokenizer, once trained
        self._tokenizer_args = None
        self._loaded: dict[Any, Any] = {}
        self.base_init = cfg.base_ckpt
        self.stages = build_stages(cfg.executor, self.root, cfg.slurm, jobs, cfg.local, cfg.device)
        self._ledger_lock = threading.Lock()
        self._budget_lock = threading.Lock()

    # -- bookkeeping --------------------------------------------------------------------------
    def _stage(self, name: str, done: Callable[[], bool], work: Callable[[], Any]) -> Any:
        if done():
            logger.info("[em] %s: complete, skipping", name)
            return None
        logger.info("[em] %s: running", name)
        t0, start = time.perf_counter(), time.time()
        result = work()
        seconds = round(time.perf_counter() - t0, 2)
        rec = {"stage": name, "seconds": seconds, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "start": round(start, 3), "end": round(time.time(), 3)}
        with self._ledger_lock, open(self.ledger, "a") as f:
            f.write(json.dumps(rec) + "\n")
        logger.info("[em] %s: done in %.1fs", name, seconds)
        return result

    def stage_seconds(self) -> dict[str, float]:
        if not self.ledger.is_file():
            return {}
        out: dict[str, float] = {}
        for line in self.ledger.read_text().splitlines():
            rec = json.loads(line)
            out[rec["stage"]] = out.get(rec["stage"], 0.0) + rec["seconds"]
        return out

    # -- stages -------------------------------------------------------------------------------
    def prepare_config(self):
        return dc_replace(self.loaded("prepare"), out_dir=str(self.data))

    def prepare(self) -> None:
        from apps.bolt import prepare

        pcfg = self.prepare_config()
        names = [pcfg.val.name, *(s.name for s in pcfg.subsets), *(e.name for e in pcfg.extra)]
        self._stage("prepare", lambda: all(is_done(self.data / n) for n in names), lambda: prepare.run(pcfg))

    def tokenizer(self) -> None:
        if not self.cfg.synthetic_tokenizer:
            return
        from apps.bolt.synthetic.tokenizer import get_synthetic_tokenizer

        targs = get_synthetic_tokenizer(self.cfg.tokenizer_cache)
        self.tokenizer_changes = {"tokenizer.name": targs.name, "tokenizer.path": targs.path,
                                  "tokenizer.special_tokens": list(targs.special_tokens)}
        self._tokenizer_args = None

    def tokenizer_args(self):
        """The tokenizer every model of the run uses (the train config's, or the synthetic one)."""
        if self._tokenizer_args is None:
            self._tokenizer_args = dc_replace(self.loaded("train"), self.tokenizer_changes).tokenizer
        return self._tokenizer_args

    # -- stage configs: each stage's YAML + overrides loaded once, then derived with typed values --
    def loaded(self, stage: str, extra: tuple[str, ...] = ()) -> Any:
        """The config of ``stage`` (prepare, teacher, train, estep, eval) as its YAML and the
        experiment's overrides give it, with placeholders for the paths the driver sets; cached.
        ``extra``: more overrides (the base model's ``base.overrides``)."""
        key = (stage, extra)
        if key not in self._loaded:
            section = getattr(self.cfg, stage)
            cls, required = _stage_class(stage)
            placeholders = [f"{k}=unset.{k}" for k in required]  # distinct, so checks like src != out pass
            try:
                self._loaded[key] = load_config(cls, section.config, [*section.overrides, *extra, *placeholders])
            except ConfigError as e:
                raise ConfigError(f"{stage} stage ({stage}.config / {stage}.overrides): {e}") from None
        return self._loaded[key]

    def check_stages(self) -> None:
        """Build every stage config the experiment will run (K ablations, baselines, base and
        evaluation included) before the first stage starts, so a bad setting fails in seconds,
        not after hours of training."""
        c = self.cfg
        self.prepare_config()
        self.teacher_config()
        self.tokenizer_args()
        if c.base.tokens:
            self.base_train_config(Path("unused"))
        self.train_config("check", "warmstart_latents", "random", c.warmstart_tokens, 0, c.base_ckpt)
        self.train_config("check", self.bootstrap_name, "raw", c.mstep_tokens, 0, c.base_ckpt)
        backends = {"estep.backend": self.estep_config("check", "unused").backend}
        for k in c.k_ablation:
            self.estep_config("check", "unused", k)
        for latent in (True, False):
            backends["eval.backend"] = self.eval_config("check", "unused", latent).tasks.backend
        if c.finetune_eval:
            self.finetune_config("check", "unused")
        require_installed(backends, 'estep.overrides=[backend=engine] eval.overrides=[backend=engine]')

    @property
    def bootstrap_name(self) -> str:
        """The raw corpus of the E-steps and of the raw baselines (a dataset of ``DUMP/data``)."""
        n = self.cfg.estep_docs
        return "bootstrap" if n is None else f"bootstrap_first{n}"

    def bootstrap(self) -> None:
        """With ``estep_docs``: write its first N documents (the E-step's document order and
        skip rules) as a dataset of their own."""
        if self.cfg.estep_docs is None:
            return
        from apps.bolt.estep import list_docs

        src, out = self.data / "bootstrap", self.data / self.bootstrap_name

        def work() -> None:
            records = [rec for _, rec in list_docs(src, limit=self.cfg.estep_docs)]
            write_jsonl(out / f"{self.bootstrap_name}.chunk.00.jsonl", records)
            mark_done(out, {"source": str(src), "first_docs": self.cfg.estep_docs, "docs": len(records),
                            "source_marker": _stamp(src)})

        self._stage(f"subset:{self.bootstrap_name}", lambda: is_done(out), work)

    def base(self) -> str:
        """The initialization of every run: the pretrained base when ``base.tokens`` > 0 (trained
        once into the cache, :mod:`apps.bolt.base_model`), else ``base_ckpt`` ("" = fresh)."""
        from apps.bolt import base_model

        b, init = self.cfg.base, self.cfg.base_ckpt
        if not b.tokens:
            return init
        tcfg = self.base_train_config(Path("unused"))
        r = base_model.recipe(tcfg, {s: _stamp(self.data / s) for s in sorted(b.sources)}, _stamp(Path(init)) if init else None)
        missing = [s for s, stamp in r["data"].items() if stamp is None]
        if missing:
            raise RuntimeError(f"base.sources {missing} are not complete datasets of {self.data}; add them to the prepare config")
        folder = base_model.base_folder(b.cache_dir, r)

        def train(run_dir: Path) -> tuple[Path, dict]:
            cfg = self.base_train_config(run_dir)
            self.stages.train("base", cfg, "train")
            return final_consolidated(run_dir)

        out: list[Path] = []
        self._stage("base", lambda: base_model.cached_base(folder, r) is not None,
                    lambda: out.append(base_model.get_base(folder, r, train)))
        atomic_write_json(self.root / "base.json", {"folder": str(folder), "recipe_hash": base_model.recipe_hash(r)})
        return str(out[0] if out else base_model.cached_base(folder, r))

    def base_train_config(self, run_dir: Path):
        """The base model's training run: the train template with ``base.overrides``, without the
        template's evaluation in training (meant for the experiment's own runs; not part of the
        base's recipe, so the cached base does not depend on it)."""
        b = self.cfg.base
        cfg = self.train_config("base", dict(b.sources), "raw", b.tokens, b.seed, self.cfg.base_ckpt, run_dir=run_dir,
                                extra=b.overrides)
        return dc_replace(cfg, eval=type(cfg.eval)())

    def teacher_config(self, src: str = "warmstart", out: str = "warmstart_latents"):
        """The teacher's config, writing thoughts for the dataset ``src`` into ``out`` (of ``DUMP/data``)."""
        return dc_replace(self.loaded("teacher"), {"src": str(self.data / src), "out": str(self.data / out), "progress": False})

    def teacher(self) -> None:
        out = self.data / "warmstart_latents"
        tcfg = self.teacher_config()
        self._stage("teacher", lambda: is_done(out), lambda: self.stages.teacher(tcfg))

    def train_config(self, name: str, source: str | dict[str, float], layout: str, tokens: int, seed: int,
                     init: str = "", run_dir: Path | None = None, extra: list[str] = ()):
        """The resolved config of one training run (warmstart, M-step, baseline or base); ``source``:
        a dataset of ``DUMP/data`` or a dict of datasets and weights."""
        sources = {source: 1.0} if isinstance(source, str) else dict(source)
        return dc_replace(self.loaded("train", tuple(extra)), {
            **self.tokenizer_changes,
            "name": name, "dump_dir": str(run_dir or self.runs / name), "data.root_dir": str(self.data),
            "data.sources": sources, "layout.name": layout, "num_tokens": tokens,
            "seed": seed, "data.seed": seed, "model.seed": seed, "checkpoint.init_ckpt_path": init,
        })

    def train_run(self, name: str, source: str, layout: str, tokens: int, seed: int, init: str = "",
                  extra: tuple[str, ...] = ()) -> Path:
        """Train one model; returns its consolidated folder. ``extra``: more train overrides."""
        tcfg = self.train_config(name, source, layout, tokens, seed, init, extra=extra)
        run_dir = Path(tcfg.dump_dir)
        final = run_dir / "final_consolidated.json"
        inputs = {"data": _stamp(self.data / source), "init": _stamp(Path(init)) if init else None}

        def work() -> None:
            self.stages.train(name, tcfg, "warmstart" if name.startswith("warmstart") else "train")
            folder, status = final_consolidated(run_dir)  # from disk, whichever executor ran it
            atomic_write_json(final, {"consolidated": str(folder), "inputs": inputs, "summary": status})

        def done() -> bool:
            if not final.is_file():
                return False
            saved = json.loads(final.read_text()).get("inputs")
            if saved != inputs:
                raise RuntimeError(
                    f"{run_dir} was trained on other inputs than the current ones ({saved} != {inputs}): an "
                    f"upstream stage was redone. Delete {run_dir} (and its evals) to retrain."
                )
            return True

        self._stage(f"train:{name}", done, work)
        return Path(json.loads(final.read_text())["consolidated"])

    def estep_config(self, name: str, ckpt: Path | str, k: int | None = None, changes: dict[str, Any] | None = None):
        """One E-step's config; ``k``: the K of an ablation (else the estep config's own);
        ``changes``: more values (dotted keys), e.g. ``{"limit_docs": 100}``."""
        derived: dict[str, Any] = {"ckpt": str(ckpt), "src": str(self.data / self.bootstrap_name),
                                   "out": str(self.data / f"{name}_latents"), "device": self.cfg.device}
        if k is not None:
            derived.update({"posterior.num_samples": k, "posterior.elbo_samples": [n for n in (1, 2, 4) if n <= k]})
        return dc_replace(self.loaded("estep"), {**derived, **(changes or {})})

    def estep_run(self, name: str, ckpt: Path, k: int | None = None, changes: dict[str, Any] | None = None) -> Path:
        ecfg = self.estep_config(name, ckpt, k, changes)
        self._stage(f"estep:{name}", lambda: is_done(ecfg.out), lambda: self.stages.estep(name, ecfg))
        return Path(ecfg.out)

    def eval_config(self, name: str, ckpt: Path | str, latent: bool):
        """The resolved config of one model's evaluation (:mod:`apps.bolt.em_eval`)."""
        from apps.bolt.em_eval import ModelEvalArgs

        c = self.cfg
        data_root = str(self.data) if c.eval_data_root is None else c.eval_data_root
        tasks = dc_replace(self.loaded("eval"), {"ckpt": str(ckpt), "data_root": data_root,
                                                 "variant": "latent" if latent else "raw", "device": c.device})
        estep = self.loaded("estep")  # the held-out ELBO samples thoughts as the E-step does
        cfg = ModelEvalArgs(
            name=name, ckpt=str(ckpt), latent=latent, out=str(self.root / "evals" / name), tasks=tasks,
            val_dir=str(self.data / "validation"), val_docs=c.eval_val_docs, elbo_docs=c.eval_elbo_docs,
            max_latent_tokens=estep.posterior.max_latent_tokens, device=c.device, chunk=estep.chunk,
        )
        cfg.validate()
        return cfg

    def finetune_config(self, name: str, ckpt: Path | str):
        """One model's finetuning evaluation (:mod:`apps.bolt.finetune`), in ``DUMP/finetune/<name>``."""
        return dc_replace(self.loaded("finetune"), ckpt=str(ckpt), out=str(self.root / "finetune" / name))

    def finetune_eval(self, name: str, ckpt: Path) -> dict:
        """``finetune_*`` columns of the model's row: accuracy (mean over samples) and its SE over
        problems, pass@k, maj@k, problems, samples per problem."""
        from apps.bolt.finetune import RESULT as FT_RESULT

        fcfg = self.finetune_config(name, ckpt)
        self._stage(f"finetune:{name}", lambda: is_done(fcfg.out), lambda: self.stages.finetune(name, fcfg))
        metrics = json.loads((Path(fcfg.out) / FT_RESULT).read_text())["metrics"]
        return {f"finetune_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def evaluate(self, name: str, ckpt: Path, latent: bool) -> dict:
        from apps.bolt.em_eval import RESULT

        ecfg = self.eval_config(name, ckpt, latent)
        self._stage(f"eval:{name}", lambda: is_done(ecfg.out), lambda: self.stages.evaluate(name, ecfg))
        return json.loads((Path(ecfg.out) / RESULT).read_text())

    # -- the loop -----------------------------------------------------------------------------
    def budget(self, latents: str, epochs: float, tokens: int) -> int:
        """Training tokens on the latent dataset ``latents``: ``epochs`` passes over it (measured,
        recorded in ``budgets.json``) when ``epochs`` > 0, else ``tokens``."""
        if epochs <= 0:
            return tokens
        from apps.bolt.em_report import raw_fraction

        path = self.root / "budgets.json"
        with self._budget_lock:  # concurrent branches: read, measure and write one at a time
            known = json.loads(path.read_text()) if path.is_file() else {}
            stamp = _stamp(self.data / latents)
            entry = known.get(latents)
            if entry is None or entry.get("stamp") != stamp or entry.get("epochs") != epochs:
                share = raw_fraction(self.tokenizer_args(), self.data / latents)
                entry = {"stamp": stamp, "epochs": epochs, "packed_tokens_per_epoch": share["packed_tokens"],
                         "raw_tokens_per_epoch": share["raw_tokens"], "tokens": int(round(epochs * share["packed_tokens"]))}
                known[latents] = entry
                atomic_write_json(path, known)
                logger.info("[em] budget for %s: %.2f epochs of %d packed tokens = %d tokens", latents, epochs,
                            share["packed_tokens"], entry["tokens"])
        return entry["tokens"]

    def init_for(self, trial: int, previous: Path | None) -> str:
        if self.cfg.mstep_init == "previous" and previous is not None:
            return str(previous)
        return self.base_init

    def trials(self, group: str, iteration: int | None, k: int | None, name: str, source: str, layout: str,
               tokens: int, init: Callable[[int], str], n: int | None = None) -> tuple[list[Path], list[dict]]:
        """Train and evaluate one model per trial (seed); returns their folders and result rows.
        With slurm or ``local.jobs`` > 1 the trials run concurrently, each one's stages in order."""
        latent = layout != "raw"

        def one(t: int) -> tuple[Path, dict]:
            run_name = f"{name}_t{t}"
            ck = self.train_run(run_name, source, layout, tokens, t, init(t))
            res = self.evaluate(run_name, ck, latent)
            if self.cfg.finetune_eval:
                res = {**res, **self.finetune_eval(run_name, ck)}
            return ck, {"group": group, "iteration": iteration, "k": k, "trial": t, "run": run_name, **res}

        done = self.concurrently([lambda t=t: one(t) for t in range(n or self.cfg.trials)])
        return [ck for ck, _ in done], [row for _, row in done]

    def concurrently(self, works: list[Callable[[], Any]]) -> list[Any]:
        """Results of ``works`` in order: one after another in this thread (the local executor
        with ``local.jobs`` 1), else in daemon threads that mostly wait on their processes or
        jobs (:class:`apps.bolt.em_exec.Branches`). The first failure is raised once every work
        has ended, so the others' finished stages are recorded."""
        branches = Branches(len(works) > 1 and self.stages.parallel)
        for w in works:
            branches.start(w)
        return branches.wait()

    def run(self) -> dict:
        from apps.bolt.em_report import write_report

        c = self.cfg
        self.check_stages()
        self.root.mkdir(parents=True, exist_ok=True)
        dump_config(c, self.root / "config.yaml")
        if c.threads > 0:
            import torch

            torch.set_num_threads(c.threads)
        self.prepare()
        self.tokenizer()
        self.bootstrap()
        self.teacher()
        self.base_init = base = self.base()
        # beside the main line (at once where the executor runs things concurrently, else after
        # it): the raw baselines need the latent data that sets their budget (iteration 1's, or
        # the teacher's without iterations), the K ablations only the warmstart
        side = Branches(self.stages.parallel)
        if c.baselines and not c.iterations:
            side.start(lambda: self.raw_baselines("warmstart_latents", base))
        warm, rows = self.trials("warmstart", 0, None, "warmstart", "warmstart_latents", "random",
                                 self.budget("warmstart_latents", c.warmstart_epochs, c.warmstart_tokens),
                                 lambda t: base, c.warmstart_trials or c.trials)
        for k in c.k_ablation:
            side.start(lambda k=k: self.ablation(k, warm[0], base))
        previous = warm
        k_main = self.loaded("estep").posterior.num_samples
        try:
            for it in range(1, c.iterations + 1):
                latents = self.estep_run(f"iter{it}", previous[0])
                if it == 1 and c.baselines:
                    side.start(lambda ref=latents.name: self.raw_baselines(ref, base))
                previous, new = self.trials("bootstrap", it, k_main, f"iter{it}", latents.name, "random",
                                            self.budget(latents.name, c.mstep_epochs, c.mstep_tokens),
                                            lambda t, before=previous: self.init_for(t, before[min(t, len(before) - 1)]))
                rows += new
            if c.final_estep:
                self.estep_run(f"iter{c.iterations + 1}", previous[0])
        except Exception as e:
            side.wait(e)  # raises e once the branches beside have ended
        rows += [row for branch in side.wait() for row in branch]  # in start order (a fixed one)
        return write_report(self.root, c.name, rows, self.stage_seconds())

    def ablation(self, k: int, warm: Path, base: str) -> list[dict]:
        """An extra iteration-1 E-step with K = ``k`` from the warmstart model ``warm``, its M-step."""
        c = self.cfg
        latents = self.estep_run(f"iter1_k{k}", warm, k)
        return self.trials(f"ablation_k{k}", 1, k, f"iter1_k{k}", latents.name, "random",
                           self.budget(latents.name, c.mstep_epochs, c.mstep_tokens), lambda t: base)[1]

    def raw_baselines(self, ref: str, base: str) -> list[dict]:
        """The raw-data runs, budgets measured on the latent dataset ``ref`` (module docstring)."""
        from apps.bolt.em_report import raw_fraction

        c = self.cfg
        share = raw_fraction(self.tokenizer_args(), self.data / ref)
        mstep = self.budget(ref, c.mstep_epochs, c.mstep_tokens)
        budgets = {"raw_token_match": int(mstep * share["raw_fraction"]), "raw_flops_match": mstep}
        atomic_write_json(self.root / "baseline_budgets.json", {**share, "budgets": budgets})
        per_baseline = self.concurrently([
            lambda b=b: self.trials(b, None, None, b, self.bootstrap_name, "raw", budgets[b], lambda t: base)[1]
            for b in c.baselines
        ])
        return [row for group in per_baseline for row in group]


def _stage_class(stage: str) -> tuple[type, list[str]]:
    """The config class of a stage and its required paths (set per run by the driver)."""
    if stage == "finetune":
        from apps.bolt.finetune import FinetuneArgs

        return FinetuneArgs, []
    if stage == "prepare":
        from apps.bolt.prepare import PrepareArgs

        return PrepareArgs, ["out_dir"]
    if stage == "teacher":
        from apps.bolt.gen_latents import GenLatentsArgs

        return GenLatentsArgs, ["src", "out"]
    if stage == "train":
        from apps.bolt.train import BoltTrainArgs

        return BoltTrainArgs, ["dump_dir"]
    if stage == "estep":
        from apps.bolt.estep import EStepArgs

        return EStepArgs, ["ckpt", "src", "out"]
    from apps.bolt.eval import EvalArgs

    return EvalArgs, ["ckpt"]


def _stamp(folder: Path) -> str | None:
    """Identity of a finished stage output: its completion marker's content (recipe, counts)."""
    from lingua.io import DONE_MARKER

    marker = folder / DONE_MARKER
    if not marker.is_file():
        return None
    import hashlib

    return hashlib.sha256(marker.read_bytes()).hexdigest()[:16]


def run(cfg: EMArgs, jobs: Any = None) -> dict:
    return EMDriver(cfg, jobs).run()


@entry_point("apps.bolt.em")
def main(argv: list[str] | None = None) -> None:
    run(cli_config(EMArgs, argv, "apps.bolt.em"))


if __name__ == "__main__":
    main()
