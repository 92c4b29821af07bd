"""BoLT training entry point (warmstart, M-step and the raw baselines all train through here).

    python -m apps.bolt.train config=apps/bolt/configs/train_debug.yaml key.sub=value ...
    torchrun --nproc_per_node=N -m apps.bolt.train config=... key.sub=value ...

The work is the core trainer (``lingua.trainer.train``); this module only adds what is BoLT
specific: the latent layouts (``apps/bolt/formats.py``, registered with the data pipeline as
``data.format`` names on import) and, through ``BoltTrainArgs``, the app's config sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from lingua.args import parse_args, to_dict
from lingua.trainer import TrainArgs, train


@dataclass
class BoltTrainArgs(TrainArgs):
    """The core ``TrainArgs`` plus the BoLT sections.

    The ``layout`` section (a ``apps.bolt.formats.LayoutArgs``: which latent layout turns
    records into training text) belongs here; :func:`build_format_fn` already turns it into
    the data pipeline's formatter once it exists. Until then ``data.format=<layout name>``
    selects a layout with its default options.
    """


def build_format_fn(cfg: BoltTrainArgs) -> Any:
    """The document formatter for the data pipeline: the configured latent layout, or None to
    let the pipeline look up ``data.format`` in its registry."""
    layout = getattr(cfg, "layout", None)
    if layout is None:
        return None
    from apps.bolt.formats import make_layout

    options = to_dict(layout)
    return make_layout(options.pop("name"), **options)


def run(cfg: BoltTrainArgs) -> dict:
    import apps.bolt.formats  # noqa: F401  registers the latent layouts as data.format names

    return train(cfg, format_fn=build_format_fn(cfg))


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_args(BoltTrainArgs, argv))


if __name__ == "__main__":
    main()
