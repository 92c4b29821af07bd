"""Our models as an lm-evaluation-harness ``LM`` (registered as ``"bolt"``), served by any
:class:`lingua.generation.GenerationBackend` (the in-process :class:`~lingua.generation.Engine`
by default).

Limits are explicit and reported, never silent (the reference left-truncated every eval prompt to
1024 tokens without saying so):

* ``context_window``: tokens the model may see (default: the backend's ``max_seq_len``);
* ``max_gen_tokens``: a cap on new tokens; a task's own ``max_gen_toks`` applies below it;
* a prompt longer than ``context_window - new tokens`` is left-truncated (``overflow="truncate"``)
  or rejected (``overflow="error"``). Every truncation, every capped ``max_gen_toks`` and every
  generation that ran out of room is counted in :attr:`BoltLM.limits` (written to the results
  JSON) and logged as a warning once per call.

``generate_until``: the backend stops at the task's ``until`` strings; the text is cut again at
the first ``until`` string here, so a backend that does not strip stop strings gives the same
result (lm-eval expects the LM to do this). ``loglikelihood``: the backend's joint tokenization of
context + continuation (see :mod:`lingua.scoring`). ``loglikelihood_rolling``: disjoint windows of
the text, each scored with as much preceding context as fits, conditioned on BOS at the start.
Each of the three shows a tqdm progress bar over its requests (``progress=False`` hides it).

Registered as ``bolt`` when this module is imported; ``bolt-lm-eval``
(:mod:`apps.bolt.evaluation.cli`) registers it lazily for lm-eval's own command line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lingua.sampling import SamplingParams

logger = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("truncate", "error")
_KNOWN_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}


class ContextOverflow(ValueError):
    """A prompt does not fit the context window and the overflow policy is ``error``."""


@dataclass
class Limits:
    """Where the explicit limits bound during an evaluation (all counts)."""

    generate_requests: int = 0
    prompts_truncated: int = 0
    prompt_tokens_dropped: int = 0
    gen_toks_capped: int = 0
    """Requests whose task asked for more new tokens than ``max_gen_tokens``."""
    hit_length_limit: int = 0
    """Generations that ended on the token budget or the context window, not on a stop string."""
    loglikelihood_requests: int = 0
    loglikelihood_context_truncated: int = 0
    rolling_requests: int = 0
    rolling_windows: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@register_model("bolt")
class BoltLM(LM):
    """lm-eval ``LM`` backed by a :class:`~lingua.generation.GenerationBackend`."""

    def __init__(
        self,
        backend: Any,
        *,
        max_gen_tokens: int = 512,
        context_window: int | None = None,
        overflow: str = "truncate",
        seed: int = 0,
        chunk_size: int = 256,
        progress: bool = True,
    ):
        super().__init__()
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        self.backend = backend
        self.context_window = int(context_window or backend.max_seq_len)
        if self.context_window > backend.max_seq_len:
            raise ValueError(f"context_window={self.context_window} exceeds the backend's max_seq_len={backend.max_seq_len}")
        if not 1 <= max_gen_tokens < self.context_window:
            raise ValueError(f"max_gen_tokens must be in [1, context_window={self.context_window}), got {max_gen_tokens}")
        self.max_gen_tokens = max_gen_tokens
        self.overflow = overflow
        self.seed = seed
        self.chunk_size = chunk_size
        self.progress = progress
        self.limits = Limits()
        self._ignored_kwargs: set[str] = set()

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, *, device: str = "cpu", max_batch_tokens: int = 16384, **kwargs: Any) -> "BoltLM":
        """Load a consolidated folder or a run's ``checkpoints/<step>/`` (consolidated on demand)."""
        from apps.bolt.evaluation.checkpoints import load_checkpoint
        from lingua.generation import Engine

        loaded = load_checkpoint(ckpt, device=device)
        return cls(Engine(loaded.model, loaded.tokenizer, max_batch_tokens=max_batch_tokens), **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "BoltLM":
        """``lm_eval --model bolt --model_args ckpt=PATH,max_gen_tokens=256``."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "BoltLM":
        """Build from lm-eval's model args: ``ckpt`` plus any keyword of :meth:`from_checkpoint`.
        Of lm-eval's extras (``batch_size``, ``device``, ...) only ``device`` means something here."""
        args = dict(arg_dict)
        ckpt = args.pop("ckpt", None)
        if ckpt is None:
            raise ValueError("model_args must include ckpt=<consolidated folder or run/checkpoints/STEP>")
        device = args.pop("device", None)
        if device is None:  # lm-eval's --device (default cuda); cpu when there is no GPU
            device = (additional_config or {}).get("device") or "cpu"
            if str(device).startswith("cuda"):
                import torch

                if not torch.cuda.is_available():
                    logger.warning("device %s is not available; the bolt model runs on cpu", device)
                    device = "cpu"
        return cls.from_checkpoint(ckpt, device=device, **args)

    # ------------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    # ------------------------------------------------------------------------ generation
    def _bar(self, total: int, desc: str, disable_tqdm: bool):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=disable_tqdm or not self.progress or total == 0)

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled continuations, cut at the request's ``until`` strings."""
        out: list[str | None] = [None] * len(requests)
        bar = self._bar(len(requests), "bolt generate_until", disable_tqdm)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        before = self.limits.as_dict()
        for key, idxs in groups.items():
            kwargs = json.loads(key)
            params, until = self._sampling_params(kwargs, n_requests=len(idxs))
            prompts = [requests[i].args[0] for i in idxs]
            for start in range(0, len(prompts), self.chunk_size):
                chunk = prompts[start : start + self.chunk_size]
                results = self.backend.generate(chunk, self._fit_prompts(chunk, params))
                for j, res in enumerate(results):
                    r = res[0]
                    text = cut_at_stop(r.text, until)
                    i = idxs[start + j]
                    out[i] = text
                    self._count_generation(r)
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        self.limits.generate_requests += len(requests)
        self._warn_if_bound(before)
        return out  # type: ignore[return-value]

    def _sampling_params(self, kwargs: dict, n_requests: int) -> tuple[SamplingParams, list[str]]:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        ignored = set(kwargs) - _KNOWN_GEN_KWARGS - self._ignored_kwargs
        if ignored:
            logger.warning("generation kwargs %s are not supported by the bolt LM and are ignored", sorted(ignored))
            self._ignored_kwargs |= ignored
        wanted = int(kwargs.get("max_gen_toks", self.max_gen_tokens))
        if wanted > self.max_gen_tokens:
            self.limits.gen_toks_capped += n_requests
        sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
        params = SamplingParams(
            temperature=temperature,
            top_p=float(kwargs.get("top_p") or 1.0),
            top_k=int(kwargs.get("top_k") or 0),
            max_new_tokens=min(wanted, self.max_gen_tokens),
            stop_strings=[s for s in until if s],
            seed=self.seed,
            max_prompt_tokens=self.context_window - min(wanted, self.max_gen_tokens),
        )
        return params, until

    def _fit_prompts(self, prompts: Sequence[str], params: SamplingParams) -> SamplingParams:
        """Apply the overflow policy before generating (``error`` checks every prompt)."""
        if self.overflow == "error":
            budget = params.max_prompt_tokens
            for p in prompts:
                n = len(self.tokenizer.encode(p, add_bos=params.add_bos))
                if n > budget:
                    raise ContextOverflow(
                        f"prompt of {n} tokens exceeds context_window={self.context_window} minus "
                        f"{params.max_new_tokens} new tokens; raise the window, lower max_gen_tokens, "
                        f"use fewer shots, or set overflow=truncate. Prompt starts: {p[:80]!r}"
                    )
        return params

    def _count_generation(self, r: Any) -> None:
        if r.prompt_tokens_dropped:
            self.limits.prompts_truncated += 1
            self.limits.prompt_tokens_dropped += r.prompt_tokens_dropped
        if r.finish_reason == "length":
            self.limits.hit_length_limit += 1

    def _warn_if_bound(self, before: dict[str, int]) -> None:
        now = self.limits.as_dict()
        delta = {k: now[k] - before[k] for k in now if now[k] != before[k] and not k.endswith("requests") and k != "rolling_windows"}
        if delta:
            logger.warning(
                "limits bound (context_window=%d, max_gen_tokens=%d): %s",
                self.context_window,
                self.max_gen_tokens,
                ", ".join(f"{k}={v}" for k, v in delta.items()),
            )

    # ------------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` per request; an empty context means BOS."""
        pairs = [tuple(r.args) for r in requests]
        bar = self._bar(len(pairs), "bolt loglikelihood", disable_tqdm)
        before = self.limits.as_dict()
        out: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.chunk_size):
            chunk = pairs[start : start + self.chunk_size]
            for pair, res in zip(chunk, self.backend.score(chunk, max_len=self.context_window)):
                if res.tokens_dropped:
                    self.limits.loglikelihood_context_truncated += 1
                out.append((float(res.sum_logprob), bool(res.is_greedy)))
                self.cache_hook.add_partial("loglikelihood", pair, out[-1])
            bar.update(len(chunk))
        bar.close()
        self.limits.loglikelihood_requests += len(pairs)
        self._warn_if_bound(before)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text given BOS, over disjoint windows of the context."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        tok = self.tokenizer
        bos = tok.bos_id if tok.bos_id is not None else tok.eos_id
        out = []
        bar = self._bar(len(requests), "bolt loglikelihood_rolling", disable_tqdm)
        for req in requests:
            (text,) = req.args
            ids = tok.encode(text)
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(ids, prefix_token=bos, max_seq_len=self.context_window - 1, context_len=1)
            ]
            scores = self.backend.score(windows, max_len=self.context_window, add_bos=False) if windows else []
            total = float(sum(s.sum_logprob for s in scores))
            out.append(total)
            self.limits.rolling_windows += len(windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            bar.update(1)
        bar.close()
        self.limits.rolling_requests += len(requests)
        return out


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any non-empty ``until`` string."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]

