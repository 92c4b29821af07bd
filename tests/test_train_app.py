"""The BoLT train entry: latent layouts from the ``layout`` section, raw held-out validation under
a latent layout, and the in-training evaluation hooks (NLL, ELBO) wired from the ``eval`` section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from apps.bolt.formats import EOL, SOL, SPECIAL_TOKENS
from apps.bolt.train import BoltTrainArgs, build_format_fn, run
from lingua.args import ConfigError, load_config
from tests.test_trainer import DEBUG_YAML, read_metrics

DOCS = [
    ("It rains. We stay in.", ["The sky is grey.", "Rain means indoors."]),
    ("Two pens cost 6. One pen costs 3.", ["2 * 3 = 6.", "6 / 2 = 3."]),
    ("A cat sat. It slept all day long.", ["Cats rest.", "Sleep follows."]),
]


def _latent_corpus(root: Path) -> Path:
    (root / "latent").mkdir(parents=True)
    (root / "heldout").mkdir()
    lines = []
    for text, latents in DOCS * 20:
        first, second = text.split(". ", 1)
        chunks = [{"suffix": first + ". ", "latent": latents[0]}, {"suffix": second, "latent": latents[1]}]
        assert "".join(c["suffix"] for c in chunks) == text
        lines.append(json.dumps({"text": text, "chunks": chunks}))
    (root / "latent" / "part.00.jsonl").write_text("\n".join(lines) + "\n")
    (root / "heldout" / "part.00.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in DOCS))
    return root


def _cfg(tmp_path: Path, *extra: str) -> BoltTrainArgs:
    data = _latent_corpus(tmp_path / "data")
    return load_config(BoltTrainArgs, DEBUG_YAML, [
        f"dump_dir={tmp_path / 'run'}", f"data.root_dir={data}", "data.sources={latent: 1.0}", "steps=4",
        "data.batch_size=2", "data.seq_len=64", "checkpoint.every=0", "val.source=heldout", "val.batches=1",
        f"tokenizer.special_tokens={json.dumps(list(SPECIAL_TOKENS))}", "layout.name=random", *extra,
    ])


def test_layout_section_builds_the_formatter(tmp_path):
    cfg = _cfg(tmp_path, "layout.name=prior")
    fmt = build_format_fn(cfg)
    rec = {"text": "a. b", "chunks": [{"suffix": "a. ", "latent": "x"}, {"suffix": "b", "latent": "y"}]}
    import numpy as np

    assert fmt(rec, np.random.default_rng(0)) == f"{SOL}x{EOL}a. {SOL}y{EOL}b"
    with pytest.raises(ConfigError, match="layout name must be one of"):
        _cfg(tmp_path / "x", "layout.name=sideways")


def test_latent_run_validates_on_raw_docs_and_runs_eval_hooks(tmp_path):
    cfg = _cfg(tmp_path, f"eval.val_docs={tmp_path / 'data' / 'heldout'}", "eval.elbo_samples=[1,2]",
               "eval.val_source=heldout")
    summary = run(cfg)
    last = read_metrics(tmp_path / "run")[-1]
    # validation read the raw held-out docs (it would find no usable record through the latent layout)
    assert summary["val"]["val/tokens"] > 0 and last["val/loss"] > 0
    assert last["val/heldout/nll_per_token"] > 0
    assert last["val/heldout/elbo_2_per_token"] < 0 and "val/heldout/elbo_1_per_token" in last
    # the run's saved config records the layout: evaluation picks the latent task variant from it
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["layout"]["name"] == "random"
