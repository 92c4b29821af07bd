"""BoLT training entry point (warmstart, M-step and the raw baselines all train through here).

    python -m apps.bolt.train config=apps/bolt/configs/train_debug.yaml key.sub=value ...
    torchrun --nproc_per_node=N -m apps.bolt.train config=... key.sub=value ...

The work is the core trainer (``lingua.trainer.train``); this module only adds what is BoLT
specific, through ``BoltTrainArgs``:

* ``layout`` (:class:`apps.bolt.formats.LayoutArgs`): how latent records become training text
  (``raw``, ``prior``, ``posterior``, ``random``, ``pure``, raw mixing, fallback, whether latent
  tokens count in the loss). It becomes the data pipeline's formatter and is recorded in the
  run's config, which is how evaluation picks the raw or latent task variant;
* ``eval`` (:class:`apps.bolt.evaluation.in_training.InTrainingEvalArgs`, extending the core
  ``lingua.trainer.EvalArgs``): validation NLL on held-out raw documents, the ELBO for latent
  layouts, and few-shot tasks, every ``eval.every`` steps, at ``eval.must_eval_steps`` and at the
  final step; in process (``eval.mode=inprocess``, on the live model) or as one job per
  checkpoint (``eval.mode=launch`` with ``eval.launch.*``). See docs/evaluation.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from apps.bolt.evaluation.in_training import InTrainingEvalArgs
from apps.bolt.formats import LayoutArgs, make_layout
from lingua.args import cli_config, to_dict
from lingua.errors import entry_point
from lingua.trainer import TrainArgs, train


def _raw_layout() -> LayoutArgs:
    return LayoutArgs(name="raw")


@dataclass
class BoltTrainArgs(TrainArgs):
    """The core ``TrainArgs`` plus the BoLT sections (see the module docstring)."""

    layout: LayoutArgs = field(default_factory=_raw_layout)
    eval: InTrainingEvalArgs = field(default_factory=InTrainingEvalArgs)  # type: ignore[assignment]
    """The core's ``eval`` section (when) plus what to evaluate; may change on resume (``layout`` may not)."""


def build_format_fn(cfg: BoltTrainArgs) -> Any:
    """The document formatter of the configured layout (the record's text field is ``data.text_key``)."""
    options = to_dict(cfg.layout)
    options["text_key"] = cfg.data.text_key
    return make_layout(options.pop("name"), **options)


def build_hooks(cfg: BoltTrainArgs) -> list:
    """The ``eval`` section's hooks. The final step is not known here (it depends on the world
    size and a resumed checkpoint): the trainer gives it to the hooks (``plan``) before training."""
    from apps.bolt.evaluation.in_training import build_eval_hooks
    from lingua.tokenizer import build_tokenizer

    if not cfg.eval.evaluates():
        return []
    return build_eval_hooks(cfg.eval, build_tokenizer(cfg.tokenizer), layout=cfg.layout.name, data_root_dir=cfg.data.root_dir)


def run(cfg: BoltTrainArgs) -> dict:
    return train(cfg, format_fn=build_format_fn(cfg), eval_hooks=build_hooks(cfg))


@entry_point("apps.bolt.train")
def main(argv: Sequence[str] | None = None) -> dict:
    return run(cli_config(BoltTrainArgs, argv, "apps.bolt.train"))


if __name__ == "__main__":
    main()
