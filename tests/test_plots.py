"""The figures of ``plots/``: per-iteration panels, curves over tokens, finetune and method
comparison figures, their commands and notebooks, on tiny hand-written run folders whose files
have the keys their writers produce (``apps.bolt.em_report.write_report``: results.json;
``apps.bolt.em``: baseline_budgets.json; ``lingua.trainer``: metrics.jsonl, config.yaml;
``apps.bolt.em_exec``: final_consolidated.json; ``apps.bolt.finetune_sweep``: results.csv)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ELBO = "elbo_4_per_token"
NLL = "val_nll_per_token"

# model run -> (group, iteration, k, accuracy, nll, elbo_4 or None for raw models, tokens seen)
MODELS = {
    "warmstart_t0": ("warmstart", 0, None, 0.62, 0.66, -0.81, 3_000_000),
    "warmstart_t1": ("warmstart", 0, None, 0.60, 0.67, -0.83, 3_000_000),
    "iter1_t0": ("bootstrap", 1, 4, 0.38, 0.70, -0.92, 2_000_000),
    "iter1_t1": ("bootstrap", 1, 4, 0.36, 0.71, -0.95, 2_000_000),
    "iter2_t0": ("bootstrap", 2, 4, 0.20, 0.74, -1.10, 2_000_000),
    "iter2_t1": ("bootstrap", 2, 4, 0.18, 0.75, -1.14, 2_000_000),
    "raw_token_match_t0": ("raw_token_match", None, None, 0.21, 0.57, None, 600_000),
    "raw_token_match_t1": ("raw_token_match", None, None, 0.20, 0.58, None, 600_000),
    "raw_flops_match_t0": ("raw_flops_match", None, None, 0.19, 0.52, None, 2_000_000),
    "raw_flops_match_t1": ("raw_flops_match", None, None, 0.18, 0.53, None, 2_000_000),
}
QUALITY = {"selected_correct": 0.6, "selected_correct_all": 0.7, "equation_truth": 0.93, "equation_recall": 0.6,
           "selector": {"sir": 0.6, "uniform": 0.45, "argmax": 0.58, "best_of_k": 0.7, "sample": 0.45},
           "log_weight_gap": 12.7, "right_beats_wrong": 0.9, "chunks_with_thought": 1400,
           "model": "warmstart_t0", "num_samples": 4, "temperature": 1.0}


def _mean_se(values):
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None  # as the sweep and the EM report: no spread from one value
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def _row(run, spec):
    group, it, k, acc, nll, elbo, _ = spec
    row = {"group": group, "iteration": it, "k": k, "trial": int(run[-1]), "run": run,
           "ckpt": f"runs/em_tiny/runs/{run}/checkpoints/0000000100/consolidated",
           "variant": "raw" if elbo is None else "latent", "accuracy": acc, "accuracy_by_task": {"synthetic_cot": acc},
           "n_problems": 500, "val_nll_per_token": nll, "val_nll_per_char": nll / 2.2}
    if elbo is not None:
        row.update({"thought_correct": acc - 0.02, "elbo_1_per_token": elbo - 0.08, "elbo_2_per_token": elbo - 0.04,
                    ELBO: elbo})
    return row


def _summary(rows):
    """results.json's ``summary``: one line per (group, iteration, k), as em_report.aggregate."""
    lines = []
    for key in dict.fromkeys((r["group"], r["iteration"], r["k"]) for r in rows):
        rs = [r for r in rows if (r["group"], r["iteration"], r["k"]) == key]
        line = {"group": key[0], "iteration": key[1], "k": key[2], "trials": len(rs)}
        for metric in ("accuracy", NLL, "elbo_1_per_token", ELBO, "thought_correct"):
            if metric in rs[0]:
                line[metric], line[f"{metric}_se"] = _mean_se([r[metric] for r in rs])
        line["accuracy_se_kind"] = f"over {len(rs)} trials"
        if key[0] == "bootstrap" and key[1] == 1:
            line["trained_on"] = {"latents": "iter1_latents", **QUALITY}
        lines.append(line)
    return lines


def _training_run(folder: Path, tokens: int, latent: bool, every_tokens: bool = True) -> None:
    """A finished training run: metrics.jsonl (log lines every 10 steps, an eval line at the
    end), metrics.eval.jsonl, config.yaml and final_consolidated.json; 8 x 256 tokens a step."""
    folder.mkdir(parents=True)
    step_tokens, steps = 8 * 256, tokens // (8 * 256)
    lines = []
    for step in range(10, steps + 1, max(10, steps // 5 // 10 * 10)):
        ln = {"step": step, "loss/train": 2.0 / (1 + step / 100), "optim/lr": 3e-3, "optim/grad_norm": 0.5,
              "tokens/loss_tokens": 2048.0, "speed/tokens_per_s": 9000.0, "speed/step_s": 0.22, "speed/data_s": 5e-05,
              "speed/mfu": None, "memory/max_rss_gib": 0.51, "memory/rss_gib": 0.50}
        if every_tokens:
            ln["tokens/total"] = step * step_tokens
        lines.append(ln)
    for step in (steps // 2, steps):  # evaluation lines (no tokens/total off the log cadence)
        ln = {"step": step, "val/heldout/nll_per_token": 0.9 - step / steps * 0.2, "val/heldout/nll_per_char": 0.4,
              "val/heldout/docs": 20.0, "val/heldout/tokens": 4000.0, "val/heldout/docs_truncated": 0.0}
        if latent:
            ln.update({"val/heldout/elbo_1_per_token": -1.3, "val/heldout/elbo_4_per_token": -1.2 + step / steps * 0.3})
        lines.append(ln)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    (folder / "metrics.eval.jsonl").write_text(json.dumps({
        "step": steps, "variant": "latent" if latent else "raw", "eval_id": "synthetic_cot-74f561ca", "n_seeds": 1,
        "eval/synthetic_cot/exact_match/answer": 0.3}) + "\n")
    (folder / "config.yaml").write_text(f"name: {folder.name}\nnum_tokens: {tokens}\ngrad_acc_steps: 1\n"
                                        "data:\n  batch_size: 8\n  seq_len: 256\ndistributed:\n  data_shards: 0\n")
    ckpt = f"runs/em_tiny/runs/{folder.name}/checkpoints/{steps:010d}"
    (folder / "final_consolidated.json").write_text(json.dumps({
        "consolidated": f"{ckpt}/consolidated", "inputs": {"data": "5bfc77bfa6b767a1", "init": "a2cd02729f1794a3"},
        "summary": {"step": steps, "total_steps": steps, "checkpoint": ckpt, "tokens_seen": {"iter1_latents": steps * step_tokens},
                    "consolidated": f"{ckpt}/consolidated"}}))


@pytest.fixture
def em_run(tmp_path: Path) -> Path:
    root = tmp_path / "em_tiny"
    rows = [_row(run, spec) for run, spec in MODELS.items()]
    budgets = {"raw_fraction": 0.3, "latent_to_raw_ratio": 3.333, "docs_measured": 400, "raw_tokens": 450_000,
               "packed_tokens": 1_500_000, "budgets": {"raw_token_match": 600_000, "raw_flops_match": 2_000_000}}
    result = {"name": "em_tiny", "rows": rows, "summary": _summary(rows), "baseline_budgets": budgets,
              "estep_quality": {"iter1_latents": QUALITY}, "stage_seconds": {"prepare": 10.4}}
    root.mkdir()
    (root / "results.json").write_text(json.dumps(result))
    (root / "baseline_budgets.json").write_text(json.dumps(budgets))
    for run in ("warmstart_t0", "iter1_t0", "iter2_t0", "raw_token_match_t0"):
        _training_run(root / "runs" / run, MODELS[run][-1], MODELS[run][5] is not None)
    return root


SWEEP_COLUMNS = ["row", "trial", "seed", "runs", "accuracy", "n_problems", "samples_per_problem", "maj@1", "maj@4",
                 "pass@1", "pass@4", "accuracy_se", "n_problems_se", "samples_per_problem_se", "maj@1_se", "maj@4_se",
                 "pass@1_se", "pass@4_se"]


def _sweep(folder: Path, accuracy: dict[str, list[float]]) -> Path:
    """A finetune sweep's results.csv: a run row per trial x seed, trial rows, an all row."""
    folder.mkdir(parents=True)
    rows = []
    for trial, accs in accuracy.items():
        for seed, acc in zip((42, 43), accs):
            rows.append({"row": "run", "trial": trial, "seed": seed, "runs": 1, "accuracy": acc, "n_problems": 40,
                         "samples_per_problem": 4, "maj@1": acc, "maj@4": acc + 0.01, "pass@1": acc, "pass@4": acc + 0.2,
                         "accuracy_se": math.sqrt(acc * (1 - acc) / 40)})
    for trial, accs in [*accuracy.items(), ("", [a for v in accuracy.values() for a in v])]:
        mean, se = _mean_se(accs)
        rows.append({"row": "trial" if trial else "all", "trial": trial, "seed": "", "runs": len(accs),
                     "accuracy": mean, "accuracy_se": se, "n_problems": 40, "samples_per_problem": 4})
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in SWEEP_COLUMNS} for r in rows)
    return folder


FT = {"warmstart_t0": [0.40, 0.42], "iter1_t0": [0.30, 0.34], "iter1_t1": [0.32, 0.36], "iter2_t0": [0.20, 0.22],
      "raw_token_match_t0": [0.10, 0.12]}


def _conditions_csv(path: Path) -> Path:
    rows = [("latent thoughts", 480e6, 1.5e8, 0.10, 0.01), ("latent thoughts", 480e6, 4.8e8, 0.20, 0.012),
            ("raw repeated", 480e6, 4.8e8, 0.06, 0.008), ("raw repeated", 480e6, 1.6e9, 0.07, 0.008),
            ("raw fresh", 1.6e9, 1.6e9, 0.09, 0.009), ("WRAP-CoT", 480e6, 6.9e8, 0.12, "")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "raw_tokens", "effective_raw_tokens", "accuracy", "accuracy_se"])
        w.writerows(rows)
    return path


def _labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


# ---------------------------------------------------------------------------- plot_utils


def test_em_accuracy_axes_fit_the_metric_elbo_negative_nll_not_from_zero(em_run, tmp_path):
    from plots.plot_utils import em_accuracy_figure, plot_em_accuracy

    result = json.loads((em_run / "results.json").read_text())
    elbo = [ln[ELBO] for ln in result["summary"] if ELBO in ln]
    lo, hi = em_accuracy_figure(result, ELBO).axes[0].get_ylim()
    assert hi < 0, "an ELBO axis is not stretched to 0"
    assert lo <= min(elbo) and hi >= max(elbo), (lo, hi, elbo)  # every value on the canvas
    nll = [ln[NLL] for ln in result["summary"]]
    lo, hi = em_accuracy_figure(result, NLL).axes[0].get_ylim()
    assert 0 < lo <= min(nll) and hi >= max(nll)
    ax = em_accuracy_figure(result).axes[0]
    assert ax.get_ylim()[0] == 0  # accuracies (shares) from 0
    assert _labels(ax) == ["BoLT (bootstrap latents)", "warmstart", "raw token match", "raw flops match"]
    # the call apps.bolt.em_report makes
    out = plot_em_accuracy(result, tmp_path / "fig" / "accuracy.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_em_accuracy_has_thought_panel_only_when_graded(em_run):
    from plots.plot_utils import em_accuracy_figure

    result = json.loads((em_run / "results.json").read_text())
    fig = em_accuracy_figure(result)
    assert [ax.get_title() for ax in fig.axes][1] == "thought quality"
    for ln in result["summary"]:
        ln.pop("trained_on", None)
    assert len(em_accuracy_figure(result).axes) == 1


# ---------------------------------------------------------------------------- bootstrap


def test_bootstrap_figure_panels_series_and_axes(em_run):
    from plots import bootstrap

    fig = bootstrap.figure([em_run])
    axes = fig.axes
    assert len(axes) == 8  # 2 rows x (accuracy, ELBO, NLL, thoughts | loss)
    acc, elbo, nll, thoughts, acc_t, elbo_t, nll_t, loss_t = axes
    assert acc.get_title() == "em_tiny: accuracy per iteration"
    assert _labels(acc) == ["BoLT (bootstrap latents)", "warmstart", "raw token match", "raw flops match"]
    assert _labels(elbo) == ["BoLT (bootstrap latents)", "warmstart"]  # raw models have no ELBO
    assert list(acc.lines[0].get_xdata()) == [1, 2]
    assert acc.lines[0].get_ydata()[0] == pytest.approx(0.37)
    assert acc.get_ylim()[0] == 0
    assert elbo.get_ylim()[1] < 0 and elbo.get_ylim()[0] <= -1.14
    assert nll.get_ylim()[0] > 0.4
    assert thoughts.get_title() == "em_tiny: thoughts per iteration" and thoughts.get_ylim() == (0, 1)
    # over tokens: 4 training runs, one colour per model, final evaluations at the tokens seen
    assert _labels(nll_t) == ["warmstart", "iteration 1", "iteration 2", "raw token match"]
    assert _labels(elbo_t) == ["warmstart", "iteration 1", "iteration 2"]
    markers = [ln for ln in acc_t.lines if ln.get_marker() == "o"]
    assert sorted(float(m.get_xdata()[0]) for m in markers) == [598_016, 1_998_848, 1_998_848, 2_998_272]
    assert elbo_t.get_ylim()[1] < 0
    assert loss_t.get_ylabel().startswith("training loss") and len(loss_t.lines) == 4


def test_curves_place_eval_lines_by_step_when_tokens_are_not_logged(tmp_path):
    from plots.runs import curves, tokens_per_step, train_tokens

    run = tmp_path / "iter1_t0"
    _training_run(run, 204_800, latent=True, every_tokens=False)  # 100 steps
    assert tokens_per_step(run) == 8 * 256  # from config.yaml: batch x seq_len x grad_acc x shards
    c = curves(run)
    xs, ys = c["val/heldout/elbo_4_per_token"]
    assert xs == [50 * 2048, 100 * 2048] and ys == pytest.approx([-1.05, -0.9])
    assert set(c) == {"loss/train", "val/heldout/nll_per_token", "val/heldout/elbo_1_per_token",
                      "val/heldout/elbo_4_per_token", "eval/synthetic_cot/exact_match/answer"}
    assert train_tokens(run) == 204_800


def test_bootstrap_command_and_plot_run_write_png(em_run, tmp_path):
    from plots.bootstrap import plot_run

    assert plot_run(em_run, tmp_path / "a" / "bootstrap.png").read_bytes()[:8] == PNG_MAGIC
    out = tmp_path / "cli" / "fig.png"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "plots.bootstrap", str(em_run), str(em_run), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and out.read_bytes()[:8] == PNG_MAGIC
    bad = subprocess.run([sys.executable, "-m", "plots.bootstrap", str(tmp_path / "nothing"), "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("python -m plots.bootstrap: error: ") and "results.json" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- finetune


def test_finetune_lines_per_model_from_sweep_rows(tmp_path):
    from plots import finetune

    sweep = _sweep(tmp_path / "ft", FT)
    lines = {ln["model"]: ln for ln in finetune.load([sweep])}
    assert list(lines) == ["warmstart", "iter1", "iter2", "raw_token_match"]
    it1 = lines["iter1"]
    assert (it1["group"], it1["iteration"], it1["runs"]) == ("bootstrap", 1, 4)
    mean, se = _mean_se([0.30, 0.34, 0.32, 0.36])
    assert it1["finetune_accuracy"] == pytest.approx(mean) and it1["finetune_accuracy_se"] == pytest.approx(se)
    assert lines["raw_token_match"]["iteration"] is None
    # one sweep per model: trial names without a model take the folder's name; one run keeps its binomial SE
    single = _sweep(tmp_path / "per_model" / "iter3", {"t0": [0.5]})
    (ln,) = finetune.load([single / "results.csv"])
    assert (ln["group"], ln["iteration"], ln["runs"]) == ("bootstrap", 3, 1)
    assert ln["finetune_accuracy_se"] == pytest.approx(math.sqrt(0.25 / 40))
    assert finetune.load([sweep], metric="pass@4")[1]["finetune_pass@4"] == pytest.approx(mean + 0.2)


def test_finetune_figure_and_command(tmp_path, em_run):
    from plots import finetune

    sweep = _sweep(tmp_path / "ft", FT)
    ax = finetune.figure([sweep]).axes[0]
    assert _labels(ax) == ["BoLT (bootstrap latents)", "warmstart", "raw token match"]
    assert list(ax.lines[0].get_xdata()) == [1, 2] and ax.get_ylim()[0] == 0
    assert ax.get_ylabel() == "finetuned accuracy"
    # an EM run with finetune_eval: its summary lines carry finetune_accuracy
    result = json.loads((em_run / "results.json").read_text())
    for i, ln in enumerate(result["summary"]):
        ln.update({"finetune_accuracy": 0.2 + 0.05 * i, "finetune_accuracy_se": 0.02})
    (em_run / "results.json").write_text(json.dumps(result))
    out = tmp_path / "ft.png"
    assert finetune.main([str(em_run), "--out", str(out)]) == 0 and out.read_bytes()[:8] == PNG_MAGIC
    assert finetune.main([str(tmp_path / "ft" / "results.csv"), "--out", str(out), "--metric", "nope"]) == 2


# ---------------------------------------------------------------------------- method compare


def test_method_compare_from_csv(tmp_path):
    from plots import method_compare

    fig = method_compare.figure([_conditions_csv(tmp_path / "conditions.csv")])
    assert len(fig.axes) == 2  # raw tokens, effective raw tokens (no train_tokens column)
    raw, eff = fig.axes
    assert eff.get_xlabel().startswith("effective raw tokens") and eff.get_xscale() == "log"
    assert _labels(eff) == ["latent thoughts", "raw repeated", "raw fresh", "WRAP-CoT"]
    latent = eff.lines[0]
    assert list(latent.get_xdata()) == [1.5e8, 4.8e8] and list(latent.get_ydata()) == [0.10, 0.20]
    assert raw.get_ylim()[0] == 0


def test_method_compare_conditions_of_an_em_run(em_run, tmp_path):
    from plots import method_compare

    rows = {r["condition"]: r for r in method_compare.em_conditions(em_run)}
    assert list(rows) == ["warmstart", "bootstrap iteration 1", "bootstrap iteration 2", "raw token match",
                          "raw flops match"]
    it1 = rows["bootstrap iteration 1"]  # one run folder (trial 0): its tokens seen
    assert it1["train_tokens"] == 1_998_848
    assert it1["effective_raw_tokens"] == pytest.approx(0.3 * 1_998_848)
    assert it1["raw_tokens"] == 450_000  # capped at one pass over the bootstrap corpus
    flops = rows["raw flops match"]  # no run folders: its budget
    assert (flops["train_tokens"], flops["effective_raw_tokens"], flops["raw_tokens"]) == (2_000_000, 2_000_000, 450_000)
    assert rows["warmstart"]["raw_tokens"] is None  # its corpus size is not recorded without budgets.json
    out = tmp_path / "mc.png"
    assert method_compare.main([str(em_run), str(_conditions_csv(tmp_path / "c.csv")), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert len(method_compare.figure([em_run]).axes) == 3


# ---------------------------------------------------------------------------- notebooks


def test_notebooks_execute_on_tiny_runs(em_run, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (pip install -r requirements.txt)")
    import nbformat

    sweep = _sweep(tmp_path / "ft", FT)
    inputs = {"bootstrap": [em_run], "finetune": [sweep], "method_compare": [em_run, _conditions_csv(tmp_path / "c.csv")]}
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for name, dirs in inputs.items():
        out = tmp_path / "nb" / f"{name}.png"
        monkeypatch.setenv("BOLT_RUN_DIRS", os.pathsep.join(map(str, dirs)))
        monkeypatch.setenv("BOLT_FIGURE", str(out))
        nb = nbformat.read(REPO / "plots" / f"{name}.ipynb", as_version=4)
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
        assert out.read_bytes()[:8] == PNG_MAGIC, name
        outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
        assert any("image/png" in o.get("data", {}) for o in outputs), name
