"""Try a trained model: ``python -m apps.bolt.generate ckpt=DIR prompts=FILE|interactive [key=value ...]``.

``prompts`` is ``interactive`` (read prompts from stdin, one per line, until EOF or ``exit``), a
``.jsonl`` file (each line a JSON string or an object with a ``"prompt"`` key; use this for
prompts with newlines) or any other text file (one prompt per non-empty line, used verbatim).
Sampling settings live under ``sampling.`` (see :class:`lingua.sampling.SamplingParams`), e.g.
``sampling.temperature=0 sampling.max_new_tokens=64 sampling.stop_strings='["\\n"]'``.
Results are printed with throughput; ``output=FILE.jsonl`` also writes them as JSON lines.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TextIO

import torch

from lingua.args import cli_config
from lingua.backends import build_backend, check_backend
from lingua.errors import entry_point
from lingua.generation import Engine, GenerationResult
from lingua.io import write_jsonl
from lingua.sampling import SamplingParams

INTERACTIVE = "interactive"


@dataclass
class GenerateArgs:
    ckpt: str = ""
    """Consolidated checkpoint folder (``lingua.consolidated``)."""
    prompts: str = INTERACTIVE
    """``interactive``, a ``.jsonl`` file or a text file with one prompt per line."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``."""
    backend: str = "engine"
    """``engine`` (in-process) | ``vllm`` (CUDA; ``pip install -e .[vllm]``)."""
    dtype: str = "float32"
    """Model weights dtype: float32 or bfloat16 (bfloat16 is slow on CPU)."""
    max_batch_tokens: int = 16384
    """Token budget per forward (rows x cache length); bounds memory."""
    output: Optional[str] = None
    """Optional JSONL file for the results (written atomically)."""

    def validate(self) -> None:
        if not self.ckpt:
            raise ValueError("ckpt=DIR (a consolidated checkpoint folder) is required")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        check_backend(self.backend)
        if self.output is not None and self.prompts == INTERACTIVE:
            raise ValueError("output= needs a prompts file, not interactive mode")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` or plain text file; bad lines raise naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON line: {e}") from e
        prompt = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{lineno}: expected a JSON string or an object with a string 'prompt'")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def generate_and_report(
    engine: Engine, prompts: Sequence[str], params: SamplingParams, out: TextIO = sys.stdout
) -> tuple[list[list[GenerationResult]], dict]:
    """Generate, print every sample and a throughput line; returns (results, stats)."""
    start = time.perf_counter()
    results = engine.generate(list(prompts), params)
    if getattr(engine, "device", None) is not None and engine.device.type == "cuda":  # vLLM returns synchronized
        torch.cuda.synchronize(engine.device)
    seconds = time.perf_counter() - start
    for i, (prompt, samples) in enumerate(zip(prompts, results)):
        for j, r in enumerate(samples):
            reason = r.finish_reason if r.stop_reason is None else f"{r.finish_reason}: {r.stop_reason!r}"
            print(
                f"--- prompt {i} sample {j} | {len(r.token_ids)} tokens, {reason}, "
                f"sum logprob {r.sum_logprob:.2f}"
                + (f", {r.prompt_tokens_dropped} prompt tokens dropped" if r.prompt_tokens_dropped else ""),
                file=out,
            )
            print(f"{prompt}\033[1m{r.text}\033[0m" if out.isatty() else prompt + r.text, file=out)
    generated = sum(len(r.token_ids) for samples in results for r in samples)
    stats = {
        "prompts": len(prompts),
        "samples": sum(len(s) for s in results),
        "prompt_tokens": sum(s[0].prompt_len for s in results),
        "generated_tokens": generated,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(generated / max(seconds, 1e-9), 1),
    }
    print(
        f"=== {stats['samples']} samples from {stats['prompts']} prompts: {generated} tokens in "
        f"{seconds:.2f} s, {stats['tokens_per_s']:.1f} tokens/s",
        file=out,
    )
    return results, stats


def _records(prompts: Sequence[str], results: list[list[GenerationResult]]) -> list[dict]:
    return [
        {
            "prompt_index": i,
            "sample": j,
            "prompt": prompt,
            "text": r.text,
            "token_ids": r.token_ids,
            "sum_logprob": r.sum_logprob,
            "finish_reason": r.finish_reason,
            "stop_reason": r.stop_reason,
            "prompt_len": r.prompt_len,
            "prompt_tokens_dropped": r.prompt_tokens_dropped,
        }
        for i, (prompt, samples) in enumerate(zip(prompts, results))
        for j, r in enumerate(samples)
    ]


def build_engine(cfg: GenerateArgs) -> Engine:
    """The configured backend (an :class:`Engine` unless ``backend=vllm``)."""
    return build_backend(cfg.backend, cfg.ckpt, device=cfg.device, dtype=cfg.dtype, max_batch_tokens=cfg.max_batch_tokens)


def run(cfg: GenerateArgs, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> dict:
    engine = build_engine(cfg)
    if cfg.prompts != INTERACTIVE:
        prompts = read_prompts(cfg.prompts)
        results, stats = generate_and_report(engine, prompts, cfg.sampling, out)
        if cfg.output:
            write_jsonl(cfg.output, _records(prompts, results))
        return stats
    totals = {"prompts": 0, "generated_tokens": 0, "seconds": 0.0}
    print("Type a prompt and press Enter (exit or Ctrl-D to quit).", file=out)
    while True:
        print("> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "exit":
            break
        if not line.strip():
            continue
        _, stats = generate_and_report(engine, [line.rstrip("\n")], cfg.sampling, out)
        for key in totals:
            totals[key] += stats[key]
    return totals


@entry_point("apps.bolt.generate")
def main(argv: Sequence[str] | None = None) -> None:
    run(cli_config(GenerateArgs, argv, "apps.bolt.generate"))


if __name__ == "__main__":
    main()
