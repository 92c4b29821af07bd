"""Prompt layouts, few-shot targets, filters and graders that the task YAMLs call by ``!function``.

The YAMLs in ``apps/bolt/configs/tasks/`` reference these as
``!function apps.bolt.evaluation.task_functions.<name>``; lm-eval imports them from the package,
so prompts and graders live in tested Python, not in Jinja strings. Queries and exemplar targets
come from the eval formats of :mod:`apps.bolt.formats` (``GSM8K_STYLE``, ``MATH_STYLE``, and
``MMLU_STYLE`` below), the module that also builds the training layouts, so training and
evaluation formats cannot drift. A format's raw target starts with its own delimiter, so every
YAML sets ``target_delimiter: ""``.

Two variants of every task (the original BoLT code's lm-eval task files):

* **raw**: the question, then the answer text (reasoning then "The final answer is N ...");
* **latent** (``latent_`` tasks, for latent-trained models): the question ends with the opening of
  a prior latent (``<|START_OF_LATENT|><|PRIOR_PREFIX|>``, target delimiter ``""``); the exemplars
  put the reasoning inside the latent, close it, then state the answer. Generation also stops at
  ``<|START_OF_LATENT|>`` so a model cannot start a second thought.
"""

from __future__ import annotations

from typing import Callable, Sequence

from apps.bolt.evaluation import answers
from apps.bolt.evaluation.exemplars import GSM8K, MATH, MMLU_STEM, Exemplar
from apps.bolt.formats import GSM8K_STYLE, MATH_STYLE, EvalFormat


def _apply(extract: Callable[[str], str], resps: Sequence[Sequence[str]]) -> list[list[str]]:
    return [[extract(r) for r in rs] for rs in resps]


# ------------------------------------------------------------------------------- filters
def strict_number_filter(resps, docs) -> list[list[str]]:
    """``strict-match``: the number after the first "answer is"."""
    return _apply(answers.strict_number, resps)


def flexible_number_filter(resps, docs) -> list[list[str]]:
    """``flexible-extract``: the last number of the generation."""
    return _apply(answers.flexible_number, resps)


def latent_strict_number_filter(resps, docs) -> list[list[str]]:
    """``latent-strict-match``: the strict number inside the latent thought."""
    return _apply(lambda t: answers.on_latent(answers.strict_number, t), resps)


def latent_flexible_number_filter(resps, docs) -> list[list[str]]:
    """``latent-flexible-extract``: the last number inside the latent thought."""
    return _apply(lambda t: answers.on_latent(answers.flexible_number, t), resps)


def strict_choice_filter(resps, docs) -> list[list[str]]:
    """``strict-match`` for multiple choice: ``(X)`` after "answer is"."""
    return _apply(answers.strict_choice, resps)


def flexible_choice_filter(resps, docs) -> list[list[str]]:
    """``flexible-extract`` for multiple choice: the last ``(X)``."""
    return _apply(answers.flexible_choice, resps)


# ------------------------------------------------------------------------------- GSM8K
def gsm8k_text(doc: dict) -> str:
    return GSM8K_STYLE.query(doc["question"])


def latent_gsm8k_text(doc: dict) -> str:
    return GSM8K_STYLE.query(doc["question"], latent=True)


def gsm8k_target(doc: dict) -> str:
    """Gold of a test record (the number after ``####``); exemplars carry their own ``target``."""
    return answers.gsm8k_gold(doc["answer"])


def _gsm8k_shot(e: Exemplar, latent: bool) -> dict:
    if latent:  # the derivation ends inside the thought; the answer sentence follows it
        target = GSM8K_STYLE.target(
            f"The final answer is {e.answer}. I hope it is correct.", f"{e.reasoning} Therefore, the answer is {e.answer}.", latent=True
        )
    else:
        target = GSM8K_STYLE.target(f"Therefore, the final answer is {e.answer}. I hope it is correct.", e.reasoning)
    return {"question": e.problem, "target": target}


def gsm8k_fewshot() -> list[dict]:
    return [_gsm8k_shot(e, latent=False) for e in GSM8K]


def latent_gsm8k_fewshot() -> list[dict]:
    return [_gsm8k_shot(e, latent=True) for e in GSM8K]


# ------------------------------------------------------------------------------- MATH
def math_text(doc: dict) -> str:
    return MATH_STYLE.query(doc["problem"])


def latent_math_text(doc: dict) -> str:
    return MATH_STYLE.query(doc["problem"], latent=True)


def math_target(doc: dict) -> str:
    return answers.math_gold(doc["solution"])


def _math_shot(e: Exemplar, latent: bool) -> dict:
    sentence = f"Final Answer: The final answer is ${e.answer}$. I hope it is correct."
    thought = f"{e.reasoning}\nTherefore, the answer is ${e.answer}$.\n" if latent else e.reasoning
    return {"problem": e.problem, "target": MATH_STYLE.target(sentence, thought, latent=latent)}


def math_fewshot() -> list[dict]:
    return [_math_shot(e, latent=False) for e in MATH]


def latent_math_fewshot() -> list[dict]:
    return [_math_shot(e, latent=True) for e in MATH]


def math_process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """math-verify grading of the first generation against the boxed answer of the solution."""
    return {"exact_match": int(answers.grade_math(answers.math_gold(doc["solution"]), results[0]))}


# ------------------------------------------------------------------------------- MMLU
MMLU_STYLE = EvalFormat(question_template="Question: {question}\nAnswer:", stop=("Question:", "</s>"))
"""Multiple choice, choices on their own lines inside ``{question}``."""
_LETTERS = "ABCDEFGHIJ"


def _mmlu_question(question: str, choices: Sequence[str]) -> str:
    return "\n".join([question.strip(), *(f"({_LETTERS[i]}) {c}" for i, c in enumerate(choices))])


def mmlu_text(doc: dict) -> str:
    return MMLU_STYLE.query(_mmlu_question(doc["question"], doc["choices"]))


def latent_mmlu_text(doc: dict) -> str:
    return MMLU_STYLE.query(_mmlu_question(doc["question"], doc["choices"]), latent=True)


def mmlu_target(doc: dict) -> str:
    """``(X)`` for the integer ``answer`` of an MMLU record."""
    return f"({_LETTERS[int(doc['answer'])]})"


def _mmlu_shot(e: Exemplar, latent: bool) -> dict:
    thought = f"Let's think step by step. {e.reasoning}"
    target = MMLU_STYLE.target(f"The answer is ({e.answer}).", thought, latent=latent)
    return {"question": e.problem, "choices": list(e.choices), "target": target}


def mmlu_fewshot() -> list[dict]:
    return [_mmlu_shot(e, latent=False) for e in MMLU_STEM]


def latent_mmlu_fewshot() -> list[dict]:
    return [_mmlu_shot(e, latent=True) for e in MMLU_STEM]


# ------------------------------------------------------------------------------- synthetic world
def synthetic_answer_filter(resps, docs) -> list[list[str]]:
    """The synthetic world's own extraction rule (:func:`apps.bolt.synthetic.tasks.extract_answer`)."""
    return _apply(lambda t: _synthetic(t, "raw"), resps)


def latent_synthetic_answer_filter(resps, docs) -> list[list[str]]:
    """The same rule on the text after the thought; an unclosed thought gives no answer."""
    return _apply(lambda t: _synthetic(t, "latent"), resps)


def _synthetic(text: str, variant: str) -> str:
    from apps.bolt.synthetic.tasks import extract_answer

    got = extract_answer(text, variant)
    return answers.INVALID if got is None else got


def inline_synthetic_answer_filter(resps, docs) -> list[list[str]]:
    """The chain-of-thought prompt's rule: the last number of the first line (after the derivation)."""
    return _apply(lambda t: _synthetic(t, "inline"), resps)
