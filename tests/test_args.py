"""Config system: defaults < YAML (with _base_ chains) < CLI, clear errors naming the key, and
dump -> load identity."""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from lingua.args import ConfigError, dc_replace, dump_config, load_config, parse_args
from lingua.tokenizer import TokenizerArgs
from lingua.transformer import TransformerArgs


@dataclass
class OptimCfg:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    scheduler: str = "cosine"


@dataclass
class Cfg:
    name: str = "default"
    steps: int = 10
    flag: bool = False
    tag: Optional[str] = None
    model: TransformerArgs = field(default_factory=TransformerArgs)
    optim: OptimCfg = field(default_factory=OptimCfg)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_cli(tmp_path):
    f = _write(tmp_path / "c.yaml", "steps: 20\noptim:\n  lr: 0.5\nmodel:\n  dim: 128\n  n_heads: 4\n")
    assert load_config(Cfg).steps == 10
    c = load_config(Cfg, f)
    assert (c.steps, c.optim.lr, c.model.dim, c.name) == (20, 0.5, 128, "default")
    assert c.optim.scheduler == "cosine" and c.model.n_layers == 8  # untouched defaults survive
    c = load_config(Cfg, f, ["steps=30", "model.dim=256", "optim.betas=[0.8,0.9]", "tag=null"])
    assert (c.steps, c.optim.lr, c.model.dim, c.optim.betas, c.tag) == (30, 0.5, 256, [0.8, 0.9], None)
    c = parse_args(Cfg, [f"config={f}", "--steps=40", "name=run1", "flag=true"])
    assert (c.steps, c.name, c.flag, c.optim.lr) == (40, "run1", True, 0.5)


def test_base_chain(tmp_path):
    _write(tmp_path / "presets" / "model.yaml", "model:\n  dim: 96\n  n_heads: 4\n  n_layers: 3\n")
    _write(tmp_path / "presets" / "mid.yaml", "_base_: model.yaml\nmodel:\n  n_layers: 5\noptim:\n  lr: 0.1\n")
    _write(tmp_path / "other.yaml", "steps: 7\noptim:\n  lr: 0.2\n")
    top = _write(tmp_path / "run.yaml", "_base_: [presets/mid.yaml, other.yaml]\nname: top\n")
    c = load_config(Cfg, top, ["model.n_layers=6"])
    # later bases override earlier ones, the file overrides its bases, the CLI overrides all
    assert (c.model.dim, c.model.n_heads, c.optim.lr, c.steps, c.name) == (96, 4, 0.2, 7, "top")
    assert c.model.n_layers == 6
    assert load_config(Cfg, top).model.n_layers == 5

    _write(tmp_path / "loop_a.yaml", "_base_: loop_b.yaml\n")
    _write(tmp_path / "loop_b.yaml", "_base_: loop_a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(Cfg, tmp_path / "loop_a.yaml")
    _write(tmp_path / "dangling.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(Cfg, tmp_path / "dangling.yaml")


def test_typo_names_key_and_suggests(tmp_path):
    f = _write(tmp_path / "typo.yaml", "model:\n  dimm: 128\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.dimm'; did you mean 'model.dim'\?") as e:
        load_config(Cfg, f)
    assert str(f) in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"):
        load_config(Cfg, None, ["optim.lrr=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'; did you mean 'model'\?"):
        load_config(Cfg, None, ["modle.dim=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'$"):
        load_config(Cfg, None, ["zzz=1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.dim=abc", "model.dim"),
        ("steps=1.5", "steps"),
        ("flag=maybe", "flag"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.betas=[0.1,x]", "optim.betas"),
        ("model=3", "model"),
    ],
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=rf"bad value for config key '{key}"):
        load_config(Cfg, None, [override])


def test_validation_and_malformed_input(tmp_path):
    with pytest.raises(ConfigError, match="section model: .*n_heads=3"):
        load_config(Cfg, None, ["model.n_heads=3"])
    with pytest.raises(ConfigError, match="tokenizer.name must be one of"):
        load_config(Cfg, None, ["tokenizer.name=words"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Cfg, None, ["steps"])
    bad = _write(tmp_path / "bad.yaml", "steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(Cfg, bad)
    listy = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Cfg, listy)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*absent.yaml"):
        load_config(Cfg, tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(Cfg, [f"config={tmp_path / 'absent.yaml'}"])


def test_dump_then_load_is_identical(tmp_path):
    c = load_config(
        Cfg,
        None,
        ["name=dumped", "tag=t", "model.dim=96", "model.n_heads=4", "model.rope_scaling.factor=8.0",
         "model.n_kv_heads=2", "optim.betas=[0.5,0.6]", "tokenizer.special_tokens=['<a>','<b>']"],
    )  # fmt: skip
    text = dump_config(c, tmp_path / "dump.yaml")
    assert (tmp_path / "dump.yaml").read_text() == text
    again = load_config(Cfg, tmp_path / "dump.yaml")
    assert again == c
    assert dump_config(again) == text


def test_dc_replace_and_help(capsys):
    c = dc_replace(Cfg(), **{"optim.lr": 0.25, "model.dim": 64, "model.n_heads": 4, "name": "r"})
    assert (c.optim.lr, c.model.dim, c.name) == (0.25, 64, "r")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        dc_replace(Cfg(), **{"optim.lrr": 1.0})
    with pytest.raises(SystemExit) as e:
        parse_args(Cfg, ["--help"])
    assert e.value.code == 0
    assert "steps: 10" in capsys.readouterr().out


@dataclasses.dataclass
class _Sources:
    sources: dict[str, float] = dataclasses.field(default_factory=dict)
    batch: int = 1


@dataclasses.dataclass
class _WithSources:
    data: _Sources = dataclasses.field(default_factory=_Sources)


def test_mapping_override_replaces_the_yaml_mapping(tmp_path):
    """``key={...}`` on the command line replaces a mapping; ``key.sub=value`` merges into it."""
    Outer = _WithSources
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  sources: {train: 1.0, extra: 0.5}\n  batch: 4\n")
    assert load_config(Outer, y, ["data.sources={latent: 1.0}"]).data.sources == {"latent": 1.0}
    assert load_config(Outer, y, ["data.sources.more=2.0"]).data.sources == {"train": 1.0, "extra": 0.5, "more": 2.0}
    assert load_config(Outer, y, ["data={batch: 8}"]).data.batch == 8


@dataclass
class _OnlySources:
    sources: dict[str, float] = field(default_factory=dict)


@dataclass
class _WithSection:
    name: str = ""
    data: _OnlySources = field(default_factory=_OnlySources)


def test_a_mapping_override_into_a_section_the_yaml_lacks(tmp_path):
    """``data.sources={a: 1.0}`` on the command line when the YAML has no ``data:`` section."""
    yml = tmp_path / "c.yaml"
    yml.write_text("name: x\n")
    cfg = load_config(_WithSection, str(yml), ["data.sources={a: 1.0, b: 2.0}"])
    assert cfg.data.sources == {"a": 1.0, "b": 2.0}
