"""Every shipped stage config loads into its entry point's dataclass (a YAML that drifts from its
dataclass fails here). Model presets, prompts and tasks have their own tests (test_transformer,
test_teachers, test_task_configs); this covers every other file in apps/bolt/configs/."""

from __future__ import annotations

from pathlib import Path

import pytest

from lingua.args import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "apps" / "bolt" / "configs"


def _schema(name: str):
    """(dataclass, placeholder overrides for fields that are required on the command line)."""
    if name.startswith("train_"):
        from apps.bolt.train import BoltTrainArgs

        return BoltTrainArgs, ["dump_dir=x"]
    if name.startswith("estep_"):
        from apps.bolt.estep import EStepArgs

        return EStepArgs, ["ckpt=x", "src=x", "out=x"]
    if name.startswith("em_"):
        from apps.bolt.em import EMArgs

        return EMArgs, []
    if name.startswith("compare_"):
        from apps.bolt.compare import CompareArgs

        return CompareArgs, []
    if name.startswith("eval_"):
        from apps.bolt.eval import EvalArgs

        return EvalArgs, []
    if name.startswith("gen_"):
        from apps.bolt.gen_latents import GenLatentsArgs

        return GenLatentsArgs, ["src=x", "out=y"]
    if name.startswith("finetune_sweep_"):
        from apps.bolt.finetune_sweep import SweepArgs

        return SweepArgs, []
    if name.startswith("finetune_"):
        from apps.bolt.finetune import FinetuneArgs

        return FinetuneArgs, ["ckpt=x", "out=y"]
    if name.startswith("prepare_"):
        from apps.bolt.prepare import PrepareArgs

        return PrepareArgs, []
    raise AssertionError(f"{name}: no schema known for this config; add it to tests/test_configs.py")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path: Path):
    cls, placeholders = _schema(path.name)
    cfg = load_config(cls, path, placeholders)
    assert type(cfg) is cls


def test_em_configs_point_at_loadable_stage_configs():
    from apps.bolt.em import EMArgs

    for path in sorted(CONFIGS.glob("em_*.yaml")):
        cfg = load_config(EMArgs, path)
        for section in ("prepare", "teacher", "train", "estep", "eval"):
            stage = getattr(cfg, section).config
            assert (CONFIGS.parents[2] / stage).is_file(), f"{path.name}: {section}.config={stage} is missing"
            test_shipped_config_loads(CONFIGS.parents[2] / stage)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("compare_*.yaml")), ids=lambda p: p.name)
def test_compare_configs_build_every_stage(path: Path):
    """Each comparison config's stage configs (teachers, prepare, train with its in-training
    evaluation) resolve, and every condition gets the same training budget."""
    from apps.bolt.compare import CompareArgs, CompareDriver

    cfg = load_config(CompareArgs, path)
    cfg.validate()
    driver = CompareDriver(cfg)
    driver.check()
    budgets = {c: driver.train_config(c, 0, Path("unused")).num_tokens for c in cfg.conditions}
    assert set(budgets.values()) == {cfg.train_tokens}, budgets


@pytest.mark.parametrize("name", ["em_synthetic.yaml", "em_science.yaml"])
def test_synthetic_em_configs_bootstrap_from_more_text_than_the_teacher_labelled(name):
    """The E-steps (and the raw baselines) read a bootstrap sample larger than the teacher-labelled
    warmstart set, disjoint from it, and every run starts from the same cached base model (its
    datasets are the same in the demo and the science run)."""
    from apps.bolt.em import EMArgs
    from apps.bolt.prepare import PrepareArgs

    em = load_config(EMArgs, CONFIGS / name, [])
    prep = load_config(PrepareArgs, em.prepare.config, em.prepare.overrides)
    subsets = {s.name: s for s in prep.subsets}
    order = [s.name for s in prep.subsets]
    assert order.index("warmstart") < order.index("bootstrap")  # disjoint slices of one permutation
    assert subsets["warmstart"].docs > 0 and em.estep_docs is not None
    assert subsets["bootstrap"].docs >= em.estep_docs > subsets["warmstart"].docs
    assert em.base.tokens > 0 and set(em.base.sources) == {"pretrain", "drills"} and order[0] == "pretrain"
    assert {e.name for e in prep.extra} >= {"drills", "eval"}


def test_demo_and_science_share_the_base_model():
    from apps.bolt.em import EMArgs
    from apps.bolt.prepare import PrepareArgs

    cfgs = [load_config(EMArgs, CONFIGS / n, []) for n in ("em_synthetic.yaml", "em_science.yaml")]
    assert cfgs[0].base == cfgs[1].base and cfgs[0].train == cfgs[1].train
    preps = [load_config(PrepareArgs, c.prepare.config, c.prepare.overrides) for c in cfgs]
    assert preps[0].subsets[0] == preps[1].subsets[0] and preps[0].extra == preps[1].extra
    assert preps[0].source == preps[1].source and preps[0].val == preps[1].val
