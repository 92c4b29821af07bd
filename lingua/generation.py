"""Batched sampling and scoring with a KV cache: the in-process backend behind every model reader.

Batching: a :class:`lingua.slot_pool.SlotPool` of KV-cache rows. Prompts are deduplicated and
queued longest first; every live row decodes in lockstep (one forward per step, one cache slot
for all rows, a per-row position offset and key mask), and a row leaves as soon as its sample
ends. With ``refill`` (continuous batching) queued prompts join as rows free up; without it a
batch runs until its last row ends (static batches). Sampled lengths vary a lot, so static
batches narrow as rows finish and continuous batching needs fewer decode forwards for the same
tokens (a third fewer on a CPU E-step). On this project's 2-core CPU a decode step's cost grows
with its rows, so that saved nothing and the pool's extra prefills cost 7%: static is the CPU
default. On a GPU a small batch's decode step costs about the same whatever its rows, so
continuous is the CUDA default (its gain there is not measured yet). Measurements and commands:
docs/estep.md, "Batching". Prefill runs in length buckets, so padding costs no prefill compute
(:func:`lingua.batching.left_padded_prefill`). Decoding runs on input-major copies of the weights
(:meth:`Transformer.packed_weights`), which MKL multiplies faster when each step has only a few
rows.

Sharing: a prompt is prefilled once, then its cache rows are copied to its ``n`` samples (and
to repeats of the same prompt in the call). :meth:`Engine.score` groups pairs whose context is
identical and prefills that context once for all its continuations; this is how the E-step scores
K joint texts sharing a prefix.

Determinism: each sample owns the random stream ``(seed, prompt ids, sample index)``, see
:mod:`lingua.sampling`. Batch-invariant: the stream, hence the uniforms, and every per-row
computation. Not bit-invariant: the logits themselves, because matmul kernels may reduce in a
different order for a different batch size or padding; the effect is ~1e-7 relative, so a sample
differs only if it lands on a CDF boundary (or on an argmax near-tie when greedy).

Budget: ``max_batch_tokens`` bounds rows x cache length of the decoding pool (the KV cache) and
rows x sequence length of a scoring forward (whose logits take ``max_batch_tokens * vocab * 4``
bytes). A single item larger than the budget still runs, alone.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, Union, runtime_checkable

import torch

from lingua.batching import EngineStats, truncate_left
from lingua.sampling import SamplingParams, draw, stream_key, stream_uniforms
from lingua.scoring import ScoreResult, score_pairs
from lingua.slot_pool import SlotPool
from lingua.transformer import Transformer

Prompt = Union[str, Sequence[int]]

# refill the pool once 1/REFILL_DIVISOR of its rows are free: each refill is one prefill forward
REFILL_DIVISOR = 4
# cache slots past the longest prompt's max_new, as a fraction of max_new, so prompts can join
# while old rows finish (measured on an E-step: 0.5 ran the fewest decode forwards of 0.25-1)
HEADROOM = 0.5


class TokenizerLike(Protocol):
    """The part of ``lingua.tokenizer.Tokenizer`` the engine uses."""

    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class GenerationResult:
    """One sample. Log-prob lists align with ``token_ids`` (stop tokens included)."""

    text: str  # decoded generation, cut before a stop string; excludes a stop token id
    token_ids: list[int]  # every generated token, including the one(s) that triggered the stop
    logprobs: list[float]  # log p_model(token) at temperature 1, unfiltered
    sampled_logprobs: list[float]  # log q(token): tempered/top-k/top-p, bans renormalized (0 if greedy)
    is_greedy: list[bool]  # token was the argmax of the allowed (not banned) tokens
    finish_reason: str  # "stop" or "length"
    stop_reason: str | int | None  # the stop string or stop token id; None for "length"
    prompt_len: int  # prompt tokens fed to the model (after truncation)
    prompt_tokens_dropped: int = 0  # tokens removed from the left of the prompt

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def sum_sampled_logprob(self) -> float:
        return float(sum(self.sampled_logprobs))

    @property
    def all_greedy(self) -> bool:
        return all(self.is_greedy)


@runtime_checkable
class GenerationBackend(Protocol):
    """What readers of a model call; :class:`Engine` is in-process, vLLM can serve the same."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_seq_len(self) -> int: ...

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[GenerationResult]]:
        """``params.n`` results per prompt, in prompt order."""
        ...

    def score(
        self, pairs: Sequence[tuple[Prompt, Prompt]], max_len: int | None = None, *, add_bos: bool = True
    ) -> list[ScoreResult]:
        """log p(continuation | context) per pair; see :func:`lingua.scoring.score_pairs`."""
        ...


@dataclass
class _Row:
    """Host-side state of one sequence being decoded."""

    slot: tuple[int, int]  # (prompt index, sample j) in the output
    key: int  # random stream key
    prompt_len: int
    dropped: int
    max_new: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampled: list[float] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)


@dataclass
class _Work:
    """A unique prompt and the samples to draw from it in one batch."""

    ids: list[int]
    samples: list[tuple[tuple[int, int], int, int]]  # (output slot, sample index, prompt tokens dropped)
    max_new: int


class Engine:
    """In-process :class:`GenerationBackend` over a :class:`~lingua.transformer.Transformer`.

    ``max_seq_len`` (default ``model.args.max_seqlen``) is the context window: prompts must leave
    room for one token, generation ends with ``"length"`` when a sequence reaches it, and
    scoring truncates contexts to it. ``refill``: continuous batching (True) or static batches
    (False), the same samples either way; default: continuous on CUDA, static on CPU (module
    docstring).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: TokenizerLike,
        *,
        device: str | torch.device | None = None,
        max_batch_tokens: int = 16384,
        max_seq_len: int | None = None,
        refill: bool | None = None,
    ):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self._tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens
        self._max_seq_len = max_seq_len or model.args.max_seqlen
        self.refill = self.device.type == "cuda" if refill is None else refill
        self.stats = EngineStats()

    @property
    def tokenizer(self) -> TokenizerLike:
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    # ---------------------------------------------------------------------------------------
    # generation

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[GenerationResult]]:
        params.validate()
        self._check_banned(params)
        results: list[list[GenerationResult | None]] = [[None] * params.n for _ in prompts]
        # decoding multiplies a few rows at a time: worth one copy of the weights per call (scoring
        # multiplies whole sequences, where the layout gains little and the copy would dominate
        # small calls)
        with self.model.packed_weights(), varying_shape_attention(self.device):
            works, stops = self._work(prompts, params), self._stop_ids(params)
            for row in self._decode(works, params, stops) if works else []:
                results[row.slot[0]][row.slot[1]] = self._finish(row, params, stops)
        return results  # type: ignore[return-value]

    def _encode_prompt(self, prompt: Prompt, add_bos: bool, index: int) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_bos=add_bos)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {index} is empty (no tokens); pass add_bos=True or a non-empty prompt")
        if min(ids) < 0 or max(ids) >= self.model.args.vocab_size:
            raise ValueError(f"prompt {index} has token ids outside [0, {self.model.args.vocab_size})")
        return ids

    def _work(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[_Work]:
        """Encode, truncate and deduplicate prompts; occurrence k of a prompt takes samples k*n.."""
        by_ids: dict[tuple[int, ...], _Work] = {}
        for i, prompt in enumerate(prompts):
            ids = self._encode_prompt(prompt, params.add_bos, i)
            dropped = 0
            if params.max_prompt_tokens is not None:
                ids, dropped = truncate_left(ids, params.max_prompt_tokens, self.tokenizer.bos_id)
            if len(ids) >= self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens but the context window is {self.max_seq_len}; "
                    "set max_prompt_tokens to left-truncate it"
                )
            max_new = min(params.max_new_tokens, self.max_seq_len - len(ids))
            work = by_ids.setdefault(tuple(ids), _Work(ids, [], max_new))
            first = params.sample_offset + len(work.samples)
            work.samples.extend(((i, j), first + j, dropped) for j in range(params.n))
        return list(by_ids.values())

    def _pool(self, works: list[_Work]) -> SlotPool:
        """Rows x cache length within ``max_batch_tokens``. A call whose rows all fit at once (or
        a static engine) gets a cache of exactly the longest prompt plus ``max_new``; otherwise
        the cache gets ``HEADROOM * max_new`` more slots, so new prompts can join while old
        rows finish (:mod:`lingua.slot_pool`)."""
        width = max(len(w.ids) for w in works)
        max_new = max(w.max_new for w in works)
        rows = sum(len(w.samples) for w in works)
        if rows * (width + max_new) <= self.max_batch_tokens:
            return SlotPool(self.model, rows, width + max_new, self.device)
        cache_len = width + max_new + (int(HEADROOM * max_new) if self.refill else 0)
        return SlotPool(self.model, max(1, self.max_batch_tokens // cache_len), cache_len, self.device)

    def _decode(self, works: list[_Work], params: SamplingParams, stops: set[int]) -> list[_Row]:
        """Decode every sample over a :class:`SlotPool`: prompts join longest first (as rows free
        up with ``refill``, else once the pool is empty), every live row decodes one token per
        step, and finished rows leave at once."""
        dev = self.device
        pool = self._pool(works)
        queue: deque[_Work] = deque()
        for w in sorted(works, key=lambda w: -len(w.ids)):  # a prompt's samples may fill the pool
            for s in range(0, len(w.samples), pool.capacity):
                queue.append(_Work(w.ids, w.samples[s : s + pool.capacity], w.max_new))
        rows: list[_Row] = []
        logits = torch.empty(0, device=dev)
        done: list[_Row] = []
        while rows or queue:
            if queue and (not rows or (self.refill and pool.free >= max(1, pool.capacity // REFILL_DIVISOR))):
                joined, new_logits = self._admit(pool, queue, params)
                rows += joined
                logits = new_logits if len(rows) == len(joined) else torch.cat([logits, new_logits])
            uniforms = None
            if not params.greedy:
                uniforms = torch.from_numpy(stream_uniforms([r.key for r in rows], [len(r.tokens) for r in rows]))
                uniforms = uniforms.to(dev)
            d = draw(logits, params, uniforms)
            host = torch.stack(
                [d.tokens.double(), d.logprobs.double(), d.sampled_logprobs.double(), d.is_greedy.double()]
            ).tolist()  # the step's one device -> host transfer
            keep: list[int] = []
            for i, row in enumerate(rows):
                tok = int(host[0][i])
                row.tokens.append(tok)
                row.logprobs.append(host[1][i])
                row.sampled.append(host[2][i])
                row.greedy.append(host[3][i] == 1.0)
                if tok in stops or self._hits_stop_string(row, params) or len(row.tokens) >= row.max_new:
                    done.append(row)
                else:
                    keep.append(i)
            self.stats.generated_tokens += len(rows)
            next_tokens = d.tokens
            if len(keep) < len(rows):
                pool.drop(keep)
                rows = [rows[i] for i in keep]
                next_tokens = next_tokens[torch.tensor(keep, dtype=torch.long, device=dev)]
            if rows:
                logits = pool.step(next_tokens)
                self.stats.decode_rows += len(rows)
                self.stats.decode_steps += 1
        return done

    def _admit(self, pool: SlotPool, queue: deque[_Work], params: SamplingParams) -> tuple[list[_Row], torch.Tensor]:
        """Move the queue's first prompts into the pool while rows are free and the cache has room."""
        width = len(queue[0].ids)  # the longest queued prompt
        group: list[_Work] = []
        free, max_new = pool.free, 0
        while queue and len(queue[0].samples) <= free and pool.can_admit(width, max(max_new, queue[0].max_new)):
            w = queue.popleft()
            group.append(w)
            free -= len(w.samples)
            max_new = max(max_new, w.max_new)
        if not group:
            return [], torch.empty(0, device=self.device)
        logits = pool.admit([w.ids for w in group], [len(w.samples) for w in group], max_new)
        self.stats.prefill_tokens += sum(len(w.ids) for w in group)
        self.stats.batches += 1
        rows = [
            _Row(slot, 0 if params.greedy else stream_key(params.seed, w.ids, s), len(w.ids), dropped, w.max_new)
            for w in group
            for slot, s, dropped in w.samples
        ]
        return rows, logits

    def _check_banned(self, params: SamplingParams) -> None:
        """Banned ids must be in the vocabulary, leave some token allowed, and never be a stop
        token (EOS included unless ``ignore_eos``): a banned stop token could never end a sequence."""
        banned = set(params.banned_token_ids)
        if not banned:
            return
        vocab = self.model.args.vocab_size
        if max(banned) >= vocab:
            raise ValueError(f"banned_token_ids {sorted(t for t in banned if t >= vocab)} are outside [0, {vocab})")
        if len(banned) >= vocab:
            raise ValueError("banned_token_ids ban the whole vocabulary")
        both = sorted(banned & self._stop_ids(params))
        if both:
            eos = " (EOS is a stop token unless ignore_eos=True)" if self.tokenizer.eos_id in both else ""
            raise ValueError(
                f"token ids {both} are both banned and stop tokens{eos}; a banned stop token could never stop"
            )

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        stops = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer.eos_id is not None:
            stops.add(self.tokenizer.eos_id)
        return stops

    def _hits_stop_string(self, row: _Row, params: SamplingParams) -> bool:
        """Cheap check on a decoded tail; the exact cut is made once, in :meth:`_finish`.

        Every token that spells part of a stop string contributes at least one of its UTF-8
        bytes, so the string spans at most that many tokens; 8 more keep it clear of the tail's
        first token, whose decoding can differ from the full decode (partial characters, spaces).
        """
        if not params.stop_strings:
            return False
        window = max(len(s.encode("utf-8")) for s in params.stop_strings) + 8
        tail = self.tokenizer.decode(row.tokens[-window:])
        return any(s in tail for s in params.stop_strings) and self._cut_at_stop(row, params) is not None

    def _cut_at_stop(self, row: _Row, params: SamplingParams) -> tuple[str, str] | None:
        """(text before the earliest stop string, that string), or None if none occurs."""
        text = self.tokenizer.decode(row.tokens)
        found = [(text.find(s), -len(s), s) for s in params.stop_strings if s in text]
        if not found:
            return None
        at, _, stop = min(found)
        return text[:at], stop

    def _finish(self, row: _Row, params: SamplingParams, stop_ids: set[int]) -> GenerationResult:
        last = row.tokens[-1]
        cut = self._cut_at_stop(row, params) if params.stop_strings else None
        if last in stop_ids:
            text, reason, stop = self.tokenizer.decode(row.tokens[:-1]), "stop", last
        elif cut is not None:
            (text, stop), reason = cut, "stop"
        else:
            text, reason, stop = self.tokenizer.decode(row.tokens), "length", None
        return GenerationResult(
            text=text,
            token_ids=row.tokens,
            logprobs=row.logprobs,
            sampled_logprobs=row.sampled,
            is_greedy=row.greedy,
            finish_reason=reason,
            stop_reason=stop,
            prompt_len=row.prompt_len,
            prompt_tokens_dropped=row.dropped,
        )

    # ---------------------------------------------------------------------------------------
    # scoring

    @torch.inference_mode()
    def score(
        self, pairs: Sequence[tuple[Prompt, Prompt]], max_len: int | None = None, *, add_bos: bool = True
    ) -> list[ScoreResult]:
        """log p(continuation | context) per pair; rules in :mod:`lingua.scoring`."""
        with varying_shape_attention(self.device):
            return score_pairs(
                self.model,
                self.tokenizer,
                pairs,
                max_len=max_len or self.max_seq_len,
                max_batch_tokens=self.max_batch_tokens,
                add_bos=add_bos,
                stats=self.stats,
            )


def varying_shape_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """Attention kernels for inference, where every call has new shapes (each decode step grows
    the KV length). On CUDA, PyTorch prefers cuDNN attention for bf16/fp16, which builds an
    execution plan per new shape: measured on an H200, a bf16 E-step ran 3.5x slower than fp32
    until cuDNN was left out. Flash, memory-efficient and math kernels have no per-shape cost."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
