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
    if name.startswith("eval_"):
        from apps.bolt.eval import EvalArgs

        return EvalArgs, []
    if name.startswith("gen_"):
        from apps.bolt.gen_latents import GenLatentsArgs

        return GenLatentsArgs, ["src=x", "out=y"]
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
