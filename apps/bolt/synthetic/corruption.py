"""The corruption study: what share of wrong thoughts can an M-step afford?

    python -m apps.bolt.synthetic.corruption em=apps/bolt/configs/em_science.yaml rates=[0,0.2,0.4,0.6]

Uses an EM config for everything it shares with the EM run (data, base model, training and
evaluation settings, the M-step budget): the bootstrap corpus gets the oracle's latents, a share
``rate`` of its chunks with a thought is made wrong (:mod:`apps.bolt.synthetic.corrupt`), and an
M-step is trained on each version from the same initialization as the EM run's M-steps. Each
model is evaluated like every EM model (accuracy, thought correctness on the evaluation
problems) and runs a small E-step on bootstrap documents, which measures its *thought
dependence*: the log-weight gap between right and wrong posterior samples
(:mod:`apps.bolt.latent_quality`). Results: ``DUMP/corruption/results.{json,md}``; every stage is
one of the EM driver's, so a rerun skips what is complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lingua.args import cli_config, load_config
from lingua.errors import entry_point
from lingua.io import (
    atomic_write_json,
    atomic_write_text,
    is_done,
    mark_done,
    read_jsonl,
    write_jsonl,
)

logger = logging.getLogger("apps.bolt.em")


@dataclass
class CorruptionArgs:
    em: str = "apps/bolt/configs/em_science.yaml"
    """The EM config whose data, base, training, evaluation and M-step budget are used."""
    em_overrides: list[str] = field(default_factory=list)
    rates: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6])
    trials: int = 0
    """Seeds per rate (0: the EM config's ``trials``)."""
    seed: int = 0
    """Seed of which chunks are corrupted and how (the same for every rate: nested sets)."""
    gap_docs: int = 100
    """Bootstrap documents of each model's thought-dependence E-step (0: skip)."""

    def validate(self) -> None:
        if not self.rates or any(not 0.0 <= r <= 1.0 for r in self.rates):
            raise ValueError(f"rates must be a non-empty list in [0, 1], got {self.rates}")
        if self.trials < 0 or self.gap_docs < 0:
            raise ValueError("trials >= 0 and gap_docs >= 0 are required")


def _name(rate: float) -> str:
    return f"corrupt{round(rate * 100):03d}"


def run(cfg: CorruptionArgs) -> dict:
    from apps.bolt.em import EMArgs, EMDriver
    from apps.bolt.em_report import estep_quality
    from apps.bolt.synthetic.corrupt import corrupt_records

    em = load_config(EMArgs, cfg.em, cfg.em_overrides)
    d = EMDriver(em)
    d.check_stages()
    d.root.mkdir(parents=True, exist_ok=True)
    if em.threads > 0:
        import torch

        torch.set_num_threads(em.threads)
    d.prepare()
    d.tokenizer()
    d.bootstrap()
    base = d.base_init = d.base()
    oracle = d.data / "bootstrap_oracle_latents"
    tcfg = d.teacher_config(d.bootstrap_name, oracle.name)
    d._stage("teacher:bootstrap_oracle", lambda: is_done(oracle), lambda: d.stages.teacher(tcfg))
    rows = []
    for rate in cfg.rates:
        name = _name(rate)
        out = d.data / f"{name}_latents"

        def write(out: Path = out, rate: float = rate) -> None:
            recs = [r for f in sorted(oracle.glob("*.jsonl")) for r in read_jsonl(f)]
            n = write_jsonl(out / f"{out.name}.chunk.00.jsonl", corrupt_records(recs, rate, cfg.seed))
            mark_done(out, {"source": str(oracle), "rate": rate, "seed": cfg.seed, "docs": n})

        d._stage(f"corrupt:{name}", lambda out=out: is_done(out), write)
        ckpts, new = d.trials(f"corrupt_{rate:g}", None, None, name, out.name, "random", em.mstep_tokens,
                              lambda t: base, cfg.trials or em.trials)
        for row in new:
            row["rate"] = rate
        rows += new
        if cfg.gap_docs:
            d.estep_run(f"{name}_gap", ckpts[0], changes={"limit_docs": cfg.gap_docs})
    return write_results(d.root / "corruption", rows, estep_quality(d.data), cfg)


def write_results(out: Path, rows: list[dict], quality: dict, cfg: CorruptionArgs) -> dict:
    from apps.bolt.em_report import aggregate

    lines = aggregate(rows)
    for line in lines:
        rate = float(line["group"].split("_", 1)[1])
        line["rate"] = rate
        line["gap_estep"] = quality.get(f"{_name(rate)}_gap_latents")
    header = "| wrong thoughts | trials | accuracy | thoughts right (eval) | own E-step: right | SIR / uniform | log-weight gap | right beats wrong |"
    body = [header, "|" + "---|" * 8]
    for ln in sorted(lines, key=lambda x: x["rate"]):
        q = ln["gap_estep"] or {}
        sel = q.get("selector", {})

        def f(x, fmt=".3f") -> str:
            return "-" if x is None else format(x, fmt)

        acc = f(ln.get("accuracy")) + (f" ± {ln['accuracy_se']:.3f}" if ln.get("accuracy_se") is not None else "")
        body.append(f"| {ln['rate']:.0%} | {ln['trials']} | {acc} | {f(ln.get('thought_correct'))} | "
                    f"{f(q.get('selected_correct'))} | {f(sel.get('sir'))} / {f(sel.get('uniform'))} | "
                    f"{f(q.get('log_weight_gap'), '+.2f')} | {f(q.get('right_beats_wrong'))} |")
    table = "\n".join(body)
    result = {"config": {"em": cfg.em, "rates": cfg.rates, "seed": cfg.seed}, "rows": rows, "summary": lines}
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", f"# Corruption study\n\n{table}\n")
    print(f"\nCorruption study ({out}):\n{table}\n")
    return result


@entry_point("apps.bolt.synthetic.corruption")
def main(argv: list[str] | None = None) -> None:
    run(cli_config(CorruptionArgs, argv, "apps.bolt.synthetic.corruption"))


if __name__ == "__main__":
    main()
