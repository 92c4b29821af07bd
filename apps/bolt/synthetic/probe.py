"""Learnability probe: do latent thoughts beat the same raw tokens repeated, in this world?

``python -m apps.bolt.synthetic.probe [config=FILE.yaml] [key=value ...]``

It exists to choose the world's default difficulty by measurement before the full pipeline
(``prepare`` -> ``gen_latents`` -> ``train`` -> ``eval``) runs end to end, and to re-check it
cheaply after a change to the generator. It is deliberately small and self-contained:

1. a corpus of ``num_docs`` raw documents (fixed ``corpus_seed``), chunked by the project
   chunker, with oracle latents for every chunk (exactly what the warm-start teacher stage
   produces);
2. for each training seed and each condition, a fresh tiny Llama (:mod:`lingua.transformer`)
   trained for the *same number of tokens*: ``raw`` on the raw documents, repeated as often as
   the budget allows; ``latent`` on the same documents in the ``random`` latent layout of
   :mod:`apps.bolt.formats` (a fresh prior/posterior coin per chunk and epoch);
3. greedy few-shot evaluation on held-out ``dev`` problems through :class:`lingua.generation.Engine`:
   the raw model on the raw variant, the latent model on the latent variant (it writes its own
   thought); as diagnostics, both again without exemplars, and the latent model on the raw
   variant.

The training loop is a plain AdamW loop over packed windows (BOS/EOS documents, no document
mask), not the project trainer; the final numbers of the issue are to be measured with the
real pipeline. Results go to ``{out_dir}/results.json`` and are printed as a table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from apps.bolt.chunking import ChunkArgs
from apps.bolt.formats import make_layout
from apps.bolt.synthetic.corpus import WorldArgs, generate_corpus, make_world_args
from apps.bolt.synthetic.oracle import DEFAULT_LATENT_STYLE, oracle_records, synthetic_chunk_args
from apps.bolt.synthetic.tasks import accuracy_report, build_prompt, generate_eval_problems, grade, stop_strings
from apps.bolt.synthetic.tokenizer import get_synthetic_tokenizer
from lingua.args import dump_config, parse_args
from lingua.errors import entry_point
from lingua.generation import Engine
from lingua.io import atomic_write_json
from lingua.sampling import SamplingParams
from lingua.tokenizer import Tokenizer, build_tokenizer
from lingua.transformer import TransformerArgs, build_model


def _probe_model() -> TransformerArgs:
    """The project's ``tiny`` model (configs/model/tiny.yaml): width 128, 4 layers, 4 heads sharing
    2 kv heads, FFN 384; 0.92M parameters with the 512-entry synthetic vocabulary."""
    return TransformerArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384, max_seqlen=512)


@dataclass
class ProbeArgs:
    out_dir: str = "runs/synthetic_probe"
    cache_dir: str = ".cache/synthetic"
    """Where the synthetic tokenizer is cached."""
    world: WorldArgs = field(default_factory=WorldArgs)
    latent_style: str = DEFAULT_LATENT_STYLE
    chunk: ChunkArgs = field(default_factory=synthetic_chunk_args)
    num_docs: int = 2000
    corpus_seed: int = 0
    conditions: list[str] = field(default_factory=lambda: ["raw", "latent"])
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds (model init and data order); the corpus stays fixed."""
    model: TransformerArgs = field(default_factory=_probe_model)
    train_tokens: int = 3_000_000
    """Training tokens per run, the same for every condition (token-matched)."""
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    eval_split: str = "dev"
    n_eval: int = 100
    num_fewshot: int = 3
    zero_shot: bool = True
    """Also evaluate every model without exemplars."""
    eval_seed: int = 0
    threads: int = 2
    log_every: int = 250

    def validate(self) -> None:
        if set(self.conditions) - {"raw", "latent"} or not self.conditions:
            raise ValueError(f"conditions must be a non-empty subset of ['raw', 'latent'], got {self.conditions}")
        if self.train_tokens < self.batch_size * self.seq_len:
            raise ValueError("train_tokens is smaller than one batch")


def windows(records: list[dict], layout: str, tok: Tokenizer, seq_len: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless packed windows of ``seq_len + 1`` tokens over shuffled epochs of ``records``."""
    fmt = make_layout(layout)
    buf: list[int] = []
    while True:
        for i in rng.permutation(len(records)):
            buf += tok.encode(fmt(records[i], rng), add_bos=True, add_eos=True)
            while len(buf) >= seq_len + 1:
                yield buf[: seq_len + 1]
                buf = buf[seq_len:]


def count_tokens(records: list[dict], layout: str, tok: Tokenizer) -> int:
    fmt = make_layout(layout)
    rng = np.random.default_rng(0)
    return sum(len(tok.encode(fmt(r, rng), add_bos=True, add_eos=True)) for r in records)


def train_one(cfg: ProbeArgs, records: list[dict], layout: str, tok: Tokenizer, seed: int) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(seed)
    margs = replace(cfg.model, vocab_size=tok.vocab_size, seed=seed)
    model = build_model(margs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    steps = cfg.train_tokens // (cfg.batch_size * cfg.seq_len)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    stream = windows(records, layout, tok, cfg.seq_len, np.random.default_rng([seed, 1]))
    losses = []
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = torch.tensor([next(stream) for _ in range(cfg.batch_size)])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            rate = (step + 1) * cfg.batch_size * cfg.seq_len / (time.time() - t0)
            print(f"  {layout} seed {seed} step {step + 1}/{steps} loss {np.mean(losses[-cfg.log_every:]):.3f} ({rate:.0f} tok/s)", flush=True)
    model.eval()
    return model, losses


def evaluate(model: torch.nn.Module, tok: Tokenizer, cfg: ProbeArgs, variant: str, num_fewshot: int) -> dict:
    items = generate_eval_problems(cfg.n_eval, cfg.eval_seed, cfg.eval_split, args=cfg.world)
    shots = generate_eval_problems(num_fewshot, cfg.eval_seed, "fewshot", args=cfg.world)
    prompts = [build_prompt(item, shots, variant, cfg.latent_style) for item in items]
    engine = Engine(model, tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=96 if variant == "latent" else 24, stop_strings=stop_strings(variant))
    with torch.no_grad():
        outs = engine.generate(prompts, params)
    correct = [grade(o[0].text, str(item.problem.answer), variant) for o, item in zip(outs, items)]
    report = accuracy_report(items, correct)
    report["examples"] = [{"prompt_tail": p[-120:], "generation": o[0].text} for p, o in zip(prompts[:3], outs[:3])]
    return report


def evaluations(cfg: ProbeArgs, condition: str) -> dict[str, tuple[str, int]]:
    """Name -> (variant, shots). Each model is graded on its own variant with ``num_fewshot``
    exemplars; zero-shot runs show how much comes from the exemplars rather than from training;
    the latent model on the raw variant shows what its thoughts add."""
    own = "raw" if condition == "raw" else "latent"
    out = {own: (own, cfg.num_fewshot)}
    if cfg.zero_shot:
        out[f"{own}_0shot"] = (own, 0)
    if condition == "latent":
        out["raw"] = ("raw", cfg.num_fewshot)
    return out


def run(cfg: ProbeArgs) -> dict:
    torch.set_num_threads(cfg.threads)
    cfg.world = make_world_args(cfg.world)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    tok = build_tokenizer(get_synthetic_tokenizer(cfg.cache_dir, args=cfg.world))
    docs = list(generate_corpus(cfg.num_docs, cfg.corpus_seed, args=cfg.world))
    records = list(oracle_records(docs, cfg.chunk, cfg.latent_style))
    raw_tokens, latent_tokens = count_tokens(records, "raw", tok), count_tokens(records, "random", tok)
    print(f"corpus: {len(docs)} docs, {raw_tokens} raw tokens, {latent_tokens} latent-layout tokens "
          f"(x{latent_tokens / raw_tokens:.2f}); budget {cfg.train_tokens} tokens = "
          f"{cfg.train_tokens / raw_tokens:.1f} raw epochs / {cfg.train_tokens / latent_tokens:.1f} latent epochs", flush=True)
    results = {"raw_tokens": raw_tokens, "latent_layout_tokens": latent_tokens, "runs": []}
    for seed in cfg.seeds:
        for condition in cfg.conditions:
            t0 = time.time()
            model, losses = train_one(cfg, records, "raw" if condition == "raw" else "random", tok, seed)
            evals = {name: evaluate(model, tok, cfg, v, k) for name, (v, k) in evaluations(cfg, condition).items()}
            run_result = {
                "condition": condition,
                "seed": seed,
                "final_loss": float(np.mean(losses[-20:])),
                "seconds": round(time.time() - t0, 1),
                "params": sum(p.numel() for p in model.parameters()),
                "eval": evals,
            }
            results["runs"].append(run_result)
            accs = ", ".join(f"{name} {e['all']['accuracy']:.3f}" for name, e in evals.items())
            print(f"seed {seed} {condition:6s}: loss {run_result['final_loss']:.3f}, {accs} ({run_result['seconds']} s)", flush=True)
            atomic_write_json(out / "results.json", results)
    return results


@entry_point("apps.bolt.synthetic.probe")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(ProbeArgs, argv))


if __name__ == "__main__":
    main()
