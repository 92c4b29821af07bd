"""wandb identity of a run: the id comes from the run folder (stable across resumes, distinct
between experiments that reuse run names), the group is the experiment, the job type the stage;
offline by default. The last test goes through real wandb in offline mode."""

from __future__ import annotations

import json

import pytest

from lingua.metrics import LoggingArgs, MetricLogger, wandb_identity


def test_same_run_name_in_two_experiments_gets_two_ids_and_groups(tmp_path):
    args = LoggingArgs(wandb=True)
    a = wandb_identity(tmp_path / "exp_a" / "runs" / "warmstart_t0", "warmstart_t0", args)
    b = wandb_identity(tmp_path / "exp_b" / "runs" / "warmstart_t0", "warmstart_t0", args)
    assert a["id"] != b["id"]
    assert a["id"].startswith("warmstart_t0-") and b["id"].startswith("warmstart_t0-")
    assert (a["group"], b["group"]) == ("exp_a", "exp_b")  # the EM dump_dir's name, past runs/
    assert a["job_type"] == b["job_type"] == "warmstart"
    assert wandb_identity(tmp_path / "exp_a" / "runs" / "iter2_t1", "iter2_t1", args)["job_type"] == "iter2"


def test_id_is_stable_for_the_same_folder_however_it_is_spelled(tmp_path, monkeypatch):
    args = LoggingArgs(wandb=True)
    run = tmp_path / "sweep" / "lr3e-4"
    monkeypatch.chdir(tmp_path)
    relative = wandb_identity("sweep/../sweep/lr3e-4", "lr3e-4", args)
    absolute = wandb_identity(run, "lr3e-4", args)
    assert relative == absolute
    assert absolute["group"] == "sweep" and absolute["job_type"] == "lr3e-4"


def test_explicit_group_and_job_type_win_and_ids_are_safe(tmp_path):
    args = LoggingArgs(wandb=True, wandb_group="ablation-k", wandb_job_type="mstep")
    ident = wandb_identity(tmp_path / "x", "a/b:c#d?e%f" + "z" * 100, args)
    assert (ident["group"], ident["job_type"]) == ("ablation-k", "mstep")
    assert not set(ident["id"]) & set("/:#?% \\") and len(ident["id"]) <= 64


def test_offline_wandb_run_carries_the_identity_and_resumes_into_itself(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "exp_c" / "runs" / "iter1_t0"
    args = LoggingArgs(wandb=True)  # offline is the default
    expected = wandb_identity(run_dir, "iter1_t0", args)
    seen = []
    for step in (1, 2):  # a run, then its resume in the same folder
        log = MetricLogger(run_dir / "metrics.jsonl", args, "iter1_t0", {"lr": 1e-3})
        run = log._wandb
        seen.append((run.id, run.group, run.job_type, run.name, run.offline))
        log.log({"step": step, "loss/train": 1.0 / step})
        log.close()
    assert seen[0] == seen[1] == (expected["id"], "exp_c", "iter1", "iter1_t0", True)
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # wandb names the folder offline-run-<second>-<id>, adding "-1" when both start in the same second
    assert len(offline) == 2 and all(f"-{expected['id']}" in name for name in offline)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
