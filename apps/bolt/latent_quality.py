"""Latent quality: how right are the thoughts an E-step wrote, where a world knows the truth.

The paper cannot measure this (nobody knows the true thoughts behind a FineMath page); a world
with an oracle can. A *scorer* compares each of a chunk's K posterior samples with the true
latent of the same (prefix, suffix) and returns a :class:`ChunkQuality`; the E-step calls the
scorer registered for its corpus (see :func:`scorer_for`) and accumulates the result in a
:class:`QualityTally`, whose sums add across shards. The scorer of the synthetic world lives in
:mod:`apps.bolt.synthetic.quality`; a real corpus has none and the E-step skips this.

What is measured (``QualityTally.summary``); "chunks with a thought" are those whose true latent
is non-empty, the only ones where a thought can be right or wrong:

* ``selected_correct``: the kept latent equals the true one (whitespace-normalized), among the
  chunks with a thought; ``selected_correct_all`` counts every chunk, an empty true latent
  being matched by an empty sample;
* ``equation_recall``: share of the true latent's equations present in the kept latent;
  ``equation_truth``: share of the kept latents' equations that are arithmetically true;
* the selector comparison, expected correctness of the kept latent under each rule, on chunks
  with a thought: ``sir`` (the self-normalized weights), ``uniform`` (1/K each), ``argmax``
  (the largest log weight), ``best_of_k`` (any of the K is right: the ceiling of any selector),
  and ``sample`` (one sample, i.e. what K=1 would keep);
* thought dependence of the model: over chunks with both right and wrong samples, the mean of
  (mean log weight of the right ones - mean log weight of the wrong ones) in nats, and the share
  of (right, wrong) pairs whose right sample has the larger weight. A model whose answers do not
  depend on its thoughts gives a gap near 0 and a share near 0.5: importance resampling then has
  nothing to select.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

from apps.bolt import importance as imp


@dataclass
class ChunkQuality:
    """Per-sample scores of one chunk's K latents against its true latent."""

    has_thought: bool
    """The true latent is non-empty."""
    correct: list[bool]
    """Sample k equals the true latent (for an empty true latent: sample k is empty)."""
    equations: list[int] = field(default_factory=list)
    """Equations written in sample k."""
    true_equations: list[int] = field(default_factory=list)
    """Of those, arithmetically true."""
    recalled: list[int] = field(default_factory=list)
    """True-latent equations present in sample k (multiset intersection)."""
    oracle_equations: int = 0
    """Equations in the true latent."""


class LatentScorer(Protocol):
    def score(self, prefix: str, suffix: str, latents: Sequence[str]) -> ChunkQuality: ...


_SCORERS: dict[str, Callable[[], LatentScorer]] = {}
_BY_SOURCE: dict[str, str] = {}


def register_scorer(name: str, factory: Callable[[], LatentScorer], sources: Sequence[str] = ()) -> None:
    """Make a scorer available by ``name``; ``sources``: values of a record's ``source`` field
    for which ``quality=auto`` picks it."""
    _SCORERS[name] = factory
    for s in sources:
        _BY_SOURCE[s] = name


def scorer_names() -> list[str]:
    _load_builtin()
    return sorted(_SCORERS)


def scorer_for(name: str, records: Sequence[dict] = ()) -> tuple[str, LatentScorer] | None:
    """The scorer to use: ``none`` -> None; ``auto`` -> the one registered for the ``source`` of
    every record (None when they have none or disagree); else the named one (unknown: error)."""
    _load_builtin()
    if name == "none":
        return None
    if name == "auto":
        sources = {r.get("source") for r in records}
        if len(sources) != 1 or next(iter(sources)) not in _BY_SOURCE:
            return None
        name = _BY_SOURCE[next(iter(sources))]
    if name not in _SCORERS:
        raise ValueError(f"unknown latent quality scorer {name!r}; known: none, auto, {', '.join(sorted(_SCORERS))}")
    return name, _SCORERS[name]()


def _load_builtin() -> None:
    import apps.bolt.synthetic.quality  # noqa: F401  registers the synthetic world's scorer


@dataclass
class QualityTally:
    """Additive sums over chunks (merge shards with ``+``); rates come from :meth:`summary`."""

    chunks: int = 0
    chunks_with_thought: int = 0
    samples: int = 0
    selected_correct: int = 0
    selected_correct_all: int = 0
    sir_expected: float = 0.0
    uniform_expected: float = 0.0
    argmax_correct: int = 0
    best_of_k: int = 0
    first_sample_correct: int = 0
    sel_equations: int = 0
    sel_true_equations: int = 0
    sel_recalled: int = 0
    oracle_equations: int = 0
    all_equations: int = 0
    all_true_equations: int = 0
    gap_chunks: int = 0
    gap_sum: float = 0.0
    pairs: int = 0
    pair_wins: float = 0.0

    def add(self, q: ChunkQuality, log_w: Sequence[float], selected: int) -> None:
        k = len(q.correct)
        if k != len(log_w) or not 0 <= selected < k:
            raise ValueError(f"{k} scores for {len(log_w)} log weights, selected {selected}")
        self.chunks += 1
        self.samples += k
        self.selected_correct_all += q.correct[selected]
        self.all_equations += sum(q.equations)
        self.all_true_equations += sum(q.true_equations)
        if not q.has_thought:
            return
        w = imp.normalized_weights(log_w)
        self.chunks_with_thought += 1
        self.selected_correct += q.correct[selected]
        self.sir_expected += float(sum(wi for wi, c in zip(w, q.correct) if c))
        self.uniform_expected += sum(q.correct) / k
        self.argmax_correct += q.correct[max(range(k), key=lambda i: log_w[i])]
        self.best_of_k += any(q.correct)
        self.first_sample_correct += q.correct[0]
        self.sel_equations += q.equations[selected]
        self.sel_true_equations += q.true_equations[selected]
        self.sel_recalled += q.recalled[selected]
        self.oracle_equations += q.oracle_equations
        right = [lw for lw, c in zip(log_w, q.correct) if c]
        wrong = [lw for lw, c in zip(log_w, q.correct) if not c]
        if right and wrong:
            self.gap_chunks += 1
            self.gap_sum += sum(right) / len(right) - sum(wrong) / len(wrong)
            self.pairs += len(right) * len(wrong)
            self.pair_wins += sum(1.0 if r > x else 0.5 if r == x else 0.0 for r in right for x in wrong)

    def __add__(self, other: QualityTally) -> QualityTally:
        return QualityTally(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QualityTally:
        return cls(**{f.name: d.get(f.name, 0) for f in fields(cls)})

    def summary(self) -> dict:
        """Rates (None where undefined) plus the counts they come from."""
        n = self.chunks_with_thought

        def rate(num: float, den: float) -> float | None:
            return num / den if den else None

        return {
            "chunks": self.chunks,
            "chunks_with_thought": n,
            "samples_per_chunk": rate(self.samples, self.chunks),
            "selected_correct": rate(self.selected_correct, n),
            "selected_correct_all": rate(self.selected_correct_all, self.chunks),
            "equation_recall": rate(self.sel_recalled, self.oracle_equations),
            "equation_truth": rate(self.sel_true_equations, self.sel_equations),
            "equation_truth_all_samples": rate(self.all_true_equations, self.all_equations),
            "selector": {
                "sir": rate(self.sir_expected, n),
                "uniform": rate(self.uniform_expected, n),
                "argmax": rate(self.argmax_correct, n),
                "best_of_k": rate(self.best_of_k, n),
                "sample": rate(self.first_sample_correct, n),
            },
            "log_weight_gap": rate(self.gap_sum, self.gap_chunks),
            "right_beats_wrong": rate(self.pair_wins, self.pairs),
            "gap_chunks": self.gap_chunks,
        }
