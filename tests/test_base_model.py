"""The cached base model: trained once per recipe, reused by later runs, refused when a folder
holds a base made with another recipe; the EM driver starts its runs from it."""

import json
from pathlib import Path

import pytest

from apps.bolt import base_model, em
from lingua.args import load_config
from tests.test_em import TINY


def _recipe(lr=1e-3, data="abc"):
    return {"train": {"optim": {"lr": lr}}, "data": {"pretrain": data}, "init": None}


def test_get_base_trains_once_and_reuses(tmp_path):
    calls = []

    def train(run_dir: Path):
        calls.append(run_dir)
        (run_dir / "consolidated").mkdir(parents=True)
        return run_dir / "consolidated", {"step": 3}

    r = _recipe()
    folder = base_model.base_folder(tmp_path, r)
    assert base_model.cached_base(folder, r) is None
    first = base_model.get_base(folder, r, train)
    again = base_model.get_base(folder, r, train)
    assert first == again == folder / "run" / "consolidated" and len(calls) == 1
    info = json.loads((folder / base_model.BASE_FILE).read_text())
    assert info["consolidated"] == "run/consolidated"  # relative to the cache folder
    assert info["recipe"] == r and info["summary"] == {"step": 3}
    # another recipe lives in another folder; a folder whose record disagrees is refused
    other = _recipe(lr=2e-3)
    assert base_model.base_folder(tmp_path, other) != folder
    with pytest.raises(RuntimeError, match="another recipe"):
        base_model.cached_base(folder, other)


def test_recipe_ignores_names_and_paths_but_not_what_is_learned():
    from apps.bolt.train import BoltTrainArgs

    a = load_config(BoltTrainArgs, "apps/bolt/configs/train_em_synthetic.yaml", ["dump_dir=/x/run", "name=a", "data.root_dir=/x"])
    b = load_config(BoltTrainArgs, "apps/bolt/configs/train_em_synthetic.yaml", ["dump_dir=/y/other", "name=b", "data.root_dir=/y",
                                                                                  "checkpoint.every=7"])
    c = load_config(BoltTrainArgs, "apps/bolt/configs/train_em_synthetic.yaml", ["dump_dir=/x/run", "optim.lr=0.01"])
    stamps = {"pretrain": "s1"}
    ra, rb, rc = (base_model.recipe(x, stamps, None) for x in (a, b, c))
    assert base_model.recipe_hash(ra) == base_model.recipe_hash(rb) != base_model.recipe_hash(rc)
    assert base_model.recipe_hash(ra) != base_model.recipe_hash(base_model.recipe(a, {"pretrain": "s2"}, None))


def test_base_args_validation():
    with pytest.raises(ValueError, match="needs base.sources"):
        base_model.BaseArgs(tokens=10).validate()
    with pytest.raises(ValueError, match="weights"):
        base_model.BaseArgs(tokens=10, sources={"a": 0.0}).validate()


BASE = [
    (
        'prepare.overrides=[source.num_docs=240, "subsets=[{name: pretrain, docs: 40}, {name: warmstart, tokens: 12000}, '
        '{name: bootstrap, tokens: 12000}]", "extra=[{name: drills, source: {kind: synthetic, generator: '
        'apps.bolt.synthetic.facts:generate_drills, num_docs: 30}}, {name: eval, builder: '
        'apps.bolt.synthetic.tasks:write_eval_files, options: {n_test: 8, n_dev: 2, seed: 0}}]"]'
    ),
    "base.tokens=2048",
    "base.sources={pretrain: 0.5, drills: 0.5}",
    "iterations=0",
    "baselines=[raw_token_match]",
]


def test_em_trains_the_base_once_and_starts_every_run_from_it(tmp_path):
    def cfg(dump, *extra):
        return load_config(em.EMArgs, "apps/bolt/configs/em_synthetic.yaml", [
            *TINY, *BASE, f"dump_dir={tmp_path / dump}", f"tokenizer_cache={tmp_path / 'tok'}",
            f"base.cache_dir={tmp_path / 'bases'}", *extra])

    first = cfg("a", "final_estep=true")
    result = em.run(first)
    # with no iterations, the final E-step grades the warmstart's thoughts (synthetic: the oracle's
    # scorer), and the report has its table
    assert (tmp_path / "a" / "data" / "iter1_latents" / "COMPLETE").is_file()
    assert result["estep_quality"]["iter1_latents"]["model"] == "warmstart_t0"
    assert "Thoughts written by each E-step" in (tmp_path / "a" / "results.md").read_text()
    bases = sorted((tmp_path / "bases").glob("base-*"))
    assert len(bases) == 1 and (bases[0] / base_model.BASE_FILE).is_file()
    consolidated = json.loads((bases[0] / base_model.BASE_FILE).read_text())["consolidated"]
    for run in ("warmstart_t0", "raw_token_match_t0"):
        text = (tmp_path / "a" / "runs" / run / "config.yaml").read_text()
        assert consolidated in text  # init_ckpt_path of the run
    # a second experiment with the same data and recipe reuses the cached base
    em.run(cfg("b"))
    stages = [json.loads(x)["stage"] for x in (tmp_path / "b" / "stages.jsonl").read_text().splitlines()]
    assert "base" not in stages and len(list((tmp_path / "bases").glob("base-*"))) == 1
    # a changed recipe trains another base
    em.run(cfg("c", "base.overrides=[optim.lr=0.001]"))
    assert len(list((tmp_path / "bases").glob("base-*"))) == 2
