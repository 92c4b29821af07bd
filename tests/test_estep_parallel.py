"""The local executor's parallel E-step: shard processes on this machine, merged as on a cluster,
equal to the one-process E-step; a rerun runs only the missing shards; a failed shard names its log;
the shard count of an output folder is recorded and kept."""

import json
import os
from pathlib import Path

import pytest
import torch

from apps.bolt import em, estep
from apps.bolt.em_exec import LocalArgs, LocalStages, cpu_cores, estep_shard_done, local_shard_count
from apps.bolt.formats import SPECIAL_TOKENS
from lingua.args import load_config
from lingua.consolidated import save_consolidated
from lingua.io import is_done
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model

DOCS = [
    "Solving 3x + 7 = 31 gives x = 8. The crate holds 305 pens. It is sunny. We add 2 and 3. Done.",
    "A shop sells 4 pens. Each costs 3 dollars. So 12 dollars in all. That is cheap.",
    "One sentence only.",
    "First. Second one here. Third! Fourth? Fifth. Sixth. Seventh. Eighth. Ninth. Tenth.",
    "The train leaves at 9. It arrives at 11. So the trip takes 2 hours.",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("estep_par")
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    args = TransformerArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, max_seqlen=256)
    torch.manual_seed(0)
    ckpt = save_consolidated(build_model(args), tok, root / "model")
    src = root / "raw"
    src.mkdir()
    (src / "raw.chunk.00.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(DOCS)))
    return root, ckpt, src


def _cfg(world, out, *extra):
    _, ckpt, src = world
    base = [f"ckpt={ckpt}", f"src={src}", f"out={out}", "device=cpu", "posterior.max_latent_tokens=8",
            "posterior.num_samples=3", "posterior.elbo_samples=[1,3]", "progress=false", "chunk.units_per_chunk=2",
            "batch_chunks=4"]
    return load_config(estep.EStepArgs, None, base + list(extra))


def _records(out):
    return [json.loads(x) for x in (Path(out) / "latents.chunk.00.jsonl").read_text().split("\n") if x]


@pytest.fixture(scope="module")
def single(world):
    """The one-process E-step (``estep_procs=1``: in this process, the old path)."""
    root = world[0] / "one"
    out = root / "latents"
    LocalStages(root, LocalArgs(estep_procs=1)).estep("one", _cfg(world, out))
    assert not (root / "logs").exists()  # no shard processes
    return _records(out)


def _assert_same_records(got, want):
    """Record for record: the same documents, chunks, latents, choices and counts; log-weights
    and ELBOs equal up to float noise (shards batch chunks differently, which changes reduction
    order: see tests/test_estep.py)."""
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for a, b in zip(got, want):
        floats = {k for k in b if k.startswith("elbo_")}
        assert {k: v for k, v in a.items() if k not in floats | {"chunks"}} == \
               {k: v for k, v in b.items() if k not in floats | {"chunks"}}
        assert [a[k] for k in floats] == pytest.approx([b[k] for k in floats], abs=5e-3)
        for ca, cb in zip(a["chunks"], b["chunks"], strict=True):
            exact = ("suffix", "latent", "selected", "done", "latent_tokens", "suffix_tokens")
            assert [ca[k] for k in exact] == [cb[k] for k in exact]
            assert ca["log_w"] == pytest.approx(cb["log_w"], abs=2e-3)


def _starts(log: Path) -> int:
    """How many times a shard process was started with this log (one header line per start)."""
    return sum(1 for line in log.read_text().splitlines() if line.startswith("# ") and "apps.bolt.estep" in line)


def test_two_processes_merge_equal_to_one_process(world, single):
    root = world[0] / "two"
    out = root / "latents"
    LocalStages(root, LocalArgs(estep_procs=2)).estep("iter1", _cfg(world, out))
    assert is_done(out)
    _assert_same_records(_records(out), single)
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["num_shards"] == 2 and lineage["docs"] == len(DOCS)
    assert json.loads((out / "work" / "local_shards.json").read_text()) == {"num_shards": 2}
    for i in range(2):
        assert _starts(root / "logs" / f"estep_iter1.shard-{i}.log") == 1
        assert (out / "cache" / f"samples.shard-{i:05d}.db").is_file()  # one sample cache per shard
    shard_cfg = load_config(estep.EStepArgs, root / "configs" / "estep_iter1.yaml")
    assert (shard_cfg.action, shard_cfg.num_shards, shard_cfg.out) == ("shard", 2, str(out))
    # each shard took its contiguous slice of the documents
    infos = [json.loads(estep.shard_paths(out, i, 2)[1].read_text()) for i in range(2)]
    assert [i["doc_range"] for i in infos] == [[0, 2], [2, 5]]


def test_failed_shard_names_its_log_and_rerun_runs_only_the_missing_shard(world, single):
    root = world[0] / "fail"
    out = root / "latents"
    bad_cache = out / "cache" / "samples.shard-00001.db"
    bad_cache.parent.mkdir(parents=True)
    bad_cache.write_bytes(b"this is not an SQLite database" * 10)  # shard 1 fails opening its cache
    stages = LocalStages(root, LocalArgs(estep_procs=2))
    log1 = root / "logs" / "estep_iter1.shard-1.log"
    with pytest.raises(RuntimeError, match=rf"(?s)estep:iter1: 1 of 2 shard.*shard 1 \(exit status 1\): log {log1}"):
        stages.estep("iter1", _cfg(world, out))
    # shard 0 ran to the end (the error came after every process ended), nothing was merged
    assert estep_shard_done(out, 0, 2) and not estep_shard_done(out, 1, 2) and not is_done(out)
    assert "not a database" in log1.read_text()
    done0 = estep.shard_paths(out, 0, 2)[1]
    stamp = done0.stat().st_mtime_ns
    bad_cache.unlink()
    # the rerun, even with another core count, keeps the recorded split and starts shard 1 only
    LocalStages(root, LocalArgs(estep_procs=3)).estep("iter1", _cfg(world, out))
    assert _starts(root / "logs" / "estep_iter1.shard-0.log") == 1 and _starts(log1) == 2
    assert done0.stat().st_mtime_ns == stamp
    assert not (root / "logs" / "estep_iter1.shard-2.log").exists()
    assert json.loads((out / "lineage.json").read_text())["num_shards"] == 2
    _assert_same_records(_records(out), single)


def test_shard_count_is_recorded_and_reused(tmp_path):
    out = tmp_path / "out"
    assert local_shard_count(out, 3) == 3
    assert json.loads((out / "work" / "local_shards.json").read_text()) == {"num_shards": 3}
    assert local_shard_count(out, 2) == 3  # another core count later: the recorded split
    # complete shards of a split found on disk (a slurm run, bin/estep.sh) without a record
    other = tmp_path / "other"
    (other / "work").mkdir(parents=True)
    estep.shard_paths(other, 0, 4)[1].write_text("{}")
    assert local_shard_count(other, 2) == 4
    # two splits in one folder: refused, not mixed
    estep.shard_paths(other, 1, 2)[1].write_text("{}")
    with pytest.raises(RuntimeError, match=r"several splits \(num_shards \[2, 4\]\)"):
        local_shard_count(other, 2)


def test_default_procs_and_driver_wiring(world, tmp_path):
    cfg = _cfg(world, tmp_path / "x")
    stages = LocalStages(tmp_path, LocalArgs())
    assert stages._procs(cfg) == cpu_cores() == len(os.sched_getaffinity(0))
    assert stages._procs(_cfg(world, tmp_path / "x", "device=cuda")) == 1  # one GPU: in this process
    assert LocalStages(tmp_path, LocalArgs(estep_procs=5))._procs(cfg) == 5
    env = LocalStages(tmp_path, LocalArgs(threads_per_proc=3))._env()
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    ecfg = load_config(em.EMArgs, None, [f"dump_dir={tmp_path / 'em'}", "local.estep_procs=2", "local.threads_per_proc=2"])
    driver = em.EMDriver(ecfg)
    assert isinstance(driver.stages, LocalStages) and driver.stages.args == LocalArgs(2, 2)
    assert driver.stages.root == tmp_path / "em"
    with pytest.raises(Exception, match="estep_procs >= 0"):
        load_config(em.EMArgs, None, ["local.estep_procs=-1"])
