"""Where one CPU decode step of ``lingua.generation.Engine`` spends its time.

    python -m benchmarks.decode_profile [threads=1 mode=sample prompts=32 new_tokens=64 ...]

Same model, prompts and shapes as :mod:`benchmarks.generation_throughput` (its ``BenchArgs``).
Prefills one batch with the engine's own code, then replays the decode loop of
``Engine._decode`` with ``time.perf_counter`` around each part, ``repeats`` times, and prints
the best repeat's ms per step and each part's share:

* the step outside the model: random-stream uniforms, ``draw`` (log-softmax, argmax, inverse-CDF
  sampling), the one device -> host copy, the per-row Python bookkeeping, the next-step inputs;
* the model forward, split by an instrumented copy of the packed-weights forward (the same ops
  in the same order, checked equal to ``model(...)``): matrix products, SDPA over the cache, KV
  cache writes, RoPE, RMSNorm, element-wise ops (residuals, SiLU), embedding lookup.

Single-threaded CPU ops are synchronous, so wall-clock sections are exact up to the ~0.1 us a
``perf_counter`` call costs. The floor is what the matrix products and attention kernels alone
take; everything else is what the step pays on top of it. HF ``generate``'s ms per decode step
(same batch, best of ``repeats``) is printed for comparison.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.generation_throughput import BenchArgs, _hf_generate, _hf_model, _left_pad, setup
from lingua.args import parse_args
from lingua.batching import left_padded_prefill
from lingua.generation import Engine
from lingua.sampling import SamplingParams, draw, stream_key, stream_uniforms
from lingua.transformer import additive_mask, apply_rope


@dataclass
class ProfileArgs(BenchArgs):
    mode: str = "sample"
    """sample (T=1) | greedy"""
    repeats: int = 5

    def validate(self) -> None:
        super().validate()
        if self.mode not in ("sample", "greedy"):
            raise ValueError(f"mode must be sample or greedy, got {self.mode!r}")
        if self.device != "cpu":
            raise ValueError("the laps time synchronous CPU ops: device must be cpu")


class _Clock:
    def __init__(self):
        self.t = defaultdict(float)
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.t[name] += now - self.last
        self.last = now


def _forward(model, tokens, positions, attn_mask, cache, pos, clk: _Clock) -> torch.Tensor:
    """``model(tokens, positions=..., attn_mask=..., cache=..., cache_pos=pos)[:, -1]`` inside
    ``packed_weights``, op for op, with a lap after each group of ops."""
    clk.lap("python: step loop")
    rot = model.rope_embeddings(positions)
    clk.lap("rope: angles (cos/sin)")
    h = model.tok_embeddings(tokens)
    clk.lap("embedding lookup")
    for i, layer in enumerate(model.layers):
        att = layer.attention
        x = F.rms_norm(h, (h.shape[-1],), layer.attention_norm.weight, layer.attention_norm.eps)
        clk.lap("rmsnorm")
        bsz, seqlen, _ = x.shape
        qkv = (x @ att.packed[0]).view(bsz, seqlen, att.n_heads + 2 * att.n_kv, att.hd)
        clk.lap("matmul: qkv")
        q, k = apply_rope(qkv[:, :, : att.n_heads + att.n_kv], rot).split([att.n_heads, att.n_kv], dim=2)
        v = qkv[:, :, att.n_heads + att.n_kv :]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        clk.lap("rope: rotate q,k")
        k, v = cache[i].update(k, v, pos)
        clk.lap("kv cache write")
        mask = attn_mask if attn_mask.dtype in (torch.bool, q.dtype) else attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=att.n_kv != att.n_heads)
        clk.lap("attention (SDPA over cache)")
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        clk.lap("elementwise/copies")
        a = out @ att.packed[1]
        clk.lap("matmul: wo")
        h = x_res = h + a
        clk.lap("elementwise/copies")
        ff = layer.feed_forward
        y = F.rms_norm(h, (h.shape[-1],), layer.ffn_norm.weight, layer.ffn_norm.eps)
        clk.lap("rmsnorm")
        gate, up = (y @ ff.packed[0]).chunk(2, dim=-1)
        clk.lap("matmul: w1|w3")
        z = F.silu(gate, inplace=True).mul_(up)
        clk.lap("elementwise/copies")
        z = z @ ff.packed[1]
        clk.lap("matmul: w2")
        h = x_res + z
        clk.lap("elementwise/copies")
    h = F.rms_norm(h, (h.shape[-1],), model.norm.weight, model.norm.eps)
    clk.lap("rmsnorm")
    logits = h @ model.packed_output
    clk.lap("matmul: output (vocab)")
    return logits[:, -1]


def _decode(engine: Engine, prompts, params: SamplingParams, clk: _Clock | None):
    """Prefill (untimed) then the decode loop of ``Engine._decode`` for one batch of prompts
    without stops (every row runs ``max_new_tokens``); returns (tokens [R, T], seconds, steps)."""
    model, dev = engine.model, engine.device
    width = max(map(len, prompts))
    cache_len = width + params.max_new_tokens
    cache, logits, pad = left_padded_prefill(model, prompts, cache_len, dev)
    keys = [0 if params.greedy else stream_key(params.seed, p, 0) for p in prompts]
    rows: list[list[tuple]] = [[] for _ in prompts]
    stops: set[int] = set()
    bias = additive_mask(torch.arange(cache_len, device=dev)[None] >= pad[:, None])[:, None, None]
    start = time.perf_counter()
    if clk is not None:
        clk.last = start
    for step in range(params.max_new_tokens):
        uniforms = None
        if not params.greedy:
            uniforms = torch.from_numpy(stream_uniforms(keys, step)).to(dev)
        if clk:
            clk.lap("sampling: stream uniforms")
        d = draw(logits, params, uniforms)
        if clk:
            clk.lap("sampling: draw()")
        host = torch.stack(
            [d.tokens.double(), d.logprobs.double(), d.sampled_logprobs.double(), d.is_greedy.double()]
        ).tolist()
        if clk:
            clk.lap("host copy (stack+tolist)")
        done = []
        for i, row in enumerate(rows):  # the engine's per-row bookkeeping (no stop tokens here)
            tok = int(host[0][i])
            row.append((tok, host[1][i], host[2][i], host[3][i] == 1.0))
            if tok in stops or len(row) >= params.max_new_tokens:
                done.append(i)
        if clk:
            clk.lap("python: per-row bookkeeping")
        if step == params.max_new_tokens - 1:
            break
        pos = width + step
        positions, mask = (pos - pad)[:, None], bias[..., : pos + 1]
        if clk:
            clk.lap("python: step loop")
            logits = _forward(model, d.tokens[:, None], positions, mask, cache, pos, clk)
        else:
            logits = model(d.tokens[:, None], positions=positions, attn_mask=mask, cache=cache, cache_pos=pos)[:, -1]
    return [[t[0] for t in r] for r in rows], time.perf_counter() - start, params.max_new_tokens


def run(cfg: ProfileArgs) -> dict:
    device, model, engine, prompts = setup(cfg)
    lens = [len(p) for p in prompts]
    prompts.sort(key=len, reverse=True)  # the engine's batch order
    temperature = 0.0 if cfg.mode == "greedy" else 1.0
    params = SamplingParams(temperature=temperature, max_new_tokens=cfg.new_tokens, ignore_eos=True, seed=cfg.seed)
    steps = cfg.new_tokens
    with torch.inference_mode(), model.packed_weights():
        plain_out, _, _ = _decode(engine, prompts, params, None)
        instr_out, _, _ = _decode(engine, prompts, params, _Clock())
        assert instr_out == plain_out, "the instrumented forward must reproduce the model's"
        plain = min(_decode(engine, prompts, params, None)[1] for _ in range(cfg.repeats))
        best: dict[str, float] | None = None
        for _ in range(cfg.repeats):
            clk = _Clock()
            _decode(engine, prompts, params, clk)
            if best is None or sum(clk.t.values()) < sum(best.values()):
                best = dict(clk.t)
    hf = _hf_model(model, device)
    ids, mask = _left_pad(prompts, device)
    _hf_generate(hf, ids, mask, steps, temperature)
    hf_best = float("inf")
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        _hf_generate(hf, ids, mask, steps, temperature)
        hf_best = min(hf_best, time.perf_counter() - t0)

    assert best is not None
    total = sum(best.values())
    print(f"model: {model.num_params() / 1e6:.2f}M params, dim {cfg.dim}, {cfg.n_layers} layers, "
          f"vocab {cfg.vocab_size}; {cfg.prompts} rows, {steps} decode steps ({cfg.mode}), "
          f"cache up to {max(lens) + steps}, threads {torch.get_num_threads()}")
    print(f"decode loop, uninstrumented: {plain / steps * 1e3:.3f} ms/step; "
          f"instrumented: {total / steps * 1e3:.3f} ms/step; "
          f"HF generate (incl. its prefill): {hf_best / steps * 1e3:.3f} ms/step")
    groups = {"matmul": 0.0, "attention (SDPA over cache)": 0.0}
    print(f"\n{'part':<32}{'ms/step':>9}{'share':>8}")
    for name, sec in sorted(best.items(), key=lambda kv: -kv[1]):
        print(f"{name:<32}{sec / steps * 1e3:>9.3f}{sec / total:>8.1%}")
        for g_name in groups:
            if name.startswith(g_name):
                groups[g_name] += sec
    floor = sum(groups.values())
    print(f"\nfloor (matmuls {groups['matmul'] / steps * 1e3:.3f} + attention "
          f"{groups['attention (SDPA over cache)'] / steps * 1e3:.3f}): {floor / steps * 1e3:.3f} ms/step = "
          f"{floor / total:.1%} of the step; the rest, {(total - floor) / steps * 1e3:.3f} ms/step, is overhead")
    return {"per_step_ms": {k: v / steps * 1e3 for k, v in best.items()}, "plain_ms": plain / steps * 1e3,
            "hf_ms": hf_best / steps * 1e3}


def main(argv=None) -> None:
    run(parse_args(ProfileArgs, argv))


if __name__ == "__main__":
    main()
