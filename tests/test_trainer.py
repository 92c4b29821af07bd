"""The training loop on the debug config: golden losses, exact resume, metrics, hooks, config
errors, token budget, gradient accumulation semantics and init from a consolidated checkpoint.

The helpers at the top (``write_corpus``, ``debug_cfg``) are shared with the checkpoint and
distributed tests.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from apps.bolt.train import BoltTrainArgs, main
from lingua.args import ConfigError, load_config
from lingua.trainer import register_eval_hook, train

REPO = Path(__file__).resolve().parents[1]
DEBUG_YAML = REPO / "apps" / "bolt" / "configs" / "train_debug.yaml"
GOLDEN = Path(__file__).parent / "assets" / "debug_losses.json"

_WORDS = "the a one two three cat dog bird sees likes eats runs jumps over under near big small red blue".split()


def write_corpus(root: Path, n_train: int = 300, n_val: int = 40) -> Path:
    """A tiny seeded corpus: ``train/`` (two shards) and ``val/`` of short sentences."""
    rng = random.Random(1234)

    def doc() -> str:
        return " ".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8))) + "." for _ in range(rng.randint(1, 4)))

    for source, n, shards in (("train", n_train, 2), ("val", n_val, 1)):
        (root / source).mkdir(parents=True, exist_ok=True)
        docs = [doc() for _ in range(n)]
        for s in range(shards):
            lines = [json.dumps({"text": d}) + "\n" for d in docs[s::shards]]
            (root / source / f"part.{s:02d}.jsonl").write_text("".join(lines))
    return root


def overrides(data_root: Path, run_dir: Path, **kw) -> list[str]:
    """Dotlist for the debug config on the test corpus: 12 steps of 4 x 32 tokens, fast."""
    base = {
        "dump_dir": str(run_dir), "data.root_dir": str(data_root), "steps": 12, "log_freq": 1,
        "data.batch_size": 4, "data.seq_len": 32, "checkpoint.every": 3, "checkpoint.keep": 10,
        "val.every": 6, "val.batches": 2,
    }  # fmt: skip
    base.update(kw)
    return [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in base.items()]


def debug_cfg(data_root: Path, run_dir: Path, **kw) -> BoltTrainArgs:
    return load_config(BoltTrainArgs, DEBUG_YAML, overrides(data_root, run_dir, **kw))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine OpenMP
    threads spinning against other processes make a step 5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    """The uninterrupted 12-step run that the resume tests compare against."""
    return train(debug_cfg(corpus, tmp_path_factory.mktemp("ref") / "run"))


# ------------------------------------------------------------------------------------------


def test_golden_losses_of_the_seeded_debug_run(corpus, tmp_path):
    """The shipped debug config (steps=100, batch 8 x 64) stopped after 10 steps: its losses
    match tests/assets/debug_losses.json within 1e-3 relative (CPU kernels differ slightly
    between machines and ISAs) and fall."""
    args = [f"config={DEBUG_YAML}", f"data.root_dir={corpus}", f"dump_dir={tmp_path / 'run'}", "stop_at_step=10", "log_freq=1"]
    summary = main(args)
    losses = [summary["losses"][s] for s in range(1, 11)]
    golden = json.loads(GOLDEN.read_text())
    assert golden["command"].split()[-1] == "log_freq=1"
    assert losses == pytest.approx(golden["losses"], rel=1e-3)
    assert losses[-1] < losses[0] - 1.0
    assert abs(losses[0] - math.log(258)) < 1.0  # a fresh model is close to uniform over 258 ids


def test_resume_after_6_steps_matches_uninterrupted_run_bitwise(corpus, reference, tmp_path):
    first = train(debug_cfg(corpus, tmp_path / "run", stop_at_step=6))
    assert first["step"] == 6 and first["consolidated"] is None
    second = train(debug_cfg(corpus, tmp_path / "run"))
    assert second["resumed_from"].endswith("0000000006")
    assert sorted(second["losses"]) == list(range(7, 13))
    for step in range(7, 13):  # bitwise: same kernels, same thread count, exact state restore
        assert second["losses"][step] == reference["losses"][step], step
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 13))  # no duplicates
    assert second["tokens_seen"] == reference["tokens_seen"]
    again = train(debug_cfg(corpus, tmp_path / "run"))  # finished runs are not retrained
    assert again["losses"] == {} and again["step"] == 12


def test_run_folder_and_metrics(reference):
    run = Path(reference["run_dir"])
    assert (run / "config.yaml").is_file() and "dump_dir" in (run / "config.yaml").read_text()
    assert json.loads((run / "tokenizer" / "tokenizer_args.json").read_text())["name"] == "bytes"
    log = (run / "train.log").read_text()
    assert "[rank0]" in log and "ETA" in log and "step 12/12" in log
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 13))
    expected = {
        "step", "loss/train", "optim/lr", "optim/grad_norm", "tokens/loss_tokens", "tokens/total",
        "tokens/source/train", "speed/tokens_per_s", "speed/step_s", "speed/data_s", "speed/mfu", "memory/max_rss_gib",
    }  # fmt: skip
    for r in records:
        assert expected <= set(r), expected - set(r)
        assert all("/" in k for k in r if k not in ("step", "tokens"))
        assert r["tokens"] == r["step"] * 4 * 32  # tokens read so far: the x axis of curves
    assert records[0]["speed/mfu"] is None  # no known peak FLOPs for a CPU
    assert records[-1]["tokens/total"] == 12 * 4 * 32 and records[-1]["tokens/source/train"] == 12 * 4 * 32
    assert "val/loss" in records[5] and "val/loss" in records[11] and "val/loss" not in records[6]
    assert records[-1]["loss/train"] == reference["final_loss"]
    assert reference["val"]["val/loss"] < math.log(258)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [f"{s:010d}" for s in (3, 6, 9, 12)]
    assert (run / "checkpoints" / f"{12:010d}" / "consolidated" / "COMPLETE").is_file()


def test_eval_hooks_registered_and_passed(corpus, tmp_path):
    calls = []

    def hook(model, step, run_dir):
        calls.append((step, Path(run_dir), model.training))
        return {"score": float(step), "custom/metric": 1.0}

    register_eval_hook("test_counting_hook", lambda m, s, d: {"named": 1.0}, replace=True)
    summary = train(debug_cfg(corpus, tmp_path / "run", steps=5, evals=["test_counting_hook"], **{"eval.every": 2}), eval_hooks=[hook])
    assert [c[0] for c in calls] == [2, 4, 5] and calls[0][1] == tmp_path / "run" and not calls[0][2]
    assert summary["eval"] == {"eval/named": 1.0, "eval/score": 5.0, "custom/metric": 1.0}
    by_step = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert by_step[4]["eval/score"] == 4.0 and "eval/score" not in by_step[3]
    with pytest.raises(ConfigError, match="unknown eval hook"):
        train(debug_cfg(corpus, tmp_path / "run2", evals=["no_such_hook"]))


def test_wandb_mirror_is_offline_and_optional(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    summary = train(debug_cfg(corpus, tmp_path / "run", steps=2, **{"logging.wandb": True, "checkpoint.consolidate": False}))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert summary["step"] == 2


def test_unknown_config_key_is_an_error(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line naming the key, exit status 2
        main([f"config={DEBUG_YAML}", "optim.learning_rate=1e-3"])
    assert exit_info.value.code == 2 and "unknown config key 'optim.learning_rate'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(BoltTrainArgs, DEBUG_YAML, ["optim.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="dump_dir is required"):
        load_config(BoltTrainArgs, None, [])
    with pytest.raises(ConfigError, match="val.source"):
        train(debug_cfg(corpus, tmp_path / "run", **{"val.source": "heldout"}))
    with pytest.raises(ConfigError, match="max_seqlen"):
        debug_cfg(corpus, tmp_path, **{"data.seq_len": 512})


def test_token_budget_sets_steps(corpus, tmp_path):
    cfg = debug_cfg(corpus, tmp_path / "run", num_tokens=5 * 4 * 32 + 100, **{"checkpoint.consolidate": False})
    assert cfg.total_steps(data_shards=1) == 5 and cfg.total_steps(data_shards=2) == 2
    summary = train(cfg)
    assert summary["total_steps"] == 5 and sorted(summary["losses"]) == [1, 2, 3, 4, 5]


def test_accumulation_is_a_token_mean_clipped_once_per_step(corpus, tmp_path):
    """2 micro-batches of 2 rows give the loss and update of 1 batch of 4 rows (same windows
    with the shuffle off) even with clipping active: the gradient is the token mean of the whole
    step and is clipped once. Clipping each micro-step (the reference) would change it."""
    common = {"data.shuffle_buffer": 0, "grad_clip": 0.5, "steps": 4, "checkpoint.consolidate": False}
    whole = train(debug_cfg(corpus, tmp_path / "whole", **common))
    accumulated = train(debug_cfg(corpus, tmp_path / "acc", grad_acc_steps=2, **{"data.batch_size": 2}, **common))
    grad_norms = [r["optim/grad_norm"] for r in read_metrics(tmp_path / "whole")]
    assert min(grad_norms) > 0.5  # clipping was active at every step
    for step in range(1, 5):
        assert accumulated["losses"][step] == pytest.approx(whole["losses"][step], rel=1e-5, abs=1e-6)


def test_document_mask_reaches_the_model(corpus, tmp_path):
    """``data.doc_mask`` makes the batches carry ``doc_ids`` and the model attend within each
    packed document only: same data, different first loss (with activation checkpointing on)."""
    common = {"steps": 1, "checkpoint.consolidate": False, "distributed.activation_checkpointing": True}
    plain = train(debug_cfg(corpus, tmp_path / "plain", **common))
    masked = train(debug_cfg(corpus, tmp_path / "masked", **{"data.doc_mask": True}, **common))
    assert math.isfinite(masked["losses"][1]) and masked["losses"][1] != plain["losses"][1]


def test_init_from_consolidated_checkpoint(corpus, reference, tmp_path):
    """A fresh run initialised from the reference run's consolidated export starts from those
    weights: its first loss equals the loss of the loaded export on the same first batch."""
    from lingua.consolidated import load_consolidated
    from lingua.data import build_data_iterator

    init = reference["consolidated"]
    cfg = debug_cfg(corpus, tmp_path / "run", steps=2, **{"checkpoint.init_ckpt_path": init, "checkpoint.consolidate": False})
    summary = train(cfg)
    model, tokenizer = load_consolidated(init)
    it = build_data_iterator(cfg.data, tokenizer, rank=0, world_size=1)
    batch, _ = next(it)
    it.close()
    with torch.no_grad():
        logits = model(batch["input"])
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), reduction="none")
    expected = float((ce * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum())
    assert summary["losses"][1] == pytest.approx(expected, rel=1e-5)
    assert summary["losses"][1] < reference["losses"][1] - 1.0  # far better than a fresh model


def test_init_checkpoint_that_does_not_fit_names_the_tensors(corpus, reference, tmp_path):
    cfg = debug_cfg(corpus, tmp_path / "run", **{"model.dim": 32, "checkpoint.init_ckpt_path": reference["consolidated"]})
    with pytest.raises(ValueError, match=r"tok_embeddings.weight: \(258, 64\)"):
        train(cfg)


def test_progress_eta_mfu_and_metric_truncation(tmp_path):
    from lingua.logger import Progress, format_duration
    from lingua.metrics import mfu, peak_flops, truncate_metrics

    now = [100.0]
    progress = Progress(total_steps=110, start_step=10, clock=lambda: now[0])
    now[0] = 130.0  # first step (compilation, warm-up) took 30 s: left out of the ETA
    progress.mark_first_step()
    now[0] = 140.0  # then 5 steps of 2 s each
    assert progress.eta_seconds(16) == pytest.approx(94 * 2.0)
    assert "ETA 0:03:08" in progress.line(16, 2.5, 1e-3, 0.7, 1234.0) and "1.2k tok/s" in progress.line(16, 2.5, 1e-3, 0.7, 1234.0)
    assert format_duration(float("nan")) == "?" and format_duration(3725) == "1:02:05"

    assert peak_flops(torch.device("cpu")) is None
    assert mfu(6e9, 1e4, None, 1) is None
    assert mfu(6e9, 1e4, 1e15, 4) == pytest.approx(6e13 / 4e15)

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 9)) + '{"step": 9, "lo')
    assert truncate_metrics(path, 5) == 4  # steps 6-8 and the torn line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
