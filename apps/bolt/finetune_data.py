"""Finetuning data: a task's problems as (prompt, completion) pairs in a checkpoint's format, and
how a sampled completion is graded.

Tasks (:data:`TASKS`) and their splits:

* ``gsm8k``: hub ``gsm8k`` / ``main``, ``train`` and ``test``;
* ``math``: hub ``EleutherAI/hendrycks_math``, the seven subjects, ``train`` and ``test``;
* ``synthetic``: the embedded world. Test = the world's evaluation ``test`` split
  (:func:`apps.bolt.synthetic.tasks.generate_eval_problems`); train = fresh problems of the
  ``train`` share of the instance hash (:func:`apps.bolt.synthetic.corpus.sample_problem`), so no
  training problem's computation is an evaluation one, whatever the seeds.

Local copies (``data.root``) follow the evaluation stage's layout,
``ROOT/<hub path>/<name>/<split>.jsonl`` with the hub records' fields; an empty root reads the hub
(an unreachable or offline hub is a one-line error that names the local path to use instead).

A problem is ``(question, thought, answer sentence, gold)``; the thought is the worked solution
(MATH: the solution plus "Therefore, the answer is $X$."; GSM8K: the rationale without its
``<<...>>`` calculator notes plus "Therefore, the answer is N."; synthetic: the oracle's
derivation). Formats (:data:`FORMATS`, as the original BoLT code's finetuning):

* ``thought`` (latent-trained models): ``query SOL PRIOR`` | ``thought EOL answer``;
* ``delimiter`` (the reference's raw baselines, ``only_special_token_delimiter``): ``query SOL`` |
  ``thought answer`` (no PRIOR, no EOL);
* ``text``: the plain-text raw prompt of the evaluation tasks, ``query`` | `` thought answer``.

Queries come from the evaluation formats of :mod:`apps.bolt.formats` (``MATH_STYLE``,
``GSM8K_STYLE``, the synthetic worksheet format), so a finetuned model is asked in the words the
few-shot evaluation uses. Training records (:func:`sft_records`) carry the prompt with the
tokenizer's BOS string in front, so the registered formatter ``sft`` masks BOS and prompt and
trains on the completion and the EOS only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from apps.bolt.evaluation import answers
from apps.bolt.formats import EOL, GSM8K_STYLE, MATH_STYLE, PRIOR, SOL, EvalFormat, split_latent_generation
from apps.bolt.synthetic.corpus import WorldArgs, make_world_args, sample_problem, stream
from apps.bolt.synthetic.oracle import DEFAULT_LATENT_STYLE
from apps.bolt.synthetic.tasks import FORMAT as SYNTHETIC_STYLE
from lingua.data.formatting import BadRecord, register_format
from lingua.errors import ExpectedError
from lingua.io import read_jsonl

logger = logging.getLogger("apps.bolt.finetune")

TASKS = ("math", "gsm8k", "synthetic")
FORMATS = ("thought", "delimiter", "text")
SPLITS = ("train", "test")
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
HUB = {"gsm8k": ("gsm8k", ("main",)), "math": ("EleutherAI/hendrycks_math", MATH_SUBJECTS)}
REFERENCE_SAMPLES = {"math": 4, "gsm8k": 16, "synthetic": 4}
"""Samples per test prompt when ``eval.n`` is 0 (the reference's finetune configs: 4 and 16)."""
SYNTHETIC_TRAIN_STREAM = 10
"""RNG stream id of synthetic training problems (the corpus uses 0, the evaluation splits 1-3)."""
EXHAUSTED_AFTER = 200
_CALCULATOR = re.compile(r"<<[^>]*>>")


class DataUnavailable(ExpectedError):
    """A task's split is neither in ``data.root`` nor obtainable from the hub."""


@dataclass
class FinetuneDataArgs:
    root: str = ""
    """Local copies of the hub datasets (``ROOT/<path>/<name>/<split>.jsonl``); empty: the hub."""
    train_limit: int = 0
    """Use a seeded subset of this many training problems (0: all)."""
    test_limit: int = 0
    """Score a seeded subset of this many test problems (0: all); the same for every seed."""
    subset_seed: int = 0
    synthetic_train: int = 2000
    """Synthetic world: distinct training problems to draw."""
    synthetic_test: int = 500
    """Synthetic world: test problems (the first N of the world's test split)."""
    synthetic_seed: int = 0
    """Synthetic world: seed of both problem sets (not the finetuning seed: every run of a sweep
    trains and scores the same problems)."""
    latent_style: str = DEFAULT_LATENT_STYLE
    """Synthetic world: how the oracle writes a thought (``steps`` or ``restate``)."""
    world: WorldArgs = field(default_factory=WorldArgs)
    """Synthetic world: difficulty knobs."""

    def validate(self) -> None:
        for key in ("train_limit", "test_limit", "subset_seed", "synthetic_seed"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if self.synthetic_train < 1 or self.synthetic_test < 1:
            raise ValueError("data.synthetic_train and data.synthetic_test must be >= 1")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    thought: str
    """The worked solution (written inside the thought, or after the delimiter)."""
    answer: str
    """The closing answer sentence."""
    gold: str
    """The graded answer (a number, or a MATH expression)."""


# ------------------------------------------------------------------------------------ loading
def _subset(items: list, limit: int, seed: int) -> list:
    """A seeded subset of ``limit`` items in their original order (all when ``limit`` is 0)."""
    if not limit or limit >= len(items):
        return items
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:limit])
    return [items[i] for i in keep]


def _read_split(task: str, split: str, root: str) -> list[tuple[str, dict]]:
    """``(name, record)`` pairs of a hub task's split, from ``root`` or from the hub."""
    path, names = HUB[task]
    out = []
    for name in names:
        if root:
            file = Path(root) / path / name / f"{split}.jsonl"
            if not file.is_file():
                raise DataUnavailable(f"{task} {split}: no local copy {file} (data.root={root}); "
                                      f"write the hub records of {path}/{name} there, or set data.root= to use the hub")
            out += [(name, r) for r in read_jsonl(file)]
            continue
        try:
            import datasets

            out += [(name, dict(r)) for r in datasets.load_dataset(path, name, split=split)]
        except Exception as e:  # noqa: BLE001 - offline, unknown dataset, network: all mean "not here"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataUnavailable(f"{task} {split}: {path}/{name} is not available from the Hugging Face Hub "
                                  f"(offline? {first}); put a local copy at DIR/{path}/{name}/{split}.jsonl "
                                  "and pass data.root=DIR") from None
    return out


def _gsm8k_problem(i: int, split: str, record: dict) -> Problem:
    gold = answers.gsm8k_gold(record["answer"])
    rationale = _CALCULATOR.sub("", record["answer"].split("####")[0]).strip()
    return Problem(f"gsm8k-{split}-{i}", record["question"], f"{rationale} Therefore, the answer is {gold}.",
                   f"The final answer is {gold}. I hope it is correct.", gold)


def _math_problem(i: int, split: str, subject: str, record: dict) -> Problem:
    gold = answers.math_gold(record["solution"])
    return Problem(f"math-{subject}-{split}-{i}", record["problem"],
                   f"{record['solution'].strip()}\nTherefore, the answer is ${gold}$.\n",
                   f"Final Answer: The final answer is ${gold}$. I hope it is correct.", gold)


def _synthetic_problems(split: str, args: FinetuneDataArgs) -> list[Problem]:
    from apps.bolt.synthetic.tasks import generate_eval_problems

    world = make_world_args(args.world)
    if split == "test":
        drawn = [(e.id, e.problem) for e in generate_eval_problems(args.synthetic_test, args.synthetic_seed, "test", args=world)]
    else:
        drawn, seen, attempt, repeats = [], set(), 0, 0
        while len(drawn) < args.synthetic_train:
            p = sample_problem(stream(args.synthetic_seed, SYNTHETIC_TRAIN_STREAM, attempt), world, "train")
            attempt += 1
            if p.key in seen:
                repeats += 1
                if repeats >= EXHAUSTED_AFTER:
                    raise ValueError(f"the synthetic world has only about {len(drawn)} distinct training problems "
                                     f"under its knobs; lower data.synthetic_train")
                continue
            seen.add(p.key)
            repeats = 0
            drawn.append((f"synth-train-{args.synthetic_seed}-{len(drawn):05d}", p))
    return [Problem(pid, p.question, p.latent(args.latent_style), p.answer_sentence, str(p.answer)) for pid, p in drawn]


def load_problems(task: str, split: str, args: FinetuneDataArgs) -> list[Problem]:
    """The problems of ``task``'s ``split`` (subset per ``train_limit`` / ``test_limit``)."""
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"task must be one of {TASKS} and split one of {SPLITS}, got {task!r}, {split!r}")
    if task == "synthetic":
        problems = _synthetic_problems(split, args)
    else:
        problems, skipped = [], 0
        for i, (name, record) in enumerate(_read_split(task, split, args.root)):
            try:
                problems.append(_gsm8k_problem(i, split, record) if task == "gsm8k" else _math_problem(i, split, name, record))
            except (KeyError, ValueError, AttributeError):  # no answer to grade against (a MATH solution without \boxed{})
                skipped += 1
        if skipped:
            logger.warning("%s %s: skipped %d record(s) without a gradable answer", task, split, skipped)
        if not problems:
            raise DataUnavailable(f"{task} {split}: no usable records")
    limit = args.train_limit if split == "train" else args.test_limit
    return _subset(problems, limit, args.subset_seed)


# ------------------------------------------------------------------------------------ formats
def _normalised(text: str) -> str:
    return answers.normalize_number(text)


@dataclass(frozen=True)
class TaskFormat:
    """How ``task``'s problems are written in ``format`` and how a completion is graded."""

    task: str
    format: str

    def __post_init__(self) -> None:
        if self.task not in TASKS or self.format not in FORMATS:
            raise ValueError(f"task must be one of {TASKS} and format one of {FORMATS}, got {self.task!r}, {self.format!r}")

    @property
    def style(self) -> EvalFormat:
        return {"math": MATH_STYLE, "gsm8k": GSM8K_STYLE, "synthetic": SYNTHETIC_STYLE}[self.task]

    def prompt(self, p: Problem) -> str:
        if self.format == "text":
            return self.style.query(p.question)
        query = self.style.query(p.question, latent=True)
        return query if self.format == "thought" else query.removesuffix(PRIOR)

    def completion(self, p: Problem) -> str:
        if self.format == "delimiter":
            return p.thought + self.style.answer_delimiter + p.answer
        return self.style.target(p.answer, p.thought, latent=self.format == "thought")

    def stop_strings(self) -> list[str]:
        """The task's question marker, and a new thought (any latent token outside ``thought``)."""
        return [*self.style.stop, SOL] if self.format == "thought" else [*self.style.stop, SOL, EOL]

    def extract(self, generation: str) -> str | None:
        """The answer a completion gives (None: none found); the key of majority voting.

        synthetic: the last number of the answer line (for ``thought``: the line after the closed
        thought; an unclosed thought gives none); gsm8k: the last number (``flexible-extract``);
        math: the final-answer expression (:func:`apps.bolt.evaluation.answers.math_final_answer`).
        """
        if self.task == "math":
            found = answers.math_final_answer(generation).strip()
            return found or None
        if self.task == "synthetic":
            if self.format == "thought":
                thought, generation = split_latent_generation(generation)
                if thought is None:
                    return None
            generation = generation.strip().split("\n", 1)[0]
        found = answers.flexible_number(generation)
        return None if found == answers.INVALID else found

    def same(self, a: str, b: str) -> bool:
        """Do two extracted answers agree (MATH: math-verify equivalence)?"""
        return math_equal(a, b) if self.task == "math" else a == b

    def grade(self, generation: str, p: Problem) -> bool:
        found = self.extract(generation)
        if found is None:
            return False
        return math_equal(p.gold, found) if self.task == "math" else found == _normalised(p.gold)


def math_equal(a: str, b: str) -> bool:
    """math-verify equivalence when the package is installed; else equality of the normalised
    strings (spaces, ``$`` and thousands commas dropped)."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return _normalised(a.replace(" ", "")) == _normalised(b.replace(" ", ""))
    return answers.math_equal(a, b)


def choose_format(requested: str, layout: str | None) -> str:
    """``requested`` unless it is ``auto``: ``thought`` for models trained with a prior-thought
    layout (``random``, ``prior``), ``delimiter`` for the others (the reference's raw baselines)."""
    from apps.bolt.evaluation.tasks import variant_for_layout

    if requested != "auto":
        return requested
    if layout is None:
        raise ValueError("format=auto: the checkpoint records no training layout; pass format=thought|delimiter|text")
    return "thought" if variant_for_layout(layout) == "latent" else "delimiter"


# ------------------------------------------------------------------------------ training records
SFT_FORMAT = "sft"


def sft_records(problems: Sequence[Problem], fmt: TaskFormat, bos: str, seed: int) -> list[dict]:
    """Training records in a seeded order (the data pipeline reads its first epoch in file order):
    ``prompt`` = BOS string + prompt (not trained on), ``completion`` (trained on, then EOS)."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 7])).permutation(len(problems))
    out = []
    for i in order:
        p = problems[int(i)]
        prompt, completion = bos + fmt.prompt(p), fmt.completion(p)
        out.append({"id": p.id, "text": prompt + completion, "prompt": prompt, "completion": completion})
    return out


def sft_format(text_key: str = "text") -> Any:
    """The ``sft`` document formatter: the prompt as context only, the completion in the loss."""

    def format_sft(record: dict, rng: np.random.Generator) -> list[tuple[str, bool]]:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise BadRecord(f"record {record.get('id')!r} needs string 'prompt' and non-empty 'completion' fields")
        return [(prompt, False), (completion, True)] if prompt else [(completion, True)]

    return format_sft


register_format(SFT_FORMAT, sft_format)
