"""Throughput of ``lingua.generation.Engine`` against HF transformers on the same weights.

    python -m benchmarks.generation_throughput [prompts=32 new_tokens=64 device=cpu ...]

Measures, on one random Llama (default ~3.9M parameters, vocab 1024) and one set of prompts:

* generation tokens/s, greedy and sampled (T=1): ``Engine.generate`` vs HF ``generate`` on the
  same left-padded batch; every sequence generates exactly ``new_tokens`` tokens in both;
* the E-step shape: ``prompts / group`` prompts with ``n = group`` samples each (HF:
  ``num_return_sequences``);
* scoring tokens/s: ``Engine.score`` vs one HF forward + log-softmax gather over the same pairs,
  for unique contexts and for the E-step shape (``group`` continuations sharing each context).

Each number is the best of ``repeats`` timed runs after a warm-up, runs of the two engines
interleaved. ``clock=process`` times CPU seconds of this process instead of wall seconds: on a
shared, loaded machine it is the steadier measure (use it with ``threads=1``). Greedy outputs of
both engines are compared token by token and the agreement is printed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from lingua.args import parse_args
from lingua.generation import Engine
from lingua.sampling import SamplingParams
from lingua.transformer import TransformerArgs, build_model


@dataclass
class BenchArgs:
    prompts: int = 32
    new_tokens: int = 64
    min_prompt_len: int = 16
    max_prompt_len: int = 64
    continuation_len: int = 64
    group: int = 4
    """Continuations per shared context in the E-step-shaped scoring run."""
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int = 1024
    device: str = "cpu"
    dtype: str = "float32"
    """Weights of both engines: float32 | bfloat16 (GPU)."""
    threads: Optional[int] = None
    repeats: int = 3
    clock: str = "wall"
    """wall | process (CPU time of this process; steadier under contention, use threads=1)."""
    max_batch_tokens: int = 16384
    seed: int = 0

    def validate(self) -> None:
        if self.clock not in ("wall", "process"):
            raise ValueError(f"clock must be wall or process, got {self.clock!r}")
        if self.prompts % self.group:
            raise ValueError(f"prompts ({self.prompts}) must be a multiple of group ({self.group})")


class _NoTokenizer:
    """Token-id prompts only; the engine needs no text for this benchmark."""

    bos_id, eos_id, pad_id = 1, 2, None

    def __init__(self, vocab: int):
        self.vocab_size = vocab

    def encode(self, text, add_bos=False, add_eos=False):
        raise NotImplementedError("the benchmark feeds token ids")

    def decode(self, ids) -> str:
        return ""


def _timed_pair(ours: Callable[[], object], theirs: Callable[[], object], cfg: BenchArgs, device: torch.device):
    """Best-of-``repeats`` seconds of both callables (interleaved, after one warm-up each) and
    their last outputs."""
    clock = time.process_time if cfg.clock == "process" else time.perf_counter
    best = [float("inf"), float("inf")]
    outs: list[object] = [ours(), theirs()]
    for _ in range(cfg.repeats):
        for k, fn in enumerate((ours, theirs)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            outs[k] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[k] = min(best[k], clock() - start)
    return best[0], best[1], outs[0], outs[1]


def _hf_model(model, device):
    from transformers import LlamaForCausalLM

    from lingua.hf import lingua_to_hf_state_dict, to_llama_config

    config = to_llama_config(model.args)
    config.eos_token_id = config.bos_token_id = None
    hf = LlamaForCausalLM(config).to(device=device, dtype=model.tok_embeddings.weight.dtype).eval()
    hf.load_state_dict(lingua_to_hf_state_dict(model.state_dict(), model.args))
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def _left_pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def _hf_generate(hf, ids, mask, new_tokens: int, temperature: float, n: int = 1):
    with torch.inference_mode():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=temperature > 0,
                           temperature=temperature or None, top_p=None, top_k=None, num_return_sequences=n)


def _hf_score(hf, pairs, device) -> list[float]:
    """The peer for scoring: one right-padded forward, log-softmax, gather the continuation."""
    seqs = [c + k for c, k in pairs]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    with torch.inference_mode():
        logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), -1)
        picked = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()
    return [float(picked[r, len(c) - 1 : len(c) + len(k) - 1].sum()) for r, (c, k) in enumerate(pairs)]


def setup(cfg: BenchArgs) -> tuple[torch.device, Any, Engine, list[list[int]]]:
    """The benchmark's workload: threads set, a random-weight model of the configured shape and
    dtype, our engine on it, and the seeded random prompts (token ids)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    args = TransformerArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                           max_seqlen=cfg.max_prompt_len + max(cfg.new_tokens, cfg.continuation_len) + 8)
    model = build_model(args, device=device).to(getattr(torch, cfg.dtype))
    engine = Engine(model, _NoTokenizer(cfg.vocab_size), max_batch_tokens=cfg.max_batch_tokens)
    g = torch.Generator().manual_seed(cfg.seed)
    lens = torch.randint(cfg.min_prompt_len, cfg.max_prompt_len + 1, (cfg.prompts,), generator=g).tolist()
    prompts = [[1] + torch.randint(3, cfg.vocab_size, (n - 1,), generator=g).tolist() for n in lens]
    return device, model, engine, prompts


def run(cfg: BenchArgs) -> dict:
    device, model, engine, prompts = setup(cfg)
    lens = [len(p) for p in prompts]
    hf = _hf_model(model, device)
    ids, mask = _left_pad(prompts, device)
    n_gen = cfg.prompts * cfg.new_tokens
    print(f"model: {model.num_params() / 1e6:.2f}M params, dim {cfg.dim}, {cfg.n_layers} layers, "
          f"vocab {cfg.vocab_size}; "
          f"{cfg.dtype} on {device}, threads {torch.get_num_threads()}")
    print(f"workload: {cfg.prompts} prompts of {min(lens)}-{max(lens)} tokens, {cfg.new_tokens} new tokens each; "
          f"scoring continuations of {cfg.continuation_len} tokens")

    rows = []
    for name, temperature in (("greedy", 0.0), ("sample T=1", 1.0)):
        params = SamplingParams(temperature=temperature, max_new_tokens=cfg.new_tokens, ignore_eos=True, seed=cfg.seed)
        t_ours, t_hf, ours, hf_out = _timed_pair(
            lambda: engine.generate(prompts, params),
            lambda: _hf_generate(hf, ids, mask, cfg.new_tokens, temperature),
            cfg,
            device,
        )
        assert all(len(s[0].token_ids) == cfg.new_tokens for s in ours)
        assert hf_out.shape[1] == ids.shape[1] + cfg.new_tokens
        if temperature == 0.0:
            same = sum(s[0].token_ids == hf_out[r, ids.shape[1]:].tolist() for r, s in enumerate(ours))
            print(f"greedy agreement with HF generate: {same}/{cfg.prompts} sequences identical")
        rows.append((f"generate {name}", n_gen / t_ours, n_gen / t_hf))

    few = prompts[:: cfg.group]
    few_ids, few_mask = _left_pad(few, device)
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.new_tokens, ignore_eos=True, seed=cfg.seed, n=cfg.group)
    t_ours, t_hf, _, _ = _timed_pair(
        lambda: engine.generate(few, params),
        lambda: _hf_generate(hf, few_ids, few_mask, cfg.new_tokens, 1.0, cfg.group), cfg, device,
    )
    rows.append((f"generate n={cfg.group} per prompt", n_gen / t_ours, n_gen / t_hf))

    g2 = torch.Generator().manual_seed(cfg.seed + 1)
    conts = [torch.randint(3, cfg.vocab_size, (cfg.continuation_len,), generator=g2).tolist() for _ in prompts]
    unique = list(zip(prompts, conts))
    grouped = [(prompts[i // cfg.group], conts[i]) for i in range(cfg.prompts)]
    for name, pairs in (("score unique contexts", unique), (f"score {cfg.group} per context", grouped)):
        n_tok = sum(len(c) + len(k) for c, k in pairs)
        t_ours, t_hf, ours, theirs = _timed_pair(
            lambda: engine.score(pairs), lambda: _hf_score(hf, pairs, device), cfg, device
        )
        diff = max(abs(a.sum_logprob - b) for a, b in zip(ours, theirs))
        print(f"{name}: max |sum logprob difference| vs HF = {diff:.2e}")
        rows.append((name, n_tok / t_ours, n_tok / t_hf))

    print(f"\n{'workload (' + cfg.clock + ' clock)':<26}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}")
    for name, ours_tps, hf_tps in rows:
        print(f"{name:<26}{ours_tps:>12.0f}{hf_tps:>12.0f}{ours_tps / hf_tps:>7.2f}x")
    print("(scoring tok/s counts every context + continuation token of every pair)")
    return {name: {"ours": o, "hf": h, "ratio": o / h} for name, o, h in rows}


def main(argv=None) -> None:
    run(parse_args(BenchArgs, argv))


if __name__ == "__main__":
    main()
