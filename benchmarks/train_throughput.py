"""Training-step throughput: our trainer's step vs HF transformers ``LlamaForCausalLM``.

    .venv/bin/python -m benchmarks.train_throughput [--dim 256 --layers 4 --vocab 1024 --seq 256 --batch 8]
                                                    [--steps 8 --rounds 3 --threads 2 --no-compile]
                                                    [--clock process|wall] [--profile]

Both models get the same config (``lingua.hf.to_llama_config``), the same weights (copied with
``lingua.hf.lingua_to_hf_state_dict`` and checked: logits must agree before anything is timed),
the same batch, the same masked token-mean cross-entropy, the same AdamW (``lingua.optim``,
fused where available) and the same once-per-step gradient clipping, so the ratio measures the
model code and its compilation. "ours" is the model exactly as the trainer runs it
(``lingua.distributed.parallelize``: per-block ``torch.compile`` when compiled); HF runs its
default SDPA attention, compiled with ``model.compile()``.

Timing: each variant runs ``--steps`` timed steps after 2 warm-up steps (compilation happens
there and is reported separately), in ``--rounds`` interleaved rounds, so drift from other
processes on the machine hits every variant alike; the best round's median is reported.
``--clock process`` (the default) times CPU seconds of this process, the steady measure on a
shared machine: use it with ``--threads 1`` (with more threads it sums their CPU time);
``--clock wall`` times elapsed seconds.

``--preset tinyllama`` (TinyLlama-1.1B shape: dim 2048, 22 layers, 32 heads, 4 kv heads, FFN 5632,
vocab 32000, seq 2048) measures our trainer's step alone (no HF model: two 1.1B models and their
optimizers would not leave room for the batch), the way a 1.1B M-step runs: FSDP2 on a
one-process group (bf16 params, fp32 gradient reduction), each block compiled unless
``--no-compile``, wall clock, on CUDA when available; it prints tokens/s and MFU (model FLOPs of
:func:`lingua.transformer.flops_per_token` over the device's dense bf16 peak). ``--preset tiny``
runs the same path at a smoke-test size on CPU (gloo group, fp32, no MFU: a CPU has no known peak).

    .venv/bin/python -m benchmarks.train_throughput --preset tinyllama --batch 8 --steps 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from lingua.distributed import DistEnv, DistributedArgs, clip_grad_norm_, parallelize
from lingua.hf import lingua_to_hf_state_dict, to_llama_config
from lingua.optim import OptimArgs, build_optimizer
from lingua.trainer import masked_loss_sum
from lingua.transformer import TransformerArgs, build_model, flops_per_token

PRESETS = {
    "tinyllama": dict(dim=2048, layers=22, heads=32, kv_heads=4, hidden=5632, vocab=32000, seq=2048),
    "tiny": dict(dim=32, layers=1, heads=2, kv_heads=1, hidden=64, vocab=128, seq=32),
}

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def hf_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The trainer's loss (``masked_loss_sum``) for an HF model."""
    logits = model(input_ids=batch["input"]).logits
    target = batch["target"].masked_fill(~batch["loss_mask"], -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum")


def make_step(model: torch.nn.Module, loss_fn: Callable, batch: dict) -> Callable[[], float]:
    """One optimizer step as ``lingua.trainer`` takes it (one micro-batch, clip 1.0)."""
    opt = build_optimizer(model, OptimArgs(lr=1e-4, warmup=0))
    count = float(batch["loss_mask"].sum())

    def step() -> float:
        loss = loss_fn(model, batch) / count
        loss.backward()
        clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def build_pair(a: argparse.Namespace, compiled: bool) -> tuple[Callable, Callable, dict]:
    from transformers import LlamaForCausalLM

    args = TransformerArgs(
        dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, hidden_dim=a.hidden,
        vocab_size=a.vocab, max_seqlen=a.seq,
    )  # fmt: skip
    ours = build_model(args)
    config = to_llama_config(args)
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(lingua_to_hf_state_dict(ours.state_dict(), args), strict=False)
    hf.train()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=gen)
    batch = {"input": tokens[:, :-1], "target": tokens[:, 1:], "loss_mask": torch.ones(a.batch, a.seq, dtype=torch.bool)}
    with torch.no_grad():
        diff = (ours(batch["input"]) - hf(input_ids=batch["input"]).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"the models disagree (max |logit diff| = {diff:.2e}): weight copy is wrong")
    ours = parallelize(ours, DistributedArgs(compile=compiled), CPU)
    if compiled:
        hf.compile()
    ours_step = make_step(ours, lambda m, b: masked_loss_sum(m, b, CPU.device), batch)
    hf_step = make_step(hf, hf_loss_sum, batch)
    info = {"params_M": sum(p.numel() for p in hf.parameters()) / 1e6, "logit_diff": diff}
    return ours_step, hf_step, info


def warm(step: Callable) -> float:
    t0 = time.perf_counter()
    step()
    step()
    return time.perf_counter() - t0


def timed(step: Callable, n: int, clock: Callable[[], float]) -> float:
    times = []
    for _ in range(n):
        t0 = clock()
        step()
        times.append(clock() - t0)
    return statistics.median(times)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_dot_product",
            "aten::scaled_dot_product", "aten::_efficient_attention", "aten::_flash_attention")


def kernel_share(step: Callable, n: int = 3) -> tuple[float, float]:
    """Self CPU time of one eager step (mean of ``n``) and the share of it spent in matrix
    products and attention kernels: what no model-code change can remove."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key.startswith(GEMM_OPS))
    return total / n / 1e6, gemm / max(total, 1)


def fsdp_one_process(model: torch.nn.Module, device: torch.device, compiled: bool) -> torch.nn.Module:
    """FSDP2 on a one-process group, as ``lingua.distributed.parallelize`` shards a multi-GPU run
    (it leaves a single process unsharded): each block then the root, bf16 params with fp32
    gradient reduction on CUDA; blocks compiled first."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in model.layers:  # type: ignore[attr-defined]
        if compiled:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def ours_only(a: argparse.Namespace) -> dict[str, float]:
    """Tokens/s and MFU of our FSDP2 training step at the preset's shape (module docstring)."""
    import torch.distributed as dist

    from lingua.metrics import peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu")
    args = TransformerArgs(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, hidden_dim=a.hidden,
                           vocab_size=a.vocab, max_seqlen=a.seq)
    torch.manual_seed(0)
    model = fsdp_one_process(build_model(args, device=device), device, compiled=not a.no_compile)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=gen).to(device)
    batch = {"input": tokens[:, :-1], "target": tokens[:, 1:],
             "loss_mask": torch.ones(a.batch, a.seq, dtype=torch.bool, device=device)}
    step = make_step(model, lambda m, b: masked_loss_sum(m, b, device), batch)  # the loss read syncs the device
    print(f"warm-up (2 steps, incl. compilation): {warm(step):6.1f}s", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, a.steps, time.perf_counter)
    tps = a.batch * a.seq / seconds
    peak = peak_flops(device)
    mfu = flops_per_token(args, a.seq) * tps / peak if peak else None
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"model: {params:.1f}M params, dim={a.dim} layers={a.layers} heads={a.heads}/{a.kv_heads} ffn={a.hidden} "
          f"vocab={a.vocab}; batch {a.batch}x{a.seq}; FSDP2 (1 process), compile={not a.no_compile}, "
          f"{'bf16 params / fp32 reduce' if device.type == 'cuda' else 'fp32'}; {name}; torch {torch.__version__}")
    print(f"ours_fsdp {seconds * 1e3:8.1f} ms/step (median of {a.steps})  {tps:9.0f} tok/s  "
          f"MFU {'n/a (no known peak)' if mfu is None else f'{mfu:.1%}'}  peak memory {mem:.1f} GiB")
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"tokens_per_s": tps, "mfu": mfu or 0.0, "ms_per_step": seconds * 1e3}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--clock", choices=("process", "wall"), default="process")
    p.add_argument("--profile", action="store_true", help="also print each eager step's time share in GEMM/SDPA kernels")
    p.add_argument("--preset", choices=sorted(PRESETS), help="our FSDP2 step alone at this shape (see the docstring)")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto", help="--preset only: auto = CUDA when available")
    a = p.parse_args(argv)
    if a.preset:
        given = set(argv if argv is not None else __import__("sys").argv[1:])
        for key, value in PRESETS[a.preset].items():  # the preset's shape, unless given on the command line
            if f"--{key.replace('_', '-')}" not in given:
                setattr(a, key, value)
        torch.set_num_threads(a.threads)
        return ours_only(a)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tokens = a.batch * a.seq
    modes = ["eager"] + ([] if a.no_compile else ["compiled"])
    steps: dict[str, Callable] = {}
    for mode in modes:
        ours, hf, info = build_pair(a, compiled=mode == "compiled")
        steps[f"ours_{mode}"], steps[f"hf_{mode}"] = ours, hf
        for name in (f"ours_{mode}", f"hf_{mode}"):
            print(f"{name:15s} warm-up (2 steps, incl. compilation): {warm(steps[name]):6.1f}s", flush=True)
    print(f"model: {info['params_M']:.2f}M params, dim={a.dim} layers={a.layers} vocab={a.vocab}; "
          f"batch {a.batch}x{a.seq}; threads={a.threads}; {a.clock} clock; torch {torch.__version__}; "
          f"max |logit diff| ours vs HF = {info['logit_diff']:.1e}")  # fmt: skip
    best: dict[str, float] = {}
    for r in range(a.rounds):
        for name, step in steps.items():
            s = timed(step, a.steps, time.process_time if a.clock == "process" else time.perf_counter)
            best[name] = min(best.get(name, float("inf")), s)
    base = tokens / best["hf_eager"]
    results = {}
    for name, s in best.items():
        results[name] = tokens / s
        print(f"{name:15s} {s * 1e3:8.1f} ms/step  {tokens / s:9.0f} tok/s  {tokens / s / base:5.2f}x HF eager")
    if a.profile:
        for name in ("ours_eager", "hf_eager"):
            secs, share = kernel_share(steps[name])
            print(f"{name:15s} profiled: {secs * 1e3:7.1f} ms/step of operator time, {share:6.1%} in matmul/attention kernels")
    return results


if __name__ == "__main__":
    main()
