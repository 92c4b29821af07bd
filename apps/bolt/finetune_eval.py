"""Sampling evaluation of a finetuned model: n samples per test prompt, graded, then accuracy,
pass@k and majority@k.

Metrics (:func:`sample_metrics`, the reference's definitions, the original BoLT code's MATH
``process_results``):

* ``accuracy``: the mean over every (problem, sample) grade, i.e. the mean over problems of the
  share of right samples; ``accuracy_se``: its binomial standard error over problems,
  ``sqrt(p (1 - p) / n_problems)``;
* ``pass@k``: the share of problems with a right answer among their first ``k`` samples;
* ``maj@k``: the share of problems whose majority answer among the first ``k`` samples is right.
  Each sample's answer scores the number of those ``k`` answers that agree with it
  (:meth:`TaskFormat.same`: math-verify equivalence for MATH, equal numbers otherwise; a sample
  with no answer agrees with nothing); the first sample with the highest score is the vote;
* ``k`` runs over the powers of two below ``n`` and ``n`` itself (``eval.ks`` overrides).

Samples are drawn by :class:`lingua.generation.Engine` (or any ``GenerationBackend``) with one
random stream per (seed, prompt, sample index), and kept in a :class:`lingua.sample_store.SampleStore`
keyed by the model's fingerprint, the prompt and the sampling settings: an interrupted evaluation
draws only what is missing when rerun.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from apps.bolt.finetune_data import Problem, TaskFormat
from lingua.generation import GenerationBackend
from lingua.sample_store import SampleStore, make_key
from lingua.sampling import SamplingParams

logger = logging.getLogger("apps.bolt.finetune")


@dataclass
class SampleEvalArgs:
    """Sampling evaluation on the test split (defaults: the reference's finetune configs)."""

    n: int = 0
    """Samples per prompt; 0: the task's reference count (MATH 4, GSM8K 16, synthetic 4)."""
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 1600
    context_window: int = 2048
    """Prompt plus generation, as the reference's ``max_length`` (0: the model's ``max_seqlen``;
    never more than it). Longer prompts are left-truncated (BOS kept) and counted."""
    ks: list[int] = field(default_factory=list)
    """k of pass@k and maj@k; empty: 1, 2, 4, ... below n, and n."""
    before: bool = False
    """Also evaluate the checkpoint as given (before finetuning), on the same prompts."""
    device: str = "auto"
    """auto: CUDA when available, else CPU."""
    max_batch_tokens: int = 16384
    chunk: int = 64
    """Prompts per generation call; each call's samples are stored before the next starts."""

    def validate(self) -> None:
        if self.n < 0 or self.max_new_tokens < 1 or self.context_window < 0 or self.chunk < 1:
            raise ValueError("eval: n >= 0, max_new_tokens >= 1, context_window >= 0 and chunk >= 1 are required")
        if any(k < 1 for k in self.ks):
            raise ValueError(f"eval.ks must be >= 1, got {self.ks}")
        SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k).validate()


def default_ks(n: int) -> list[int]:
    """The powers of two below ``n``, then ``n`` (the reference's log-spaced k; the same for its n = 4, 16)."""
    return [2**e for e in range(n.bit_length()) if 2**e < n] + [n]


def majority_index(keys: Sequence[str | None], same: Callable[[str, str], bool]) -> int:
    """The sample whose answer most samples agree with (the first on ties)."""
    scores = [0 if a is None else sum(1 for b in keys if b is not None and (a == b or same(a, b))) for a in keys]
    return int(np.argmax(scores))


def sample_metrics(correct: Sequence[Sequence[bool]], keys: Sequence[Sequence[str | None]],
                   same: Callable[[str, str], bool], ks: Sequence[int] = ()) -> dict[str, Any]:
    """Accuracy, its binomial SE, pass@k and maj@k of graded samples (one row per problem, n
    samples each, in sample order); see the module docstring."""
    if not correct:
        raise ValueError("no problems to score")
    n = len(correct[0])
    if n < 1 or any(len(c) != n for c in correct) or [len(k) for k in keys] != [n] * len(correct):
        raise ValueError("every problem needs the same number (>= 1) of samples and answers")
    ks = sorted({k for k in (ks or default_ks(n))})
    if ks[-1] > n:
        raise ValueError(f"k={ks[-1]} exceeds the {n} samples per problem")
    grid = np.asarray(correct, dtype=bool)
    acc = float(grid.mean())
    out: dict[str, Any] = {"accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / len(grid)),
                           "n_problems": len(grid), "samples_per_problem": n}
    for k in ks:
        out[f"pass@{k}"] = float(grid[:, :k].any(axis=1).mean())
        out[f"maj@{k}"] = float(np.mean([row[majority_index(list(kk[:k]), same)] for row, kk in zip(grid, keys)]))
    return out


def sampling_params(args: SampleEvalArgs, fmt: TaskFormat, n: int, seed: int, window: int) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, n=n, seed=seed,
                          max_new_tokens=args.max_new_tokens, stop_strings=fmt.stop_strings(),
                          max_prompt_tokens=window - 1)


def draw_samples(backend: GenerationBackend, prompts: Sequence[str], params: SamplingParams, store: SampleStore,
                 model_key: str, chunk: int = 64) -> list[list[dict]]:
    """``params.n`` samples per prompt, from ``store`` where present, else drawn and stored."""
    from lingua.args import to_dict

    setting = {k: v for k, v in to_dict(params).items() if k not in ("n", "sample_offset")}
    keys = [make_key(model=model_key, prompt=p, params=setting, window=backend.max_seq_len) for p in prompts]
    have = store.get_many(keys)
    todo: dict[int, list[int]] = {}  # missing sample count -> prompt indices
    for i, key in enumerate(keys):
        missing = params.n - len(have.get(key, []))
        if missing > 0:
            todo.setdefault(len(have.get(key, [])), []).append(i)
    for start, idxs in sorted(todo.items()):
        part = SamplingParams(**{**to_dict(params), "n": params.n - start, "sample_offset": start})
        for c in range(0, len(idxs), chunk):
            block = idxs[c : c + chunk]
            results = backend.generate([prompts[i] for i in block], part)
            store.put_many((keys[i], start + j, {"text": r.text, "finish_reason": r.finish_reason,
                                                 "prompt_tokens_dropped": r.prompt_tokens_dropped})
                           for i, rs in zip(block, results) for j, r in enumerate(rs))
            logger.info("sampled %d/%d prompts (x%d)", min(c + chunk, len(idxs)), len(idxs), params.n - start)
    have = store.get_many(keys)
    return [have[k][: params.n] for k in keys]


def evaluate(backend: GenerationBackend, problems: Sequence[Problem], fmt: TaskFormat, args: SampleEvalArgs, *,
             n: int, seed: int, store_path: str | Path, model_key: str) -> tuple[dict[str, Any], list[dict]]:
    """Sample, grade and score; returns the metrics and one row per problem (prompt, samples,
    answers, grades)."""
    window = backend.max_seq_len
    params = sampling_params(args, fmt, n, seed, window)
    prompts = [fmt.prompt(p) for p in problems]
    with SampleStore(store_path) as store:
        samples = draw_samples(backend, prompts, params, store, model_key, args.chunk)
    rows, correct, keys = [], [], []
    for p, prompt, ss in zip(problems, prompts, samples):
        texts = [s["text"] for s in ss]
        keys.append([fmt.extract(t) for t in texts])
        correct.append([fmt.grade(t, p) for t in texts])
        rows.append({"id": p.id, "prompt": prompt, "gold": p.gold, "samples": texts, "answers": keys[-1],
                     "correct": correct[-1]})
    metrics = sample_metrics(correct, keys, fmt.same, args.ks)
    flat = [s for ss in samples for s in ss]
    metrics["limits"] = {"prompts_truncated": sum(1 for s in flat if s["prompt_tokens_dropped"] > 0),
                         "hit_length": sum(1 for s in flat if s["finish_reason"] == "length")}
    return metrics, rows
