"""Sampling parameters and the pure math of drawing a token: logit processing and seeded streams.

Two ideas keep sampling reproducible and independent of how requests are batched:

* **One random stream per sample.** Each generated sequence owns a SplitMix64 counter stream
  keyed by ``(seed, prompt token ids, sample index)``; step ``t`` uses the stream's ``t``-th
  uniform. Nothing depends on the row a sequence occupies in a batch, on which other prompts share
  the batch, or on the device, so the same request draws the same uniforms anywhere.
* **Inverse-CDF sampling with one uniform per step.** The token is the first index whose cumulative
  probability (in token-id order, float64) exceeds ``u * total``. Rows never share random state,
  and a token can only change across batch compositions if float noise in the logits (different
  matmul blocking for different batch sizes, ~1e-7 relative) moves a CDF boundary across ``u``.

The processed distribution follows vLLM and HF order: temperature, then top-k, then top-p, then
banned tokens (``SamplingParams.banned_token_ids``) get probability 0 and the rest is renormalized.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass
class SamplingParams:
    """How to sample; shared by every prompt of one ``generate`` call (also a CLI config section)."""

    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it before top-k/top-p."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose mass reaches ``top_p`` (1 = off)."""
    top_k: int = 0
    """Keep the ``top_k`` most likely tokens, ties at the boundary included (0 = off)."""
    max_new_tokens: int = 256
    """Upper bound on generated tokens; the context window may stop a sequence earlier."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation stops after emitting one of these (recorded in ``token_ids``, not in ``text``)."""
    stop_strings: list[str] = field(default_factory=list)
    """Generation stops once the decoded text contains one; the text is cut before it."""
    ignore_eos: bool = False
    """By default the tokenizer's EOS id acts as a stop token; set True to generate through it."""
    n: int = 1
    """Samples per prompt; they share one prefill of the prompt."""
    seed: int = 0
    """Base of every per-sample random stream (see the module docstring)."""
    sample_offset: int = 0
    """Index of the first sample: ``n=2, sample_offset=2`` gives samples 2 and 3 of an ``n=4`` run."""
    max_prompt_tokens: Optional[int] = None
    """Left-truncate longer prompts to this many tokens (a leading BOS is kept); reported per result."""
    add_bos: bool = True
    """Prepend BOS when encoding text prompts (token-id prompts are used as given)."""
    banned_token_ids: list[int] = field(default_factory=list)
    """Never generated: these get probability 0 in the distribution actually sampled from, applied
    after temperature/top-k/top-p (the remaining tokens are renormalized; a row whose filters kept
    only banned tokens falls back to top-k/top-p over the allowed tokens). Reported
    ``sampled_logprobs`` are under that renormalized distribution, ``logprobs`` stay the raw
    model's. Greedy decoding takes the argmax of the allowed tokens. Must not be a stop token."""

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.sample_offset < 0:
            raise ValueError(f"sample_offset must be >= 0, got {self.sample_offset}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must not contain the empty string")
        bad = [t for t in self.banned_token_ids if isinstance(t, bool) or not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"banned_token_ids must be ints >= 0, got {bad}")
        both = sorted(set(self.banned_token_ids) & set(self.stop_token_ids))
        if both:
            raise ValueError(f"token ids {both} are both banned and stop tokens; a banned stop token could never stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# --------------------------------------------------------------------------------------------
# random streams


def stream_key(seed: int, prompt_ids: Sequence[int], sample_index: int) -> int:
    """64-bit key of the stream for one sample of one prompt (content-addressed, not position)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{seed}:{sample_index}:".encode())
    h.update(np.asarray(prompt_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def stream_uniforms(keys: Sequence[int], step: int | Sequence[int]) -> np.ndarray:
    """The ``step``-th uniform in [0, 1) of each key's SplitMix64 stream, as float64 [len(keys)].

    ``step`` is one step for all keys, or one per key (rows of a continuous batch are at
    different steps of their own streams)."""
    steps = [step] * len(keys) if isinstance(step, int) else step
    if len(steps) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(steps)} steps")
    out = np.empty(len(keys), dtype=np.float64)
    for i, (key, t) in enumerate(zip(keys, steps)):
        z = (key + (t + 1) * _GOLDEN) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        out[i] = (z >> 11) * (1.0 / (1 << 53))
    return out


# --------------------------------------------------------------------------------------------
# logits -> distribution -> token


def processed_logprobs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probabilities [B, V] (float32, -inf where filtered) of the distribution sampled from.

    ``temperature`` must be > 0 here (greedy decoding bypasses this function).
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False  # the most likely token always survives
        drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def sample_inverse_cdf(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids [B]: the first index whose float64 CDF (token-id order) exceeds ``u * total``."""
    cdf = torch.cumsum(logprobs.double().exp(), dim=-1)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=logprobs.shape[-1] - 1)


@dataclass
class TokenDraw:
    """One decoding step for a batch of rows (all tensors [B] on the logits' device)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor  # under the raw model distribution (temperature 1, no filtering, no bans)
    sampled_logprobs: torch.Tensor  # under the distribution actually sampled from (0 for greedy)
    is_greedy: torch.Tensor  # bool: the token is the argmax of the allowed (not banned) tokens


@functools.lru_cache(maxsize=64)
def _ban_index(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The banned ids as a device tensor, built once per (ids, device) rather than per step."""
    with torch.inference_mode(False):
        return torch.tensor(ids, dtype=torch.long, device=device)


def draw(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None) -> TokenDraw:
    """Pick one token per row of ``logits`` [B, V] and report its log-probabilities.

    ``uniforms`` (float64 [B], from :func:`stream_uniforms`) is ignored when greedy. Banned ids
    (``params.banned_token_ids``, each < V) are never picked, see :class:`SamplingParams`.
    """
    raw = torch.log_softmax(logits.float(), dim=-1)
    ban = _ban_index(tuple(params.banned_token_ids), raw.device) if params.banned_token_ids else None
    allowed_raw = raw if ban is None else raw.index_fill(1, ban, float("-inf"))
    argmax = allowed_raw.argmax(dim=-1)
    if params.greedy:
        tokens = argmax
        sampled = torch.zeros_like(argmax, dtype=raw.dtype)
    else:
        if uniforms is None:
            raise ValueError("sampling with temperature > 0 needs one uniform per row")
        filtered = params.top_k != 0 or params.top_p != 1.0
        plain = not filtered and params.temperature == 1.0
        proc = raw if plain else processed_logprobs(logits, params.temperature, params.top_k, params.top_p)
        if ban is None:
            tokens = sample_inverse_cdf(proc, uniforms)
            sampled = proc.gather(1, tokens[:, None]).squeeze(1)
        else:
            # banned ids at -inf, left unnormalized: the inverse CDF scales by the row's total, and
            # only the drawn tokens need log q = masked - logsumexp(masked)
            masked = allowed_raw if plain else proc.index_fill(1, ban, float("-inf"))
            if filtered:
                # rows whose filters kept only banned tokens: filter the allowed tokens instead
                # (torch.where, not a branch on the values: no device -> host sync)
                fallback = processed_logprobs(
                    logits.float().index_fill(1, ban, float("-inf")), params.temperature, params.top_k, params.top_p
                )
                masked = torch.where(masked.amax(dim=-1, keepdim=True) == float("-inf"), fallback, masked)
            tokens = sample_inverse_cdf(masked, uniforms)
            sampled = masked.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(masked, dim=-1)
    lp = raw.gather(1, tokens[:, None]).squeeze(1)
    return TokenDraw(tokens=tokens, logprobs=lp, sampled_logprobs=sampled, is_greedy=tokens == argmax)
