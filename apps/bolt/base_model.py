"""The base model of an EM run: pretrained once, cached like a downloaded checkpoint.

The paper starts every run (warmstart, each M-step, the raw baselines) from TinyLlama, a model
that knows language and arithmetic before it sees a thought. In the synthetic world the analog
is a small model pretrained on raw text of the world plus arithmetic drills
(:mod:`apps.bolt.synthetic.facts`): the EM driver trains it once (``base.tokens > 0``) and every
run of the experiment starts from it, exactly as from an imported checkpoint.

Caching: a base is identified by its *recipe*: the resolved training config without paths and
names, the identity of each training dataset (its completion marker, which carries the prepare
recipe) and of the initialization. It lives in ``<cache_dir>/base-<hash>/``: the training run
under ``run/``, and ``base.json`` (recipe, consolidated folder, training summary) written last.
Another experiment with the same recipe reuses it; a changed recipe trains a new one; a folder
whose ``base.json`` records another recipe than its name promises is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lingua.args import to_dict
from lingua.io import atomic_write_json

logger = logging.getLogger("apps.bolt.em")

BASE_FILE = "base.json"
# config keys that name or place a run without changing what it learns
_NOT_RECIPE = ("name", "dump_dir", "checkpoint", "logging", "log_freq", "eval", "profiling")


@dataclass
class BaseArgs:
    """Base pretraining of an EM run (off when ``tokens`` is 0)."""

    tokens: int = 0
    """Packed training tokens (0: no pretraining; runs start from ``base_ckpt`` or a fresh init)."""
    sources: dict[str, float] = field(default_factory=dict)
    """Datasets of ``DUMP/data`` and their sampling weights, e.g. ``{pretrain: 0.5, drills: 0.5}``."""
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    """Train-config overrides for the base run only (e.g. ``optim.lr=...``)."""
    cache_dir: str = ".cache/bolt_bases"
    """Where bases are kept across experiments (keyed by recipe)."""

    def validate(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"base.tokens must be >= 0, got {self.tokens}")
        if self.tokens and not self.sources:
            raise ValueError("base.tokens > 0 needs base.sources, e.g. {pretrain: 0.5, drills: 0.5}")
        if any(w <= 0 for w in self.sources.values()):
            raise ValueError(f"base.sources weights must be > 0, got {self.sources}")


def recipe(train_cfg: Any, data_stamps: dict[str, str | None], init_stamp: str | None) -> dict:
    """What determines the base's weights (see the module docstring)."""
    cfg = to_dict(train_cfg)
    for key in _NOT_RECIPE:
        cfg.pop(key, None)
    cfg.get("data", {}).pop("root_dir", None)
    cfg.get("data", {}).pop("prefetch", None)
    tok = cfg.get("tokenizer", {})
    if tok.get("path"):
        tok["path"] = Path(tok["path"]).name  # content-keyed folder name; not where it lives
    return {"train": cfg, "data": data_stamps, "init": init_stamp}


def recipe_hash(r: dict) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_folder(cache_dir: str | Path, r: dict) -> Path:
    return Path(cache_dir) / f"base-{recipe_hash(r)}"


def cached_base(folder: Path, r: dict) -> Path | None:
    """The consolidated model of a finished base with recipe ``r`` in ``folder``, else None.
    A finished base with another recipe is an error (never silently used)."""
    info_path = folder / BASE_FILE
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if info.get("recipe") != json.loads(json.dumps(r, default=str)):
        raise RuntimeError(
            f"{info_path} holds a base trained with another recipe (hash {recipe_hash(info.get('recipe') or {})}, "
            f"wanted {recipe_hash(r)}); delete {folder} to retrain it"
        )
    found = Path(info["consolidated"])
    return found if found.is_absolute() else folder / found  # relative: the cache folder can move


def get_base(folder: Path, r: dict, train: Callable[[Path], tuple[Path, dict]]) -> Path:
    """The cached base, or ``train(folder / 'run')`` (returns the consolidated folder and the run's
    summary), recorded in ``base.json`` last; a killed pretraining resumes from its checkpoint."""
    found = cached_base(folder, r)
    if found is not None:
        logger.info("[em] base: reusing %s", folder)
        return found
    consolidated, summary = train(folder / "run")
    try:
        where = str(Path(consolidated).resolve().relative_to(folder.resolve()))
    except ValueError:  # trained elsewhere (a slurm job's scratch): keep the absolute path
        where = str(consolidated)
    atomic_write_json(folder / BASE_FILE, {"recipe": r, "consolidated": where, "summary": summary})
    return consolidated
