"""Posterior inference over latent thoughts for a batch of chunks (the E-step's core).

For each chunk (prefix X_<, suffix X) and a model serving both layouts:

1. sample K latents from the posterior layout ``{prefix}<SoL><EoL>{suffix}<SoL><POST>``, stopping
   at ``<EoL>``; ``log q(Z|X)`` is the sum of the sampled tokens' log-probs under the distribution
   actually sampled from (temperature/top-k/top-p applied), the ``<EoL>`` stop token included;
   the markers ``<SoL>``, ``<PRIOR>``, ``<POST>`` and the tokenizer's BOS/EOS are banned inside a
   latent (``ban_special_tokens``), so q is renormalized over the other tokens;
2. score ``log p(Z, X | X_<)`` as the log-prob of ``<SoL><PRIOR>{Z}<EoL>{suffix}`` after the
   prefix, counting the opening ``<SoL>`` (the reference skips it by an off-by-one). The K joint
   texts of one chunk share their context, so the backend prefills the prefix once for all K;
3. ``log w = log p - log q``; keep one latent by SIR (or argmax / uniform) with an RNG stream of
   (seed, document key, chunk index), so the choice does not depend on sharding or batching;
   report normalized weights, effective sample size and the IWAE ELBOs ``elbo_n``.

Samples and joint scores are cached in a :class:`~lingua.sample_store.SampleStore` keyed by the
model's content fingerprint, the exact prompt and the sampling parameters; raising K later only
draws the missing samples (``sample_offset``), and a killed run resumes where it stopped.

Context overflow rule (stated, counted, reported): the prompt plus ``max_latent_tokens`` must fit
in the context window. The prefix is cut first, from the left (its most distant text goes
first); if the suffix alone is still too long, its tail is cut for inference. Records keep the
full text either way.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from apps.bolt import importance as imp
from apps.bolt.chunking import ChunkArgs, chunk_text
from apps.bolt.formats import EOL, POST, PRIOR, SOL, estep_prompt, joint_text
from lingua.args import check_min
from lingua.generation import GenerationBackend
from lingua.sample_store import SampleStore, make_key
from lingua.sampling import SamplingParams


@dataclass
class PosteriorArgs:
    num_samples: int = 4
    """K: posterior samples per chunk."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_latent_tokens: int = 1024
    """Generation limit per latent (the reference: 1024); a latent that hits it is not 'done'."""
    max_context_tokens: Optional[int] = None
    """Context window for sampling and scoring; None: the model's max_seqlen."""
    selection: str = "sir"
    """sir (sampling-importance-resampling, the reference) | argmax | uniform (ablations)."""
    elbo_samples: list[int] = field(default_factory=lambda: [1, 2, 4])
    """n of the reported ELBO_n (those above num_samples are skipped)."""
    seed: int = 42
    ban_special_tokens: bool = True
    """Never sample <SoL>, <PRIOR>, <POST>, BOS or EOS inside a latent (probability 0, the rest
    renormalized, so log q stays exact); only <EoL>, which ends the thought, stays allowed. Without
    it a sampled thought can open a nested latent and carry markers into the training data; false
    reproduces the old unrestricted sampling (and its cache keys)."""

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.selection not in imp.SELECTION_RULES:
            raise ValueError(f"selection must be one of {imp.SELECTION_RULES}, got {self.selection!r}")
        if self.max_latent_tokens < 1:
            raise ValueError("max_latent_tokens must be >= 1")
        if any(n < 1 for n in self.elbo_samples):
            raise ValueError(f"elbo_samples must be >= 1, got {self.elbo_samples}")
        check_min(self, 0, "top_k")
        check_min(self, 1, "max_context_tokens")


@dataclass
class ChunkInput:
    prefix: str
    suffix: str
    doc_key: str  # stable id of the document (selection RNG stream)
    chunk_idx: int


@dataclass
class ChunkPosterior:
    latents: list[str]
    log_q: list[float]
    log_p: list[float]
    done: list[bool]
    gen_len: list[int]
    selected: int
    ess: float
    elbo: dict[int, float]
    suffix_tokens: int  # raw tokens of the suffix (normalizer of per-token ELBO)
    prefix_chars_dropped: int = 0
    suffix_tokens_cut: int = 0

    @property
    def scored_tokens(self) -> int:
        """Suffix tokens the ELBO covers: all of them unless the suffix was cut to fit the window.
        The normalizer of any per-token ELBO (dividing a cut chunk's bound by all its tokens would
        inflate it)."""
        return self.suffix_tokens - self.suffix_tokens_cut

    @property
    def log_w(self) -> list[float]:
        return [p - q for p, q in zip(self.log_p, self.log_q)]

    @property
    def latent(self) -> str:
        return self.latents[self.selected]

    def weights(self) -> list[float]:
        return imp.normalized_weights(self.log_w).tolist()


@dataclass
class PosteriorStats:
    chunks: int = 0
    samples_drawn: int = 0
    samples_cached: int = 0
    not_done: int = 0
    prefix_truncated: int = 0
    suffix_truncated: int = 0
    sample_seconds: float = 0.0
    score_seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        total = self.sample_seconds + self.score_seconds
        d["cost_ratio_vs_sampling"] = total / self.sample_seconds if self.sample_seconds > 0 else None
        return d


def _selection_rng(seed: int, doc_key: str, chunk_idx: int) -> np.random.Generator:
    h = int.from_bytes(hashlib.blake2b(doc_key.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, h, chunk_idx])


class PosteriorSampler:
    """Runs steps 1-3 above for batches of chunks against any :class:`GenerationBackend`."""

    def __init__(
        self,
        backend: GenerationBackend,
        args: PosteriorArgs,
        *,
        model_fingerprint: str,
        store: SampleStore | None = None,
    ):
        args.validate()
        self.backend, self.args, self.store = backend, args, store
        self.fp = model_fingerprint
        tok = backend.tokenizer
        if EOL not in getattr(tok, "special_ids", {}):
            raise ValueError(f"the model's tokenizer has no {EOL} token; was it trained with latent tokens?")
        self.eol_id = tok.special_ids[EOL]
        self.banned_ids = self._banned_ids(tok) if args.ban_special_tokens else []
        self.max_ctx = args.max_context_tokens or backend.max_seq_len
        if self.max_ctx <= args.max_latent_tokens + 8:
            raise ValueError(
                f"context window {self.max_ctx} leaves no room for prompts with max_latent_tokens="
                f"{args.max_latent_tokens}; lower posterior.max_latent_tokens"
            )
        self.stats = PosteriorStats()

    def _banned_ids(self, tok) -> list[int]:
        """Sorted ids a latent may not contain: SoL/PRIOR/POST and BOS/EOS where the tokenizer has
        them; never the stop token EoL."""
        ids = {tok.special_ids[s] for s in (SOL, PRIOR, POST) if s in tok.special_ids}
        ids |= {i for i in (getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)) if i is not None and i >= 0}
        ids.discard(self.eol_id)
        return sorted(ids)

    # -- step 0: fit the prompt -------------------------------------------------------------
    def _fit(self, c: ChunkInput) -> tuple[str, str, int, int, int]:
        """(prefix, suffix, prefix chars dropped, suffix tokens cut, suffix tokens)."""
        tok = self.backend.tokenizer
        budget = self.max_ctx - self.args.max_latent_tokens
        suffix_ids = tok.encode(c.suffix)
        n_suffix = len(suffix_ids)
        if len(tok.encode(estep_prompt(c.prefix, c.suffix), add_bos=True)) <= budget:
            return c.prefix, c.suffix, 0, 0, n_suffix
        overhead = len(tok.encode(estep_prompt("x", ""), add_bos=True))  # BOS + markers (+1 slack)
        room = budget - overhead - n_suffix
        prefix, cut = c.prefix, 0
        if room > 0:
            pre_ids = tok.encode(c.prefix)
            prefix = tok.decode(pre_ids[len(pre_ids) - room :])
            while prefix and len(tok.encode(estep_prompt(prefix, c.suffix), add_bos=True)) > budget:
                prefix = prefix[max(1, len(prefix) // 16) :]
        else:
            prefix = ""
            keep = budget - overhead
            if keep < 1:
                raise ValueError("context window too small for any suffix")
            cut = n_suffix - keep
            suffix = tok.decode(suffix_ids[:keep])
            return "", suffix, len(c.prefix), cut, n_suffix
        return prefix, c.suffix, len(c.prefix) - len(prefix), cut, n_suffix

    def _sample_key(self, prompt: str) -> str:
        a = self.args
        return make_key(
            kind="posterior", model=self.fp, prompt=prompt, temperature=a.temperature, top_p=a.top_p,
            top_k=a.top_k, max_latent_tokens=a.max_latent_tokens, max_ctx=self.max_ctx, seed=a.seed,
            # only when set, so unbanned runs keep the keys of caches written before bans existed
            **({"banned_token_ids": self.banned_ids} if self.banned_ids else {}),
        )

    # -- step 1: samples (cached, topped up) -------------------------------------------------
    def _samples(self, prompts: list[str]) -> list[list[dict]]:
        k = self.args.num_samples
        keys = [self._sample_key(p) for p in prompts]
        have = self.store.get_many(keys) if self.store else {}
        out = [list(have.get(key, []))[:k] for key in keys]
        self.stats.samples_cached += sum(len(s) for s in out)
        by_offset: dict[int, list[int]] = {}
        for i, s in enumerate(out):
            if len(s) < k:
                by_offset.setdefault(len(s), []).append(i)
        t0 = time.perf_counter()
        for offset, rows in sorted(by_offset.items()):
            params = SamplingParams(
                temperature=self.args.temperature, top_p=self.args.top_p, top_k=self.args.top_k,
                max_new_tokens=self.args.max_latent_tokens, stop_token_ids=[self.eol_id], ignore_eos=True,
                n=k - offset, sample_offset=offset, seed=self.args.seed, add_bos=True,
                banned_token_ids=list(self.banned_ids),
            )
            results = self.backend.generate([prompts[i] for i in rows], params)
            new_items = []
            for i, res in zip(rows, results):
                for j, r in enumerate(res):
                    value = {
                        "latent": r.text,
                        "log_q": r.sum_sampled_logprob if not params.greedy else 0.0,
                        "done": r.finish_reason == "stop",
                        "gen_len": len(r.token_ids),
                    }
                    out[i].append(value)
                    new_items.append((keys[i], offset + j, value))
            self.stats.samples_drawn += len(new_items)
            if self.store:
                self.store.put_many(new_items)
        self.stats.sample_seconds += time.perf_counter() - t0
        return out

    # -- step 2: joint scores (cached) -------------------------------------------------------
    def _joint_pairs(self, prefix: str, latents: list[str], suffix: str) -> tuple[list[tuple[list[int], list[int]]], int]:
        """Token pairs (context, scored) of one chunk's K joint texts, and suffix tokens cut.

        The scored part ``<SoL><PRIOR>Z<EoL>suffix`` must fit the window with one context token;
        if the longest sample does not, the same number of suffix tokens is cut from the end for
        all K samples (so their weights stay comparable), as in the reference. The context is
        left-truncated by the backend if needed. Special tokens split the text, so encoding the
        pieces separately gives exactly the ids of the whole joint string.
        """
        tok = self.backend.tokenizer
        jt = [joint_text(prefix, z, suffix) for z in latents]
        ctx = tok.encode(prefix, add_bos=True)
        heads = [tok.encode(j.scored[: len(j.scored) - len(suffix)]) for j in jt]
        suf = tok.encode(suffix)
        over = max(map(len, heads)) + len(suf) - (self.max_ctx - 1)
        cut = max(0, over)
        if cut:
            suf = suf[: max(0, len(suf) - cut)]
        return [(ctx, h + suf) for h in heads], cut

    def _joint(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log p(scored | context) for token pairs, cached by content."""
        t0 = time.perf_counter()
        keys = [make_key(kind="joint", model=self.fp, context=c, scored=s) for c, s in pairs]
        cached = self.store.get_many(keys) if self.store else {}
        scores = {key: v[0]["log_p"] for key, v in cached.items()}
        todo = [i for i, key in enumerate(keys) if key not in scores]
        if todo:
            res = self.backend.score([pairs[i] for i in todo], self.max_ctx, add_bos=True)
            new = []
            for i, r in zip(todo, res):
                scores[keys[i]] = r.sum_logprob
                new.append((keys[i], 0, {"log_p": r.sum_logprob}))
            if self.store:
                self.store.put_many(new)
        self.stats.score_seconds += time.perf_counter() - t0
        return [scores[key] for key in keys]

    # -- all steps ---------------------------------------------------------------------------
    def run(self, chunks: Sequence[ChunkInput]) -> list[ChunkPosterior]:
        fitted = [self._fit(c) for c in chunks]
        prompts = [estep_prompt(p, s) for p, s, *_ in fitted]
        samples = self._samples(prompts)
        pairs, cuts = [], []
        for f, ss in zip(fitted, samples):
            p, cut = self._joint_pairs(f[0], [s["latent"] for s in ss], f[1])
            pairs.extend(p)
            cuts.append(cut)
        log_p = self._joint(pairs)
        out, pos = [], 0
        k = self.args.num_samples
        for c, f, ss, cut in zip(chunks, fitted, samples, cuts):
            lp = log_p[pos : pos + k]
            pos += k
            lq = [s["log_q"] for s in ss]
            lw = [p - q for p, q in zip(lp, lq)]
            rng = _selection_rng(self.args.seed, c.doc_key, c.chunk_idx)
            out.append(
                ChunkPosterior(
                    latents=[s["latent"] for s in ss], log_q=lq, log_p=lp, done=[s["done"] for s in ss],
                    gen_len=[s["gen_len"] for s in ss], selected=imp.select(lw, self.args.selection, rng),
                    ess=imp.effective_sample_size(lw),
                    elbo={n: imp.elbo(lw, n) for n in self.args.elbo_samples if n <= k},
                    suffix_tokens=f[4], prefix_chars_dropped=f[2], suffix_tokens_cut=f[3] + cut,
                )
            )
            self.stats.not_done += sum(not s["done"] for s in ss)
            self.stats.prefix_truncated += f[2] > 0
            self.stats.suffix_truncated += (f[3] + cut) > 0
        self.stats.chunks += len(chunks)
        return out


def compute_elbo(
    backend: GenerationBackend,
    docs: Sequence[str],
    *,
    elbo_samples: Sequence[int] = (1, 2, 4),
    seed: int = 0,
    max_latent_tokens: Optional[int] = None,
    chunk: Optional[ChunkArgs] = None,
) -> dict[str, float]:
    """n-sample ELBOs of held-out raw documents (in-training and EM evaluation of latent models).

    Each document is chunked by ``chunk`` (default: uniform chunks with the whole previous text as
    prefix, as the reference's ELBO evaluation); K = max(elbo_samples) posterior samples are drawn
    per chunk, and for each n in ``elbo_samples``
    ``elbo_n = sum over chunks of logsumexp(log w[:n]) - log n``, a lower bound on
    ``log p(document)`` under the model's latent-variable view. Returned per corpus on the
    log-likelihood scale (negative, higher is better): ``elbo_{n}_per_token`` (divided by the
    suffix tokens the bounds cover, :attr:`ChunkPosterior.scored_tokens`), ``elbo_{n}_per_char``
    and ``elbo_{n}_per_doc``.
    """
    ns = sorted({int(n) for n in elbo_samples})
    if not ns or ns[0] < 1:
        raise ValueError(f"elbo_samples must be positive sample counts, got {list(elbo_samples)}")
    chunk = chunk or ChunkArgs(random=False, all_prefix=True, seed=seed)
    max_latent = max_latent_tokens or max(16, min(1024, backend.max_seq_len // 4))
    args = PosteriorArgs(num_samples=ns[-1], elbo_samples=ns, max_latent_tokens=max_latent, seed=seed)
    sampler = PosteriorSampler(backend, args, model_fingerprint="live")
    items, chars = [], 0
    for d, text in enumerate(docs):
        items.extend(ChunkInput(c.prefix, c.suffix, f"doc{d}", i) for i, c in enumerate(chunk_text(text, chunk)))
        chars += len(text)
    posts = sampler.run(items) if items else []
    tokens = sum(p.scored_tokens for p in posts)
    out: dict[str, float] = {}
    for n in ns:
        total = sum(p.elbo[n] for p in posts)
        out[f"elbo_{n}_per_token"] = total / max(1, tokens)
        out[f"elbo_{n}_per_char"] = total / max(1, chars)
        out[f"elbo_{n}_per_doc"] = total / max(1, len(docs))
    return out
