import sys
from pathlib import Path

import pytest

from lingua.args import ConfigError, load_config
from lingua.launch import LaunchArgs, commands, run


REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- submitting, waiting, re-attaching
def _shard_module(tmp_path, monkeypatch):
    """A stage module that writes out_<shard> and fails for shard 1 when asked to."""
    mod = tmp_path / "jobmod.py"
    mod.write_text(
        "import sys, pathlib, time\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:])\n"
        "time.sleep(float(args.get('sleep', 0)))\n"
        "if args.get('fail') == args.get('shard'):\n"
        "    print('shard failing on purpose', file=sys.stderr); sys.exit(3)\n"
        f"pathlib.Path({str(tmp_path)!r}, 'out_' + args.get('shard', 'x')).write_text(args.get('cache', ''))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_local_cluster_jobs_wait_and_report_failures_with_logs(tmp_path, monkeypatch, capsys):
    from lingua.jobs import attach_jobs, job_alive, wait_jobs
    from lingua.launch import submit_jobs

    _shard_module(tmp_path, monkeypatch)
    a = _args(mode="launch", cluster="local", module="jobmod", shards=3, log_dir=tmp_path / "logs", job_name="arr",
              shard_args='["cache=c-{shard:02d}.db"]')
    cmds = commands(a, ["fail=1"], shard_ids=[0, 1, 2])
    assert [c[-3:] for c in cmds][2] == ["shard=2", "num_shards=3", "cache=c-02.db"]
    jobs = submit_jobs(a, cmds)
    failures = wait_jobs(jobs, poll_s=0.1)
    assert (tmp_path / "out_0").read_text() == "c-00.db" and (tmp_path / "out_2").exists()
    assert not (tmp_path / "out_1").exists()
    assert [f.job_id for f in failures] == [jobs[1].job_id]
    f = failures[0]
    assert "exited with status 3" in f.error and f.stderr.startswith(str(tmp_path / "logs" / "arr"))
    assert "shard failing on purpose" in open(f.stderr).read()  # the job's own output is in its log
    # handles made from the ids alone (another process, e.g. a restarted driver) see them finished
    again = attach_jobs("local", tmp_path / "logs" / "arr", [j.job_id for j in jobs])
    assert [job_alive(j) for j in again] == [False, False, False]
    assert again[0].result() == 0

    # the CLI: wait=true exits 1 and names the failed job's logs; only the listed shard reruns
    assert run(_args(mode="launch", cluster="local", module="jobmod", log_dir=tmp_path / "logs", job_name="one",
                     wait=True, poll_s=0.1), ["shard=7", "fail=7"]) == 1
    err = capsys.readouterr().err
    assert "1 job(s) failed" in err and str(tmp_path / "logs" / "one") in err


def test_a_live_job_is_seen_alive_from_its_id_alone(tmp_path, monkeypatch):
    from lingua.jobs import attach_jobs, job_alive, wait_jobs
    from lingua.launch import submit_jobs

    _shard_module(tmp_path, monkeypatch)
    a = _args(mode="launch", cluster="local", module="jobmod", log_dir=tmp_path / "logs", job_name="slow")
    (job,) = submit_jobs(a, commands(a, ["shard=5", "sleep=3"]))
    (attached,) = attach_jobs("local", tmp_path / "logs" / "slow", [job.job_id])
    assert attached is not job and job_alive(attached)
    assert wait_jobs([attached], poll_s=0.1) == []
    assert not job_alive(attached) and (tmp_path / "out_5").exists()


def test_multi_node_torchrun_rendezvous_on_the_first_node():
    from lingua.launch import JobCommand

    cmd = commands(_args(module="apps.bolt.train", nproc=8, nodes=2, rdzv_port=29600), ["config=c.yaml"])[0]
    assert cmd[:5] == ["torchrun", "--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d",
                       "--rdzv_endpoint={master_addr}:29600"]
    assert JobCommand(cmd, ".").resolved("gpu-node-17")[4] == "--rdzv_endpoint=gpu-node-17:29600"
    with pytest.raises(ValueError, match="outside"):
        commands(_args(module="m", shards=2), [], shard_ids=[2])


def test_submissions_from_inside_a_job_hide_its_slurm_variables(monkeypatch):
    import os

    from lingua.launch import _submission_env

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/x.conf")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("SBATCH_ACCOUNT", "mine")  # the user's own sbatch defaults stay
    with _submission_env():
        assert "SLURM_CPUS_PER_TASK" not in os.environ and "RANK" not in os.environ
        assert os.environ["SLURM_CONF"] == "/etc/slurm/x.conf" and os.environ["SBATCH_ACCOUNT"] == "mine"
    assert os.environ["SLURM_CPUS_PER_TASK"] == "4" and os.environ["RANK"] == "3"


# ---------------------------------------------------------------- checks before submitting
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_launch_checks_the_stage_config_before_submitting(tmp_path, monkeypatch, capsys):
    from lingua.launch import main

    monkeypatch.chdir(REPO)
    log_dir = tmp_path / "logs"
    for stage_argv, expected in (
        (["config=missing.yaml", "typo=1"], "config file not found"),
        ([f"config={REPO / 'apps/bolt/configs/train_debug.yaml'}", "typo=1"], "unknown config key 'typo'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["mode=launch", "module=apps.bolt.train", "cluster=local", f"log_dir={log_dir}", "--", *stage_argv])
        assert exit_info.value.code == 2
        line = _one_error_line(capsys)
        assert line.startswith("lingua.launch: error: apps.bolt.train:") and expected in line and "nothing was submitted" in line
    assert not log_dir.exists()  # no job folder, no job


def test_slurm_without_sbatch_is_one_line(tmp_path, monkeypatch, capsys):
    from lingua.launch import main

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch (nor anything else) on PATH
    with pytest.raises(SystemExit) as exit_info:
        main(["mode=launch", "module=apps.bolt.train", f"log_dir={tmp_path / 'logs'}", "--",
              "config=apps/bolt/configs/train_debug.yaml"])
    assert exit_info.value.code == 1
    assert "sbatch is not on PATH" in _one_error_line(capsys)


def test_cat_prints_the_sbatch_script_launch_would_submit(tmp_path, capsys):
    a = _args(mode="cat", module="apps.bolt.estep", shards=4, gpus=1, partition="gpu", time_min=600, signal_delay_s=120,
              script="true", log_dir=str(tmp_path), job_name="estep", setup='["module load cuda/12.8"]')
    assert run(a, ["config=e.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.count("-m apps.bolt.estep config=e.yaml shard=") == 4
    for directive in ("#SBATCH --array=0-3%4", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --time=600",
                      "#SBATCH --signal=USR2@120", "#SBATCH --job-name=estep", f"#SBATCH --output={tmp_path}/estep/"):
        assert directive in out, directive
    assert "module load cuda/12.8" in out and "submitit.core._submit" in out
    assert not (tmp_path / "estep").exists()  # rendering submits and writes nothing
    with pytest.raises(ConfigError, match="cluster=local submits none"):
        run(_args(mode="cat", module="m", cluster="local", script="true"), [])
