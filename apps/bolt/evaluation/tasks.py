"""Find, localise and build the shipped lm-eval tasks (``apps/bolt/configs/tasks/``).

The YAMLs are ordinary lm-eval task configs that name hub datasets, so on a cluster with hub
access they work as they are (also with ``lm_eval --include_path``). Offline, a *data root*
replaces every hub dataset by local JSON-lines files at a fixed place::

    <data_root>/<dataset_path>/<dataset_name>/<split>.jsonl
    e.g. <data_root>/gsm8k/main/test.jsonl, <data_root>/EleutherAI/hendrycks_math/algebra/test.jsonl

Tasks that are local by nature (``dataset_path: json``, the synthetic world's) give their
``data_files`` relative to the data root. Relative ``data_files`` would otherwise resolve against
the working directory (cpu-feasibility.md section 8), so every path handed to lm-eval is absolute.

Names: every shipped task and group is called ``bolt_<name>`` (``bolt_gsm8k_cot``,
``bolt_latent_gsm8k_cot``), so none shadows an lm-eval task of the same base name (lm-eval ships a
``gsm8k_cot`` of its own). The unprefixed names still work everywhere in this project: configs
name base tasks (``tasks: gsm8k_cot``), :func:`apply_variant` turns them into shipped names, and
:class:`TaskLibrary` resolves ``gsm8k_cot`` to ``bolt_gsm8k_cot`` (and the reverse for task
folders of one's own whose names carry no prefix). Metric keys use :func:`base_name`
(``gsm8k_cot``), as before the prefix. A name that is no shipped task is one of lm-eval's own
(``std_gsm8k_cot``, ``minerva_math``) or its derived latent variant (``bolt_latent_std_...``):
:mod:`apps.bolt.evaluation.standard` resolves and builds those.

lm-eval only reads a task's YAML when given its name, so the rewritten configs are handed over as
built ``Task``/``Group`` objects: :meth:`TaskLibrary.build` loads each YAML (includes and
``!function`` references resolved), rewrites its dataset fields, and instantiates it. The
``TaskManager`` is created with ``include_defaults=False``: indexing lm-eval's built-in tasks
costs ~18 s and none of them is used.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"
LATENT_PREFIX = "latent_"
TASK_PREFIX = "bolt_"
STD_PREFIX = "std_"
"""Base names ``std_<name>`` are lm-eval's own task ``<name>`` (:mod:`apps.bolt.evaluation.standard`)."""
"""Prefix of every shipped task and group name (keeps lm-eval's own task names free)."""

LATENT_LAYOUTS = frozenset({"random", "prior"})
"""Training layouts whose models are evaluated on ``latent_`` tasks: they learned to write a prior
thought (``<|START_OF_LATENT|><|PRIOR_PREFIX|>...``) before text. Every other layout (``raw``,
``posterior``, ``pure``) gets the raw tasks; the reference switched on ``random``/``prior`` only."""
VARIANTS = ("auto", "raw", "latent")
_SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")


class TaskConfigError(ValueError):
    """A task that cannot be built, with the task name and the file or key at fault."""


def variant_for_layout(layout: str | None) -> str:
    """``"latent"`` for models trained with a prior-thought layout, ``"raw"`` otherwise."""
    if layout is None:
        raise TaskConfigError(
            "cannot choose the task variant: the checkpoint records no training layout; "
            "pass variant=raw or variant=latent"
        )
    return "latent" if layout in LATENT_LAYOUTS else "raw"


def apply_variant(names: Iterable[str], variant: str) -> list[str]:
    """Shipped task names for ``variant``: ``bolt_latent_<base>`` or ``bolt_<base>``, from base,
    ``latent_`` or ``bolt_`` names alike. lm-eval's own tasks, named ``std_<name>``
    (:mod:`apps.bolt.evaluation.standard`), stay ``std_<name>`` (raw: :class:`TaskLibrary` builds
    lm-eval's ``<name>`` unchanged; the prefix keeps ``std_gsm8k_cot`` apart from the shipped
    ``gsm8k_cot``) or become ``bolt_latent_std_<name>`` (the derived latent variant)."""
    if variant not in ("raw", "latent"):
        raise TaskConfigError(f"variant must be raw or latent here, got {variant!r}")
    out = []
    for n in names:
        base = base_name(n)
        if base.startswith(STD_PREFIX):
            out.append(TASK_PREFIX + LATENT_PREFIX + base if variant == "latent" else base)
        else:
            out.append(TASK_PREFIX + (LATENT_PREFIX if variant == "latent" else "") + base)
    return out


def base_name(task: str) -> str:
    """Task name without the ``bolt_`` and ``latent_`` prefixes (metrics files use it, see results.py)."""
    if task.startswith(TASK_PREFIX):
        task = task[len(TASK_PREFIX) :]
    return task[len(LATENT_PREFIX) :] if task.startswith(LATENT_PREFIX) else task


def is_latent(task: str) -> bool:
    """Whether ``task`` (with or without ``bolt_``) names a latent variant."""
    return (task[len(TASK_PREFIX) :] if task.startswith(TASK_PREFIX) else task).startswith(LATENT_PREFIX)


def localize(cfg: dict[str, Any], data_root: Path | None) -> dict[str, Any]:
    """A copy of the task config ``cfg`` whose data come from local files where required.

    * ``dataset_path: json``: relative ``data_files`` are resolved against ``data_root``;
    * hub datasets with a ``data_root``: replaced by ``<root>/<path>/<name>/<split>.jsonl``;
    * hub datasets without one: unchanged (the cluster path).
    Missing files are an error that names the task and the expected path.
    """
    cfg = copy.deepcopy(cfg)
    task = cfg.get("task", "?")
    if cfg.get("dataset_path") == "json":
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if not isinstance(files, dict):
            raise TaskConfigError(f"task {task}: dataset_path json needs dataset_kwargs.data_files as a split -> file mapping")
        cfg["dataset_kwargs"]["data_files"] = {split: str(_local_file(task, f, data_root)) for split, f in files.items()}
        return cfg
    if data_root is None:
        return cfg
    splits = sorted({cfg[k] for k in _SPLIT_KEYS if cfg.get(k)})
    folder = Path(data_root) / cfg["dataset_path"] / (cfg.get("dataset_name") or "")
    cfg["dataset_kwargs"] = {"data_files": {s: str(_local_file(task, folder / f"{s}.jsonl", None)) for s in splits}}
    cfg["dataset_path"] = "json"
    cfg["dataset_name"] = None
    return cfg


def _local_file(task: str, path: str | Path, root: Path | None) -> Path:
    p = Path(path)
    if not p.is_absolute():
        if root is None:
            raise TaskConfigError(f"task {task}: data file {p} is relative; set data_root")
        p = Path(root) / p
    p = p.resolve()
    if not p.is_file():
        raise TaskConfigError(f"task {task}: local data file not found: {p}")
    return p


class TaskLibrary:
    """The tasks under ``include_path`` (default: the shipped ones) and how to build them; any
    other name is one of lm-eval's own tasks or its derived latent variant
    (:class:`apps.bolt.evaluation.standard.StandardTasks`, indexed on first use)."""

    def __init__(self, include_path: str | Path = TASKS_DIR, data_root: str | Path | None = None, standard: Any = None):
        """``standard``: a ``StandardTasks`` to use for lm-eval's tasks (default: all of them,
        created when a name is not a shipped one; tests pass one that indexes a few folders)."""
        from lm_eval.tasks import TaskManager

        self.include_path = Path(include_path)
        self.data_root = Path(data_root).resolve() if data_root else None
        self.manager = TaskManager(include_path=str(self.include_path), include_defaults=False)
        self._index = self.manager.task_index
        self._standard = standard

    @property
    def standard(self) -> Any:
        """lm-eval's tasks and their latent variants (``StandardTasks``), created on first use."""
        if self._standard is None:
            from apps.bolt.evaluation.standard import StandardTasks

            self._standard = StandardTasks(data_root=self.data_root)
        return self._standard

    @property
    def standard_raw_names(self) -> set[str]:
        """lm-eval task and group names built raw so far (their metric keys get ``std_``)."""
        return set(self._standard.raw_built) if self._standard is not None else set()

    def is_shipped(self, name: str) -> bool:
        """Whether ``name`` is a task or group of ``include_path`` (else: lm-eval's)."""
        return self.canonical(name) in self._index

    @property
    def names(self) -> list[str]:
        """Every task and group name found (sorted)."""
        return sorted(n for n, e in self._index.items() if e.yaml_path is not None)

    def is_group(self, name: str) -> bool:
        from lm_eval.tasks._index import Kind

        return self._entry(name).kind == Kind.GROUP

    def raw_config(self, name: str) -> dict[str, Any]:
        """The YAML of task or group ``name`` with includes merged and functions imported."""
        from lm_eval.tasks._yaml_loader import load_yaml

        entry = self._entry(name)
        try:
            return load_yaml(entry.yaml_path, resolve_func=True)
        except Exception as e:
            raise TaskConfigError(f"task {name}: cannot load {entry.yaml_path}: {e}") from e

    def config(self, name: str, num_fewshot: int | None = None) -> dict[str, Any]:
        """The localised config of task ``name`` as lm-eval will receive it."""
        if self.is_group(name):
            raise TaskConfigError(f"{name} is a group; use build() or leaf_tasks()")
        cfg = localize(self.raw_config(name), self.data_root)
        if num_fewshot is not None:
            cfg["num_fewshot"] = num_fewshot
        return cfg

    def canonical(self, name: str) -> str:
        """The indexed name for ``name``: itself, else with ``bolt_`` added or removed."""
        if name in self._index:
            return name
        alt = name[len(TASK_PREFIX) :] if name.startswith(TASK_PREFIX) else TASK_PREFIX + name
        return alt if alt in self._index else name

    def leaf_tasks(self, name: str) -> list[str]:
        """The task names under ``name`` (itself when it is a task), in YAML order."""
        if not self.is_shipped(name):
            return self._standard_call("leaf_tasks", name)
        name = self.canonical(name)
        if not self.is_group(name):
            return [name]
        return [leaf for child in self._children(name) for leaf in self.leaf_tasks(child)]

    def build(self, names: Iterable[str], num_fewshot: int | None = None) -> list[Any]:
        """lm-eval ``Task``/``Group`` objects for ``names``, ready for ``simple_evaluate`` (an
        lm-eval tag gives its tasks)."""
        built: list[Any] = []
        for n in names:
            if self.is_shipped(n):
                built.append(self._build(n, num_fewshot))
            else:
                built += self._standard_call("build", n, num_fewshot)
        return built

    # ------------------------------------------------------------------------ internals
    def _standard_call(self, method: str, name: str, *args: Any) -> Any:
        from apps.bolt.evaluation.standard import StandardTaskError

        try:
            return getattr(self.standard, method)(name, *args)
        except StandardTaskError as e:
            raise TaskConfigError(f"unknown task {name!r} in {self.include_path}{self._similar(name)}; as one of lm-eval's: {e}") from e
        except TaskConfigError:
            raise
        except Exception as e:
            raise TaskConfigError(f"lm-eval task {name}: {e}") from e

    def _similar(self, name: str) -> str:
        """`` (similar: ...)`` for an unknown name: shipped tasks that contain it or are close to it."""
        import difflib

        close = [n for n in self.names if name in n or n in name]
        close += difflib.get_close_matches(TASK_PREFIX + base_name(name), self.names, n=5, cutoff=0.8)
        close = list(dict.fromkeys(close))[:5]
        return f" (similar: {', '.join(close)})" if close else ""

    def _entry(self, name: str):
        entry = self._index.get(self.canonical(name))
        if entry is None or entry.yaml_path is None:
            raise TaskConfigError(f"unknown task {name!r} in {self.include_path}{self._similar(name)}")
        return entry

    def _children(self, group: str) -> list[str]:
        children = self.raw_config(group).get("task") or []
        names = []
        for c in children if isinstance(children, list) else [children]:
            if not isinstance(c, str):
                raise TaskConfigError(f"group {group}: members must be task names, got {c!r}")
            names.append(c)
        return names

    def _build(self, name: str, num_fewshot: int | None):
        from lm_eval.api.group import Group
        from lm_eval.api.task import ConfigurableTask
        from lm_eval.config.group import GroupConfig

        name = self.canonical(name)
        if not self.is_group(name):
            try:
                return ConfigurableTask(config=self.config(name, num_fewshot))
            except TaskConfigError:
                raise
            except Exception as e:
                raise TaskConfigError(f"task {name} ({self._entry(name).yaml_path}): {e}") from e
        raw = self.raw_config(name)
        fields = {k: raw[k] for k in ("group_alias", "aggregate_metric_list", "metadata") if k in raw}
        group = Group.from_config(GroupConfig(group=name, task=self._children(name), **fields))
        for child in self._children(name):
            group.add(self._build(child, num_fewshot))
        return group
