"""From whatever folder the user points at to a loaded model, its run and its training layout.

Accepted folders:

* a consolidated folder (``consolidated.pt`` + ``params.json`` + ``tokenizer/``);
* a training checkpoint ``RUN/checkpoints/<step>/``: its ``consolidated/`` subfolder is used, and
  written first with :func:`lingua.checkpoint.consolidate` when missing;
* a run folder ``RUN/``: its newest complete checkpoint.

The training layout (which decides the task variant) is read from the run config saved with the
checkpoint (``<step>/config.yaml``, else ``RUN/config.yaml``): the app's ``layout.name`` when the
config has a layout section, else the core ``data.format`` (``text`` means raw).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

CONSOLIDATED_WEIGHTS = "consolidated.pt"
RUN_CONFIG = "config.yaml"


@dataclass
class CheckpointRef:
    """Where a checkpoint lives and what it is."""

    consolidated: Path
    run_dir: Path | None
    step: int | None
    layout: str | None

    @property
    def results_dir(self) -> Path:
        """Default home of this checkpoint's evaluation results."""
        return self.consolidated / "eval"


@dataclass
class LoadedCheckpoint:
    ref: CheckpointRef
    model: Any
    tokenizer: Any


def resolve_checkpoint(path: str | Path, consolidate: bool = True) -> CheckpointRef:
    """Find the consolidated folder, run folder, step and layout behind ``path``."""
    from lingua.checkpoint import latest_checkpoint
    from lingua.io import is_done

    p = Path(path).resolve()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if (p / "checkpoints").is_dir() and not (p / CONSOLIDATED_WEIGHTS).exists():
        newest = latest_checkpoint(p / "checkpoints")
        if newest is None:
            raise FileNotFoundError(f"{p}: run folder without a complete checkpoint under checkpoints/")
        logger.info("run folder given: using its newest checkpoint %s", newest.name)
        p = newest
    if (p / CONSOLIDATED_WEIGHTS).exists():
        step_dir = p.parent if p.name == "consolidated" else None
        consolidated = p
    elif is_done(p) and (p / "train_state.json").is_file():
        step_dir = p
        consolidated = p / "consolidated"
        if not is_done(consolidated):
            if not consolidate:
                raise FileNotFoundError(f"{p} is not consolidated yet (run lingua.checkpoint.consolidate)")
            from lingua.checkpoint import consolidate as do_consolidate

            logger.info("consolidating %s", p)
            consolidated = do_consolidate(p)
    else:
        raise FileNotFoundError(
            f"{p} is neither a consolidated folder ({CONSOLIDATED_WEIGHTS}), a complete training "
            "checkpoint (train_state.json + COMPLETE) nor a run folder (checkpoints/)"
        )
    run_dir = step_dir.parent.parent if step_dir is not None and step_dir.parent.name == "checkpoints" else None
    step = _step_of(consolidated, step_dir)
    config = _run_config(step_dir, run_dir)
    return CheckpointRef(consolidated, run_dir, step, training_layout(config) if config is not None else None)


def load_checkpoint(path: str | Path, device: str = "cpu") -> LoadedCheckpoint:
    """:func:`resolve_checkpoint`, then the model (eval mode) and tokenizer."""
    from lingua.consolidated import load_consolidated

    ref = resolve_checkpoint(path)
    model, tokenizer = load_consolidated(ref.consolidated, device=device)
    return LoadedCheckpoint(ref, model, tokenizer)


def training_layout(config: dict) -> str:
    """The layout a run trained with: ``layout.name``, else ``data.format`` (``text`` = raw)."""
    layout = config.get("layout")
    if isinstance(layout, dict) and layout.get("name"):
        return str(layout["name"])
    fmt = (config.get("data") or {}).get("format", "text")
    return "raw" if fmt == "text" else str(fmt)


def _step_of(consolidated: Path, step_dir: Path | None) -> int | None:
    from lingua.consolidated import read_extra

    extra = read_extra(consolidated)
    if "step" in extra:
        return int(extra["step"])
    if step_dir is not None and re.fullmatch(r"\d+", step_dir.name):
        return int(step_dir.name)
    return None


def _run_config(step_dir: Path | None, run_dir: Path | None) -> dict | None:
    for folder in (step_dir, run_dir):
        if folder is not None and (folder / RUN_CONFIG).is_file():
            path = folder / RUN_CONFIG
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: invalid YAML: {e}") from e
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
            return data
    return None
