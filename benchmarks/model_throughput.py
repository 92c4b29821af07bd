"""Training throughput (forward + backward + AdamW step, fp32, eager) of candidate model sizes
on this machine; used to pick the `tiny` preset (apps/bolt/configs/model/tiny.yaml).

    .venv/bin/python -m benchmarks.model_throughput [--vocab 1024] [--seq 256] [--batch 8] [--steps 6]

Prints one line per candidate: parameters, median step time, tokens/s, and tokens per CPU-second
(CPU time the process used, all threads together). Wall-clock numbers are noisy when other
processes share the 2 cores; tokens per CPU-second (run with --threads 1) is much less affected
and approximates what one free core does per wall-clock second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lingua.transformer import TransformerArgs, build_model, flops_per_token

CANDIDATES = {
    "d128_l4": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384),
    "d192_l4": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, hidden_dim=512),
    "d256_l4": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=768),
}


def measure(name: str, kw: dict, vocab: int, seq: int, batch: int, steps: int) -> dict:
    args = TransformerArgs(vocab_size=vocab, max_seqlen=seq, **kw)
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    times, cpu = [], []
    for step in range(steps + 2):  # 2 warmup steps
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    step_s = statistics.median(times)
    tok_s = batch * seq / step_s
    return {
        "name": name,
        "params_M": model.num_params() / 1e6,
        "step_s": step_s,
        "tok_s": tok_s,
        "GFLOP_s": flops_per_token(args, seq) * tok_s / 1e9,
        # CPU seconds per step: what the step costs when the cores are not shared
        "cpu_s": statistics.median(cpu),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"vocab={a.vocab} seq={a.seq} batch={a.batch} threads={a.threads} torch={torch.__version__}")
    for name, kw in CANDIDATES.items():
        r = measure(name, kw, a.vocab, a.seq, a.batch, a.steps)
        print(f"{r['name']:10s} params={r['params_M']:.2f}M step={r['step_s']*1e3:.0f}ms "
              f"tok/s={r['tok_s']:.0f} ({r['GFLOP_s']:.1f} GFLOP/s) cpu={r['cpu_s']*1e3:.0f}ms/step "
              f"-> {a.batch * a.seq / r['cpu_s']:.0f} tok per CPU-second")  # fmt: skip


if __name__ == "__main__":
    main()
