"""Which test documents an evaluation with ``harness.limit=N`` scores.

lm-eval's own ``limit`` takes the *first* N documents of a task. Test files are rarely shuffled:
the synthetic world's ``test.jsonl`` interleaves worlds and hands the turns of a used-up world to
the next one, so its first 200 items mix worlds and step counts differently from all 500 (one
model scored 0.55 on the first 200 and 0.43 on all 500). Accuracies at different limits were then
not comparable. The default rule here is a seeded, stratified sample instead:

* **strata**: the values of the fields that the task YAML lists under ``metadata.stratify``
  (synthetic: ``[world, steps]``; MATH subjects: ``[level]``); no list: one stratum, i.e. a
  seeded uniform sample;
* **allocation**: proportional to stratum size, rounded by largest remainder so the counts add up
  to exactly N (each stratum gets the floor or the ceiling of its quota ``N * size / total``;
  ties between equal remainders are broken by the seeded generator);
* **within a stratum**: the first ``k`` of a seeded permutation of its documents;
* **order**: the chosen documents in their original test order.

One ``numpy.random.Generator(PCG64(seed))`` drives the choice, so the same (N, seed) and test file
give the same documents. Subsets for different N are chosen independently (the subset for a
smaller N is not, in general, inside the one for a larger N).

The ``first`` rule keeps lm-eval's behaviour (documents ``0..N-1``). When N is at least the number
of documents, every document is scored (recorded as rule ``all``).

The chosen indices go to lm-eval through ``simple_evaluate(samples={task: [doc indices]})``
(supported by lm-eval 0.4.x; indices must be sorted, since lm-eval walks the documents in order
and maps the k-th kept document back to ``samples[k]``). The logged samples keep the original
document index as ``doc_id``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

SUBSET_RULES = ("stratified", "first")
STRATIFY_KEY = "stratify"
"""Key under a task YAML's ``metadata`` that lists the stratification fields."""


@dataclass(frozen=True)
class TaskSubset:
    """The documents of one task that an evaluation scores."""

    task: str
    rule: str
    """``stratified``, ``first`` or ``all`` (the limit covers every document)."""
    seed: int | None
    """Seed of the stratified choice (None for ``first``/``all``)."""
    stratify: list[str]
    """Stratification fields (empty: uniform)."""
    n: int
    """Documents scored."""
    total: int
    """Documents in the task's test split."""
    strata: int | None
    """Number of distinct strata among all documents (1 without fields; None unless stratified)."""
    doc_ids: list[int]
    """Indices into the test split, ascending (:func:`record` writes None for rule ``all``)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def allocate(sizes: Sequence[int], n: int, rng: np.random.Generator) -> list[int]:
    """Largest-remainder allocation of ``n`` items over strata of the given sizes.

    Each stratum gets ``floor(n * size / total)`` plus one for the strata with the largest
    remainders until the counts add up to ``n``; equal remainders are ordered by ``rng``.
    """
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    if any(s < 0 for s in sizes) or not 0 <= n <= total:
        raise ValueError(f"cannot allocate {n} items over strata of sizes {sizes}")
    if total == 0:
        return [0] * len(sizes)
    floors = [n * s // total for s in sizes]
    remainders = np.array([n * s % total for s in sizes], dtype=np.int64)
    leftover = n - sum(floors)
    tiebreak = rng.permutation(len(sizes))
    order = np.lexsort((tiebreak, -remainders))  # last key is the primary one
    counts = list(floors)
    for i in order[:leftover]:
        counts[int(i)] += 1
    return counts


def _hashable(value: Any) -> Hashable:
    try:
        hash(value)
        return value
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str)


def strata_of(docs: Iterable[Mapping[str, Any]], fields: Sequence[str], task: str = "?") -> list[tuple]:
    """The stratum key (the tuple of ``fields`` values) of every document."""
    keys = []
    for i, doc in enumerate(docs):
        missing = [f for f in fields if f not in doc]
        if missing:
            raise KeyError(f"task {task}: document {i} has no stratification field(s) {missing}; it has {sorted(doc)}")
        keys.append(tuple(_hashable(doc[f]) for f in fields))
    return keys


def stratified_indices(keys: Sequence[Hashable], n: int, seed: int) -> list[int]:
    """``n`` document indices, stratified by ``keys`` (one per document), ascending."""
    if not 0 <= n <= len(keys):
        raise ValueError(f"cannot choose {n} of {len(keys)} documents")
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)  # strata in order of first appearance
    groups = list(members.values())
    rng = np.random.Generator(np.random.PCG64(seed))
    counts = allocate([len(g) for g in groups], n, rng)
    chosen: list[int] = []
    for group, k in zip(groups, counts):
        perm = rng.permutation(len(group))
        chosen.extend(group[int(j)] for j in perm[:k])
    return sorted(chosen)


def choose(docs: Sequence[Mapping[str, Any]], limit: int | None, *, rule: str = "stratified", seed: int = 0,
           stratify: Sequence[str] = (), task: str = "?") -> TaskSubset:
    """The subset of ``docs`` (a task's test documents, in order) that ``limit`` selects."""
    if rule not in SUBSET_RULES:
        raise ValueError(f"subset must be one of {SUBSET_RULES}, got {rule!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    total = len(docs)
    if limit is None or limit >= total:
        return TaskSubset(task, "all", None, [], total, total, None, list(range(total)))
    if rule == "first":
        return TaskSubset(task, "first", None, [], limit, total, None, list(range(limit)))
    fields = list(stratify)
    keys = strata_of(docs, fields, task)
    return TaskSubset(task, "stratified", seed, fields, limit, total, len(set(keys)), stratified_indices(keys, limit, seed))


def stratify_fields(task: Any) -> list[str]:
    """The ``metadata.stratify`` list of a built lm-eval task (empty when absent)."""
    meta = getattr(task.config, "metadata", None) or {}
    fields = meta.get(STRATIFY_KEY) or []
    if isinstance(fields, str):
        fields = [fields]
    if not isinstance(fields, (list, tuple)) or not all(isinstance(f, str) for f in fields):
        raise ValueError(f"task {task.config.task}: metadata.{STRATIFY_KEY} must be a list of field names, got {fields!r}")
    return list(fields)


def leaf_tasks(built: Iterable[Any]) -> list[Any]:
    """The lm-eval ``Task`` objects among built tasks and groups (groups expanded)."""
    from lm_eval.api.group import Group

    out = []
    for item in built:
        out.extend(item.get_all_tasks(recursive=True) if isinstance(item, Group) else [item])
    return out


def plan(built: Iterable[Any], limit: int | None, *, rule: str = "stratified", seed: int = 0) -> dict[str, TaskSubset]:
    """Per leaf task of ``built`` (lm-eval tasks/groups): the documents to score."""
    out = {}
    for task in leaf_tasks(built):
        docs = task.eval_docs
        name = task.config.task
        fields = stratify_fields(task) if rule == "stratified" else []
        out[name] = choose(docs, limit, rule=rule, seed=seed, stratify=fields, task=name)
    return out


def samples_arg(subsets: Mapping[str, TaskSubset]) -> dict[str, list[int]] | None:
    """``simple_evaluate``'s ``samples`` for the tasks that are not scored in full (None: all are)."""
    picked = {name: list(s.doc_ids) for name, s in subsets.items() if s.rule != "all"}
    return picked or None


def record(subsets: Mapping[str, TaskSubset], limit: int | None, rule: str, seed: int) -> dict[str, Any]:
    """What goes into ``results_seed<S>.json`` and ``summary.json`` under ``subset``: the limit,
    rule and seed, and per task the subset (``doc_ids`` None when every document was scored)."""
    if limit is None:
        rule = "all"
    tasks = {}
    for name, s in sorted(subsets.items()):
        tasks[name] = s.as_dict()
        if s.rule == "all":
            tasks[name]["doc_ids"] = None
    return {"limit": limit, "rule": rule, "seed": seed if rule == "stratified" else None, "tasks": tasks}


def describe(rec: Mapping[str, Any] | None) -> list[str]:
    """One line per task for the printed report: documents scored and how they were chosen."""
    if not rec:
        return []
    lines = []
    for name, s in rec.get("tasks", {}).items():
        how = {"all": "all", "first": "the first ones"}.get(s["rule"])
        if how is None:
            by = f"stratified by {', '.join(s['stratify'])}" if s["stratify"] else "uniform"
            how = f"{by}, seed {s['seed']}"
        lines.append(f"{name}: {s['n']} of {s['total']} documents ({how})")
    return lines
