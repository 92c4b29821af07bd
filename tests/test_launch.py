import sys

import pytest

from lingua.args import ConfigError, load_config
from lingua.launch import LaunchArgs, commands, run


def _args(**kw):
    return load_config(LaunchArgs, None, [f"{k}={v}" for k, v in kw.items()])


def test_cat_commands_for_shards_and_torchrun(capsys):
    a = _args(mode="cat", module="apps.bolt.estep", shards=3)
    cmds = commands(a, ["config=e.yaml"])
    assert [c[-2:] for c in cmds] == [["shard=0", "num_shards=3"], ["shard=1", "num_shards=3"], ["shard=2", "num_shards=3"]]
    assert cmds[0][:3] == [sys.executable, "-m", "apps.bolt.estep"]
    t = commands(_args(module="apps.bolt.train", nproc=2), ["steps=3"])[0]
    assert t[:4] == ["torchrun", "--nproc_per_node=2", "--standalone", "-m"] and t[-1] == "steps=3"
    assert run(a, ["config=e.yaml"]) == 0
    assert capsys.readouterr().out.count("apps.bolt.estep") == 3


def test_run_mode_executes_every_shard(tmp_path, monkeypatch):
    mod = tmp_path / "shardmod.py"
    mod.write_text(
        "import sys, pathlib\n"
        "args = dict(a.split('=') for a in sys.argv[1:])\n"
        f"pathlib.Path({str(tmp_path)!r}, 'out_' + args['shard']).write_text(args['tag'])\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    a = _args(mode="run", module="shardmod", shards=3, parallel=2)
    assert run(a, ["tag=x"]) == 0
    assert sorted(p.name for p in tmp_path.glob("out_*")) == ["out_0", "out_1", "out_2"]
    bad = _args(mode="run", module="no_such_module_xyz")
    assert run(bad, []) == 1


def test_bad_launch_config():
    with pytest.raises(ConfigError, match="mode must be one of"):
        _args(mode="submit", module="m")
    with pytest.raises(ConfigError, match="module is required"):
        _args(mode="cat")
