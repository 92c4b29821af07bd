"""``bolt-lm-eval``: lm-evaluation-harness's own command line with the ``bolt`` model and the
project's tasks available, with no import trick::

    bolt-lm-eval --model bolt --model_args ckpt=RUN/checkpoints/STEP --tasks bolt_gsm8k_cot
    bolt-lm-eval ls tasks                       # lm-eval's tasks plus ours (bolt_*)
    python -m apps.bolt.evaluation.cli ...      # the same without the console script

It registers :class:`~apps.bolt.evaluation.harness.BoltLM` as ``bolt`` (lazily: the model module
loads only when ``--model bolt`` is used), adds ``--include_path apps/bolt/configs/tasks`` unless
the command line names an include path, and hands everything else to lm-eval's CLI unchanged
(``lm_eval --model bolt`` alone cannot work: lm-eval does not know this project). The project's
tasks are named ``bolt_*`` so they never shadow lm-eval's tasks of the same base name.

lm-eval's own tasks work as on ``lm_eval`` (``--tasks gsm8k_cot,minerva_math``), and their latent
variants, derived at run time by :mod:`apps.bolt.evaluation.standard`, as
``--tasks bolt_latent_std_gsm8k_cot`` (lm-eval's ``TaskManager`` is replaced by the subclass that
registers them; ``ls tasks`` does not list them).
"""

from __future__ import annotations

import sys
from typing import Sequence

from lingua.errors import entry_point

MODEL_NAME = "bolt"
MODEL_TARGET = "apps.bolt.evaluation.harness:BoltLM"
_INCLUDE_SUBCOMMANDS = {"run", "ls", "validate"}


def register_bolt_model() -> None:
    """Register ``bolt`` in lm-eval's model registry without importing the model module. lm-eval's
    own models are loaded first: it fills its registry only while the registry is empty, so
    registering ``bolt`` first would hide ``hf``, ``vllm`` and the rest."""
    import lm_eval.models  # noqa: F401  (registers lm-eval's models)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def with_task_path(argv: Sequence[str]) -> list[str]:
    """``argv`` plus ``--include_path <shipped tasks>`` where lm-eval accepts one and none is given."""
    from apps.bolt.evaluation.tasks import TASKS_DIR

    args = list(argv)
    if not args or any(a in ("-h", "--help") for a in args):
        return args
    if any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        return args
    if args[0] in _INCLUDE_SUBCOMMANDS or args[0].startswith("-"):
        return args + ["--include_path", str(TASKS_DIR)]
    return args


@entry_point("bolt-lm-eval")
def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``bolt-lm-eval = apps.bolt.evaluation.cli:main``)."""
    from lm_eval.__main__ import cli_evaluate

    register_bolt_model()
    from apps.bolt.evaluation.standard import install_task_manager

    install_task_manager()  # --tasks also accepts bolt_latent_std_<lm-eval task>
    args = with_task_path(sys.argv[1:] if argv is None else argv)
    sys.argv = ["bolt-lm-eval", *args]  # lm-eval's CLI parses sys.argv itself
    cli_evaluate()


if __name__ == "__main__":
    main()
