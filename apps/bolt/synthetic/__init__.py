"""The embedded synthetic math world: compressed documents whose latent thoughts are known.

* :mod:`.corpus`: difficulty knobs (:class:`WorldArgs`), ``generate_corpus`` (raw documents for
  ``apps.bolt.prepare``), the hash split that keeps evaluation instances out of training, and
  the statement parser;
* :mod:`.oracle`: :class:`OracleTeacher`, the teacher backend ``oracle`` that returns the true
  latent of any (prefix, suffix) chunk;
* :mod:`.tasks`: held-out few-shot evaluation problems (raw and latent variants), ``grade``,
  ``write_eval_files`` for lm-eval;
* :mod:`.tokenizer`: ``get_synthetic_tokenizer``, a small cached BPE tokenizer for the world;
* :mod:`.templates`, :mod:`.worlds`, :mod:`.arith`: the problem families and their grammar.
"""

from apps.bolt.synthetic.corpus import WorldArgs, generate_corpus, make_world_args
from apps.bolt.synthetic.oracle import DEFAULT_LATENT_STYLE, OracleTeacher
from apps.bolt.synthetic.tasks import build_prompt, generate_eval_problems, grade, write_eval_files
from apps.bolt.synthetic.tokenizer import get_synthetic_tokenizer

__all__ = [
    "DEFAULT_LATENT_STYLE",
    "OracleTeacher",
    "WorldArgs",
    "build_prompt",
    "generate_corpus",
    "generate_eval_problems",
    "get_synthetic_tokenizer",
    "grade",
    "make_world_args",
    "write_eval_files",
]
