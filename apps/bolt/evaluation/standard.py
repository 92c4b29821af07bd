"""lm-eval's own (standard) tasks and their latent variants, derived at run time.

Why: the shipped ``bolt_*`` tasks use the project's own exemplars, so their numbers cannot be put
next to published ones. lm-eval's tasks (``gsm8k_cot``: the standard 8-shot CoT exemplars,
``minerva_math``: Minerva's 4 shots, ``mmlu_flan_cot_fewshot``: Flan CoT, ``mmlu_stem``, ...) are
used here *unchanged* for the raw variant. A model trained with prior latent thoughts needs the
same prompt with the reasoning moved into a thought, so the latent variant is derived from lm-eval's
own loaded config (nothing is copied into YAML, so it follows lm-eval's exemplars as they are).

Names (see also :func:`parse_name`):

* ``<name>`` or ``std_<name>``: lm-eval's task or group ``<name>`` itself (raw variant). In
  ``python -m apps.bolt.eval`` a bare name that is also a shipped task (``gsm8k_cot``) means the
  shipped one; ``std_gsm8k_cot`` always means lm-eval's.
* ``bolt_latent_std_<name>`` (:data:`LATENT_STD_PREFIX`): the derived latent variant. Metric keys
  of both variants use ``std_<name>`` (:func:`std_metric_keys`), distinct from the shipped tasks'.

Derivation (:func:`derive_latent_config`), for each ``generate_until`` task:

* the query (``doc_to_text``) ends with the opening markers ``<|START_OF_LATENT|><|PRIOR_PREFIX|>``
  and ``target_delimiter`` becomes ``""``, so a thought starts right after the markers, as in the
  training layout (``SOL PRIOR{latent}EOL{suffix}``) and in the shipped latent tasks. When the
  query ends with the sentence that opens every exemplar's reasoning (MMLU Flan CoT: "Let's think
  step by step."), the markers go before it, so it sits inside the thought as in the exemplars;
* each few-shot exemplar's target is split at its answer sentence (:func:`split_exemplar`: the
  last "Final Answer:" (Minerva), else the last "The answer is" (GSM8K CoT, MMLU CoT)) into
  ``thought + EOL + <the whitespace that separated them> + answer``;
* ``<|START_OF_LATENT|>`` is added to the stop strings (no second thought), and every filter
  pipeline (or the default ``none`` one, for tasks graded by ``process_results``) first keeps only
  the text after the first ``<|END_OF_LATENT|>`` (:func:`answer_after_thought_filter`), so the
  grading reads the answer, not numbers inside the thought. Filter and metric names are kept.

So a latent prompt differs from the source prompt only by the three marker strings and the dropped
target delimiter (one " " between each exemplar's question and its reasoning); tests/test_standard_tasks.py
checks exactly that. Tasks scored by log-likelihood (``multiple_choice``, e.g. ``mmlu_stem``) have
no reasoning to move: their latent name resolves to the lm-eval task itself, with a warning.

Registration: derived configs are inserted into a ``TaskManager``'s index as inline ``Entry``
objects (lm-eval builds inline configs from ``Entry.cfg``), so lm-eval's own factory builds them,
groups and tags included. :class:`BoltTaskManager` does it on demand; ``bolt-lm-eval`` installs it
(:func:`install_task_manager`) so ``--tasks bolt_latent_std_gsm8k_cot`` works on lm-eval's CLI.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Entry, Kind
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import apply_template

from apps.bolt.evaluation.tasks import localize
from apps.bolt.formats import EOL, PRIOR, SOL, split_latent_generation

logger = logging.getLogger(__name__)

STD_PREFIX = "std_"
"""Marks a name as lm-eval's own task (``std_gsm8k_cot`` = lm-eval's ``gsm8k_cot``)."""
LATENT_STD_PREFIX = "bolt_latent_std_"
"""Prefix of every derived latent task, group and tag name."""
ANSWER_MARKERS = ("Final Answer:", "The answer is")
"""Where an exemplar's answer sentence starts, in order of preference (first one present wins,
at its last occurrence): Minerva MATH, then GSM8K CoT / MMLU CoT."""
LATENT_TARGET_KEY = "_bolt_latent_target"
"""Field of a derived few-shot sample holding its latent target."""
MARKERS = (SOL, PRIOR, EOL)


class StandardTaskError(ValueError):
    """A standard task that is unknown or whose latent variant cannot be derived (names the task)."""


# ---------------------------------------------------------------------------------- names
def parse_name(name: str) -> tuple[str, bool]:
    """``(lm-eval name, latent)`` for any spelling accepted here: ``X``, ``std_X``, ``bolt_X``,
    ``bolt_std_X`` (raw) and ``latent_X``, ``latent_std_X``, ``bolt_latent_X``,
    ``bolt_latent_std_X`` (latent)."""
    rest = name[len("bolt_") :] if name.startswith("bolt_") else name
    latent = rest.startswith("latent_")
    if latent:
        rest = rest[len("latent_") :]
    if rest.startswith(STD_PREFIX):
        rest = rest[len(STD_PREFIX) :]
    return rest, latent


def latent_name(source: str) -> str:
    return LATENT_STD_PREFIX + source


def std_metric_keys(flat: Mapping[str, float], raw_names: Iterable[str]) -> dict[str, float]:
    """``flat`` with ``std_`` put before the task of every key whose task is in ``raw_names``
    (lm-eval's tasks run raw), so ``gsm8k_cot`` from lm-eval never shares a metric key with the
    shipped ``gsm8k_cot`` and both variants of a standard task share ``std_<name>``."""
    raw = set(raw_names)
    out = {}
    for key, value in flat.items():
        task, sep, rest = key.partition("/")
        out[(STD_PREFIX + task if task in raw else task) + sep + rest] = value
    return out


# ---------------------------------------------------------------------------------- derivation
def split_exemplar(target: str, task: str, index: int) -> tuple[str, str, str]:
    """``(thought, separator, answer)`` of a few-shot target, ``thought + separator + answer ==
    target``: the answer sentence starts at the last occurrence of the first
    :data:`ANSWER_MARKERS` entry present; the separator is the whitespace before it."""
    for marker in ANSWER_MARKERS:
        at = target.rfind(marker)
        if at >= 0:
            break
    else:
        raise StandardTaskError(
            f"task {task}: few-shot exemplar {index} has no answer sentence (none of {list(ANSWER_MARKERS)}) "
            f"to split its reasoning from: {target[:100]!r}"
        )
    head = target[:at]
    thought = head.rstrip()
    if not thought.strip():
        raise StandardTaskError(
            f"task {task}: few-shot exemplar {index} has no reasoning before its answer sentence "
            f"(nothing to put in the thought): {target[:100]!r}"
        )
    return thought, head[len(thought) :], target[at:]


def answer_after_thought_filter(resps: Sequence[Sequence[str]], docs: Any) -> list[list[str]]:
    """lm-eval ``custom`` filter: each response cut to the text after its first
    ``<|END_OF_LATENT|>`` (:func:`apps.bolt.formats.split_latent_generation`; a thought that was
    never closed leaves the whole response, the project's one rule for it)."""
    return [[split_latent_generation(r)[1] for r in rs] for rs in resps]


class _WithMarkers:
    """``doc_to_text`` of a latent task: the source's query with ``SOL PRIOR`` at its end, or
    before its ``trigger`` when the query ends with it.

    The trigger is the opening that every exemplar's reasoning shares (MMLU Flan CoT: "Let's think
    step by step."): lm-eval's query ends with it, the exemplars' targets start with it, so it
    belongs inside the thought. A class rather than a closure so lm-eval's config dump names it."""

    def __init__(self, source: Callable[[dict], str] | str, trigger: str = ""):
        self.source = source
        self.trigger = trigger

    def __call__(self, doc: dict) -> str:
        if callable(self.source):
            text = self.source(doc)
        elif "{{" in self.source or "{%" in self.source:
            text = apply_template(self.source, doc)
        else:  # lm-eval's rule for a string that is no template: a field of the document
            text = str(doc.get(self.source, self.source))
        cut = len(text)
        if self.trigger and text.rstrip().endswith(self.trigger):
            cut = text.rstrip().rindex(self.trigger)
        return text[:cut] + SOL + PRIOR + text[cut:]

    def __repr__(self) -> str:
        where = f" before {self.trigger!r}" if self.trigger else ""
        return f"<{getattr(self.source, '__name__', self.source)!s} + {SOL}{PRIOR}{where}>"


def _with_markers(template: Any, task: str, trigger: str = "") -> Any:
    if isinstance(template, str) and ("{{" in template or "{%" in template) and not trigger:
        return template + SOL + PRIOR  # lm-eval renders the Jinja template; the markers are literal
    if isinstance(template, str) or callable(template):
        return _WithMarkers(template, trigger)
    raise StandardTaskError(f"task {task}: doc_to_text {template!r} is neither a template nor a function")


def shared_opening(thoughts: Sequence[str]) -> str:
    """The whole sentences that every thought starts with ("" if none, or fewer than 2 thoughts)."""
    if len(thoughts) < 2:
        return ""
    prefix = os.path.commonprefix(list(thoughts))
    end = max(prefix.rfind(". "), prefix.rfind(".\n"))
    if prefix in thoughts or (prefix.endswith(".") and all(t[len(prefix) : len(prefix) + 1].isspace() for t in thoughts)):
        end = len(prefix) - 1
    return prefix[: end + 1].strip() if end >= 0 else ""


def _render(template: Any, doc: dict) -> str:
    """A few-shot sample's target as lm-eval renders it (template, field or function)."""
    if callable(template):
        return str(template(doc))
    if isinstance(template, str):
        return str(doc[template]) if template in doc else apply_template(template, doc)
    raise TypeError(f"unsupported doc_to_target {template!r}")


def _samples(cfg: dict[str, Any], task: str) -> list[dict]:
    fs = cfg.get("fewshot_config") or {}
    samples = fs.get("samples")
    if fs.get("split") or (samples is None and cfg.get("fewshot_split")):
        raise StandardTaskError(
            f"task {task}: its exemplars come from a dataset split, not from fewshot_config.samples; "
            "only tasks with inline exemplars can be derived without reading the dataset"
        )
    if samples is None:
        if cfg.get("num_fewshot"):
            raise StandardTaskError(f"task {task}: num_fewshot={cfg['num_fewshot']} but no fewshot_config.samples")
        return []
    return list(samples() if callable(samples) else samples)


def _prefix_filters(filter_list: Any, task: str) -> list[dict[str, Any]]:
    step = {"function": "custom", "filter_fn": answer_after_thought_filter}
    if filter_list is None:  # lm-eval's default pipeline, same name, answer part first
        return [{"name": "none", "filter": [step, {"function": "take_first"}]}]
    if not isinstance(filter_list, list):
        raise StandardTaskError(f"task {task}: filter_list must be a list, got {type(filter_list).__name__}")
    return [{**f, "filter": [step, *f["filter"]]} for f in filter_list]


def derive_latent_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The latent variant of lm-eval task config ``cfg`` (as ``load_yaml(..., resolve_func=True)``
    returns it); ``cfg`` is not modified. See the module docstring for what changes."""
    task = str(cfg.get("task"))
    if cfg.get("output_type", "generate_until") != "generate_until":
        raise StandardTaskError(f"task {task}: output_type {cfg.get('output_type')} has no generated reasoning to put in a thought")
    out = copy.deepcopy(dict(cfg))
    for key in ("tag", "group", "task_alias", "include"):
        out.pop(key, None)
    fs = dict(out.get("fewshot_config") or {})
    target_template = fs.get("doc_to_target") or cfg.get("doc_to_target")
    samples, thoughts = [], []
    for i, sample in enumerate(_samples(cfg, task)):
        try:
            rendered = _render(target_template, sample)
        except Exception as e:
            raise StandardTaskError(f"task {task}: cannot render the target of few-shot exemplar {i}: {e}") from e
        thought, sep, answer = split_exemplar(rendered, task, i)
        thoughts.append(thought)
        samples.append({**sample, LATENT_TARGET_KEY: thought + EOL + sep + answer})
    trigger = shared_opening(thoughts)
    if samples or fs:
        fs.update(samples=samples, doc_to_target=_latent_field, target_delimiter="")
        if fs.get("doc_to_text") is not None:
            fs["doc_to_text"] = _with_markers(fs["doc_to_text"], task, trigger)
        out["fewshot_config"] = fs
    out["task"] = latent_name(task)
    out["doc_to_text"] = _with_markers(cfg.get("doc_to_text"), task, trigger)
    out["target_delimiter"] = ""
    gen = dict(out.get("generation_kwargs") or {})
    until = gen.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    gen["until"] = until + ([SOL] if SOL not in until else [])
    out["generation_kwargs"] = gen
    out["filter_list"] = _prefix_filters(cfg.get("filter_list"), task)
    meta = out.get("metadata")
    out["metadata"] = {**(meta if isinstance(meta, dict) else {}), "latent_of": task, "derived_by": __name__}
    return out


def _latent_field(doc: dict) -> str:
    """``fewshot_config.doc_to_target`` of a derived task: the precomputed latent target."""
    return doc[LATENT_TARGET_KEY]


# ---------------------------------------------------------------------------------- registry
def _config(entry: Any) -> dict[str, Any]:
    """An index entry's full config: its YAML (includes merged, functions imported) or inline cfg."""
    if entry.yaml_path is not None:
        return load_yaml(entry.yaml_path, resolve_func=True)
    return copy.deepcopy(entry.cfg or {})


def _entry(index: Mapping[str, Any], name: str) -> Any:
    entry = index.get(name)
    if entry is None:
        close = sorted(n for n in index if name in n)[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise StandardTaskError(f"unknown lm-eval task {name!r}{hint}")
    return entry


def register_latent(index: dict[str, Any], source: str) -> str:
    """Derive and add to ``index`` (a ``TaskManager.task_index``) the latent variant of task,
    group or tag ``source`` and of everything under it; returns the name to load (the source
    itself for a log-likelihood task)."""
    name = latent_name(source)
    if name in index:
        return name
    entry = _entry(index, source)
    if entry.kind == Kind.TASK:
        cfg = _config(entry)
        if cfg.get("output_type", "generate_until") != "generate_until":
            logger.warning("%s is scored by %s: no reasoning to move into a thought; its latent variant is the task itself",
                           source, cfg.get("output_type"))
            return source
        index[name] = Entry(name=name, kind=Kind.TASK, yaml_path=None, cfg=derive_latent_config(cfg))
    elif entry.kind == Kind.TAG:
        members = {register_latent(index, t) for t in sorted(entry.tags)}
        index[name] = Entry(name=name, kind=Kind.TAG, yaml_path=None, tags=members)
    elif entry.kind == Kind.GROUP:
        cfg = _config(entry)
        cfg.pop("tag", None)
        cfg["group"] = name
        cfg["task"] = _latent_members(index, cfg.get("task"), source)
        index[name] = Entry(name=name, kind=Kind.GROUP, yaml_path=None, cfg=cfg)
    else:
        raise StandardTaskError(f"{source}: a Python-defined lm-eval task; its latent variant cannot be derived from a config")
    return name


def _latent_members(index: dict[str, Any], members: Any, group: str) -> list[Any]:
    out: list[Any] = []
    for m in members if isinstance(members, list) else [members]:
        if isinstance(m, str):
            out.append(register_latent(index, m))
        elif isinstance(m, dict) and "group" in m and m["group"] not in index:  # inline subgroup
            out.append({**m, "task": _latent_members(index, m.get("task"), group)})
        elif isinstance(m, dict) and set(m) == {"task"}:
            out.append(register_latent(index, m["task"]))
        else:
            raise StandardTaskError(f"group {group}: member {m!r} (with overrides) is not supported for latent derivation")
    return out


def reachable(index: Mapping[str, Any], name: str) -> list[str]:
    """Task names under task, group or tag ``name`` (itself for a task), in config order."""
    entry = _entry(index, name)
    if entry.kind == Kind.TAG:
        return [t for m in sorted(entry.tags) for t in reachable(index, m)]
    if entry.kind != Kind.GROUP:
        return [name]
    return _member_tasks(index, _config(entry).get("task"))


def _member_tasks(index: Mapping[str, Any], members: Any) -> list[str]:
    out: list[str] = []
    for m in members if isinstance(members, list) else [members]:
        if isinstance(m, str):
            out += reachable(index, m)
        elif isinstance(m, dict) and "group" in m and m["group"] not in index:
            out += _member_tasks(index, m.get("task"))
        elif isinstance(m, dict) and "task" in m:
            out += reachable(index, m["task"])
    return out


# ---------------------------------------------------------------------------------- managers
class BoltTaskManager(TaskManager):
    """lm-eval's ``TaskManager`` that also knows ``bolt_latent_std_*`` names: it derives and
    registers them when asked (``load``, ``match_tasks``), then lm-eval's factory builds them
    like any other task (groups and tags included)."""

    def register(self, name: str) -> str:
        """The index name to load for ``name`` (a derived variant is registered first)."""
        if not name.startswith(LATENT_STD_PREFIX):
            return name
        return register_latent(self.task_index, name[len(LATENT_STD_PREFIX) :])

    def match_tasks(self, task_list: list[str]) -> list[str]:
        derived = [self.register(t) for t in task_list if t.startswith(LATENT_STD_PREFIX)]
        rest = [t for t in task_list if not t.startswith(LATENT_STD_PREFIX)]
        return derived + (super().match_tasks(rest) if rest else [])

    def load(self, task_list: Any) -> Any:
        specs = task_list if isinstance(task_list, list) else [task_list]
        return super().load([self.register(s) if isinstance(s, str) else s for s in specs])


def install_task_manager() -> None:
    """Make ``lm_eval.tasks.TaskManager`` the :class:`BoltTaskManager`: lm-eval's CLI imports it
    by that name when it runs, so its ``--tasks`` then accepts ``bolt_latent_std_*``. Only
    ``bolt-lm-eval`` calls this (a process that runs lm-eval's CLI and nothing else)."""
    import lm_eval.tasks

    lm_eval.tasks.TaskManager = BoltTaskManager


class StandardTasks:
    """lm-eval's tasks for :class:`apps.bolt.evaluation.tasks.TaskLibrary`: names resolved,
    latent variants registered, datasets localised to a ``data_root`` mirror, objects built."""

    def __init__(self, include_path: str | Path | Sequence[str | Path] | None = None, data_root: str | Path | None = None):
        """``include_path``: folders to index instead of all of lm-eval's tasks (the full index
        takes ~15 s; tests index one task folder)."""
        kwargs: dict[str, Any] = {"include_defaults": include_path is None}
        if include_path is not None:
            kwargs["include_path"] = [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else str(include_path)
        self.manager = BoltTaskManager(**kwargs)
        self.data_root = Path(data_root).resolve() if data_root else None
        self._localized: set[str] = set()
        self.raw_built: set[str] = set()
        """Every task and group name built raw (their metric keys get ``std_``)."""

    def knows(self, name: str) -> bool:
        source, _ = parse_name(name)
        return source in self.manager.task_index

    def resolve(self, name: str) -> str:
        """The index name for any accepted spelling (see :func:`parse_name`)."""
        source, latent = parse_name(name)
        _entry(self.manager.task_index, source)
        return register_latent(self.manager.task_index, source) if latent else source

    def leaf_tasks(self, name: str) -> list[str]:
        return reachable(self.manager.task_index, self.resolve(name))

    def config(self, name: str) -> dict[str, Any]:
        """The (derived, localised) config of task ``name`` as lm-eval will build it."""
        return localize(_config(_entry(self.manager.task_index, self.resolve(name))), self.data_root)

    def build(self, name: str, num_fewshot: int | None = None) -> list[Any]:
        """lm-eval objects for ``name``: ``[Group]`` for a group, its tasks for a tag, ``[Task]``."""
        index_name = self.resolve(name)
        self._localize(index_name)
        loaded = self.manager.load([index_name])
        for task in loaded["tasks"].values():
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
        if not index_name.startswith(LATENT_STD_PREFIX):
            self.raw_built |= set(loaded["tasks"]) | set(loaded.get("groups", {}))
        if index_name in loaded.get("groups", {}):
            return [loaded["groups"][index_name]]
        return list(loaded["tasks"].values())

    def _localize(self, name: str) -> None:
        """Replace the index entries of the tasks under ``name`` by localised inline configs."""
        if self.data_root is None:
            return
        index = self.manager.task_index
        for task in reachable(index, name):
            if task in self._localized:
                continue
            entry = index[task]
            cfg = localize(_config(entry), self.data_root)
            index[task] = Entry(name=task, kind=entry.kind, yaml_path=None, cfg=cfg, tags=set(entry.tags))
            self._localized.add(task)
