"""E-step throughput of each generation backend at a model shape, random weights, same chunks.

Entry: ``python -m benchmarks.estep_throughput preset=tinyllama|demo|tiny backends=[engine,vllm] ...``.

A random model of the preset's shape (``tinyllama``: TinyLlama-1.1B, dim 2048, 22 layers, 32 heads,
4 kv heads, FFN 5632, vocab 32000; ``demo``: the CPU demo model of ``configs/model/tiny.yaml``;
``tiny``: a smoke-test size) is saved as a consolidated checkpoint with the byte tokenizer plus
the latent tokens, and each backend (:func:`lingua.backends.build_backend`) runs the posterior
sampler (K samples, joint scoring, selection) over the same synthetic-corpus chunks.

The vocabulary is the preset's (the output projection and the softmax cost the same as a real
32000-entry model), but the byte tokenizer can only decode its first 262 ids: the ids above it are
banned in sampling (probability 0, like the latent markers), so latents stay decodable. A random
model rarely samples ``<EoL>``, so nearly every latent runs to ``max_latent_tokens``: the work per
chunk is fixed and known, which is what a throughput comparison wants (a trained model's latents
are shorter; tokens/s is the number that carries over).

Timing: one warm-up call per backend on a few chunks (compilation, CUDA graphs), then the whole set
once. Reported: chunks/s, generated tokens/s (latent tokens over sampling seconds), the sampling /
scoring split, mean log weight (a sanity check: both backends sample the same distribution), and
the ratio engine/vllm of chunks/s.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from apps.bolt.chunking import ChunkArgs, chunk_text
from apps.bolt.formats import SPECIAL_TOKENS
from apps.bolt.posterior import ChunkInput, PosteriorArgs, PosteriorSampler
from lingua.backends import build_backend, resolve_device
from lingua.consolidated import save_consolidated
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model

PRESETS: dict[str, dict[str, Any]] = {
    "tinyllama": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000, max_seqlen=2048),
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384, vocab_size=512, max_seqlen=1024),
    # head size 32 (dim / n_heads) in every preset: the smallest vLLM's CPU build serves
    "tiny": dict(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=128, vocab_size=300, max_seqlen=256),
}


class _DecodableSampler(PosteriorSampler):
    """The E-step's sampler, also banning the ids the byte tokenizer cannot decode."""

    model_vocab = 0

    def _banned_ids(self, tok) -> list[int]:
        return sorted(set(super()._banned_ids(tok)) | set(range(tok.vocab_size, self.model_vocab)))


def make_checkpoint(preset: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A random consolidated model of the preset's shape with the byte + latent tokenizer."""
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    shape = dict(PRESETS[preset])
    shape["vocab_size"] = max(shape["vocab_size"], tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(TransformerArgs(**shape)).to(dtype)
    return save_consolidated(model, tok, folder)


def make_chunks(count: int, seed: int = 5) -> list[ChunkInput]:
    """The first ``count`` E-step chunks (prefix = 3 previous chunks) of a synthetic corpus."""
    from apps.bolt.synthetic.corpus import generate_corpus

    out: list[ChunkInput] = []
    for d, doc in enumerate(generate_corpus(max(1, count), seed=seed)):
        for i, c in enumerate(chunk_text(doc["text"], ChunkArgs(prefix_chunks=3))):
            out.append(ChunkInput(c.prefix, c.suffix, f"doc{d}", i))
        if len(out) >= count:
            break
    return out[:count]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(kind: str, ckpt: Path, chunks: list[ChunkInput], cfg: Any, model_vocab: int) -> dict:
    """Build one backend, warm it up, run all chunks; returns the row of the table."""
    device = resolve_device(cfg.device)
    # on vLLM's CPU build gpu_memory_utilization is a share of host memory: the backend sizes the KV cache there
    extra = {"gpu_memory_utilization": cfg.gpu_memory_utilization} if kind == "vllm" and device != "cpu" else {}
    backend = build_backend(kind, ckpt, device=device, dtype=cfg.dtype, max_batch_tokens=cfg.max_batch_tokens,
                            raw_logprobs=False, **extra)
    args = PosteriorArgs(num_samples=cfg.num_samples, max_latent_tokens=cfg.max_latent_tokens, seed=0)
    _DecodableSampler.model_vocab = model_vocab
    _DecodableSampler(backend, args, model_fingerprint="bench").run(chunks[: min(4, len(chunks))])  # warm-up
    sampler = _DecodableSampler(backend, args, model_fingerprint="bench")
    _sync(device)
    t0 = time.perf_counter()
    posts = []
    for i in range(0, len(chunks), cfg.batch_chunks):
        posts.extend(sampler.run(chunks[i : i + cfg.batch_chunks]))
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(sum(p.gen_len) for p in posts)
    log_w = [w for p in posts for w in p.log_w]
    row = {
        "backend": kind, "chunks": len(posts), "seconds": round(seconds, 3),
        "chunks_per_s": len(posts) / seconds, "gen_tokens": tokens,
        "gen_tokens_per_s": tokens / max(sampler.stats.sample_seconds, 1e-9),
        "sample_s": round(sampler.stats.sample_seconds, 3), "score_s": round(sampler.stats.score_seconds, 3),
        "mean_log_w": sum(log_w) / max(1, len(log_w)),
    }
    del backend, sampler
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def compare_backends(cfg: Any) -> list[dict]:
    """Run every backend of ``cfg.backends`` on the preset; prints the table and returns its rows.
    A backend that cannot start (vLLM missing, no CUDA) is reported as a row with its error."""
    chunks = make_chunks(cfg.chunks)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="estep_backends_") as tmp:
        ckpt = make_checkpoint(cfg.preset, Path(tmp) / "model")
        model_vocab = json.loads((ckpt / "params.json").read_text()).get("vocab_size") or PRESETS[cfg.preset]["vocab_size"]
        for kind in cfg.backends:
            try:
                rows.append(measure(kind, ckpt, chunks, cfg, int(model_vocab)))
            except Exception as e:  # noqa: BLE001 - one failing backend must not hide the other's numbers
                rows.append({"backend": kind, "error": f"{type(e).__name__}: {e}"})
    shape = PRESETS[cfg.preset]
    print(f"E-step backends, preset {cfg.preset} ({shape['dim']}d x {shape['n_layers']} layers, vocab "
          f"{shape['vocab_size']}, random weights), {len(chunks)} chunks, K={cfg.num_samples}, up to "
          f"{cfg.max_latent_tokens} latent tokens, {cfg.dtype}, device {resolve_device(cfg.device)}")
    print("| backend | chunks/s | gen tokens/s | seconds | sampling s | scoring s | mean log w |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | error: {r['error'][:200]} | | | | | |")
        else:
            print(f"| {r['backend']} | {r['chunks_per_s']:.2f} | {r['gen_tokens_per_s']:.0f} | {r['seconds']:.1f} | "
                  f"{r['sample_s']:.1f} | {r['score_s']:.1f} | {r['mean_log_w']:.2f} |")
    ok = {r["backend"]: r for r in rows if "error" not in r}
    if "engine" in ok and "vllm" in ok:
        print(f"ratio engine/vllm: chunks/s {ok['engine']['chunks_per_s'] / ok['vllm']['chunks_per_s']:.3f}, "
              f"gen tokens/s {ok['engine']['gen_tokens_per_s'] / ok['vllm']['gen_tokens_per_s']:.3f}")
    return rows
