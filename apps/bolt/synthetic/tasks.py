"""Held-out evaluation tasks of the synthetic world: few-shot "question -> answer", exact match.

Problems are fresh instances of the corpus's own worlds, drawn from the evaluation share of the
instance hash (:func:`apps.bolt.synthetic.corpus.split_of`): no evaluation problem's chain of
steps appears in any training document, whatever the seeds. The ``fewshot``, ``dev`` and
``test`` splits own disjoint slices of that share, and each split holds no duplicates.

The prompt is a worksheet like the training documents: a title line, a blank line, ``k`` solved
exemplars one per line, then the question. Two variants, as in the reference's GSM8K/MATH tasks
(the original BoLT code's lm-eval task files):

* ``raw``: exemplar = ``question + " " + answer sentence``; the model continues the question
  with the answer sentence ("Solve 3x + 7 = 31." -> " So x = 8.").
* ``latent``: exemplar = ``question + <|START_OF_LATENT|><|PRIOR_PREFIX|> + thought +
  <|END_OF_LATENT|> + " " + answer sentence``; the query ends with the two opening tokens and
  the model writes its own thought, closes it, then answers. The exemplar thoughts are the
  oracle's (same ``latent_style`` as the training latents).
* ``inline`` (the synthetic analog of a few-shot chain-of-thought prompt, for models trained on
  text with the reasoning written out, such as the WRAP-CoT baseline): exemplar = ``question +
  " " + derivation + " " + answer sentence``, no markers; the query is the raw one.

Grading (:func:`grade`): for the latent variant, only the text after the first
``<|END_OF_LATENT|>`` counts (a thought that is never closed gives no answer); then the first
line; then its first number (for ``inline``: its last number, the answer sentence's, since the
derivation before it is full of numbers) (``-?\\d+(\\.\\d+)?``), normalised (leading zeros and integral
decimals dropped, "08" and "8.0" read as 8) and compared with the gold integer as text.

Files (:func:`write_eval_files`), one JSON object per line, for an lm-eval YAML task::

    <out>/fewshot.jsonl, <out>/dev.jsonl, <out>/test.jsonl
        id, split, world, template, steps (int), question, answer (gold, str),
        answer_sentence, latent (oracle thought), query_raw, target_raw, query_latent,
        target_latent, target_inline
    <out>/meta.json   description (the title block), fewshot_delimiter "\\n",
                      target_delimiter "", num_fewshot, until_raw, until_latent, max_gen_toks,
                      latent_style, seed, counts, knobs, the extraction rule
    <out>/COMPLETE    written last

lm-eval builds ``description + "".join(query + target + "\\n" for shots) + query``, which is
exactly :func:`build_prompt`; use ``fewshot.jsonl`` with the ``first_n`` sampler.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from apps.bolt.formats import EvalFormat, split_latent_generation
from apps.bolt.synthetic.corpus import EVAL_SPLITS, EVAL_STREAMS, WorldArgs, make_world_args, sample_problem, stream
from apps.bolt.synthetic.oracle import DEFAULT_LATENT_STYLE
from apps.bolt.synthetic.worlds import Problem
from lingua.io import atomic_write_json, mark_done, write_jsonl

VARIANTS = ("raw", "latent", "inline")
EVAL_TITLE = "Practice set 1"
DESCRIPTION = EVAL_TITLE + "\n\n"
FORMAT = EvalFormat(question_template="{question}", target_delimiter=" ", answer_delimiter=" ", fewshot_delimiter="\n", stop=("\n",))
"""The worksheet layout in the shared eval-prompt builder of :mod:`apps.bolt.formats`."""
MAX_GEN_TOKS = 160
EXHAUSTED_AFTER = 200
"""Consecutive repeated draws after which a world counts as used up for a split."""
DEFAULT_NUM_FEWSHOT = 3
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class EvalProblem:
    """One evaluation item: a problem of the world plus where it came from."""

    id: str
    split: str
    problem: Problem

    def query(self, variant: str) -> str:
        return FORMAT.query(self.problem.question, latent=_is_latent(variant))

    def target(self, variant: str, latent_style: str = DEFAULT_LATENT_STYLE) -> str:
        latent = _is_latent(variant)
        return FORMAT.target(self.problem.answer_sentence, _thought(self.problem, variant, latent_style), latent)

    def record(self, latent_style: str = DEFAULT_LATENT_STYLE) -> dict:
        p = self.problem
        return {
            "id": self.id,
            "split": self.split,
            "world": p.world,
            "template": p.template,
            "steps": len(p.steps),
            "question": p.question,
            "answer": str(p.answer),
            "answer_sentence": p.answer_sentence,
            "latent": p.latent(latent_style),
            "query_raw": self.query("raw"),
            "target_raw": self.target("raw"),
            "query_latent": self.query("latent"),
            "target_latent": self.target("latent", latent_style),
            "target_inline": self.target("inline"),
        }


def _thought(problem: Problem, variant: str, latent_style: str) -> str:
    """An exemplar's reasoning: the oracle thought (latent), the derivation in plain text
    (inline), none (raw)."""
    if _is_latent(variant):
        return problem.latent(latent_style)
    return problem.derivation if variant == "inline" else ""


def _is_latent(variant: str) -> bool:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant == "latent"


def generate_eval_problems(n: int, seed: int = 0, split: str = "test", *, args: WorldArgs | None = None, **knobs) -> list[EvalProblem]:
    """``n`` distinct problems of an evaluation split (``fewshot``, ``dev`` or ``test``).

    Worlds take turns (item ``i`` comes from world ``i mod W``) so every world is represented;
    step counts are drawn as in the corpus. Item ``i`` is drawn from its own stream and a draw
    that repeats an earlier item's computation is redrawn, so the first ``k`` items do not
    depend on ``n``. A world whose share of the split is used up (the mean of two one-digit
    numbers has few instances) gives its turns to the next world; ``world`` and ``steps`` in
    each record allow a breakdown.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {tuple(EVAL_SPLITS)}, got {split!r}")
    world = make_world_args(args, **knobs)
    names = [w for w in world.worlds if w in world.step_options()]
    seen: set[str] = set()
    out = []
    for i in range(n):
        rng = stream(seed, EVAL_STREAMS[split], i)
        problem = None
        while names and problem is None:
            name = names[i % len(names)]
            for _ in range(EXHAUSTED_AFTER):
                draw = sample_problem(rng, world, split, world=name)
                if draw.key not in seen:
                    problem = draw
                    break
            else:
                names.remove(name)
        if problem is None:
            raise RuntimeError(f"the {split} split has only {len(seen)} distinct problems under {world}; ask for fewer")
        seen.add(problem.key)
        out.append(EvalProblem(f"synth-{split}-{seed}-{i:05d}", split, problem))
    return out


def build_prompt(item: EvalProblem, shots: Sequence[EvalProblem], variant: str, latent_style: str = DEFAULT_LATENT_STYLE) -> str:
    """The few-shot prompt for ``item`` (identical to what lm-eval builds from the files)."""
    exemplars = [(s.problem.question, _thought(s.problem, variant, latent_style), s.problem.answer_sentence) for s in shots]
    return DESCRIPTION + FORMAT.prompt(item.problem.question, exemplars, _is_latent(variant))


def stop_strings(variant: str) -> list[str]:
    return FORMAT.stop_strings(_is_latent(variant))


def _normalize(number: str) -> str:
    sign = "-" if number.startswith("-") else ""
    whole, _, frac = number.lstrip("-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    text = whole + ("." + frac if frac else "")
    return "0" if text == "0" else sign + text


def extract_answer(text: str, variant: str = "raw") -> str | None:
    """The graded number of a generation (see the module docstring), or None."""
    if _is_latent(variant):
        thought, text = split_latent_generation(text)
        if thought is None:
            return None
    numbers = _NUMBER.findall(text.split("\n", 1)[0])
    if not numbers:
        return None
    return _normalize(numbers[-1] if variant == "inline" else numbers[0])


def grade(answer_text: str, gold: str | int, variant: str = "raw") -> bool:
    """Exact match of the extracted answer with ``gold``."""
    got = extract_answer(answer_text, variant)
    return got is not None and got == _normalize(str(gold).strip())


def accuracy_report(items: Sequence[EvalProblem], correct: Sequence[bool]) -> dict:
    """Overall accuracy and its breakdown by world and by number of steps."""
    if len(items) != len(correct):
        raise ValueError(f"{len(items)} items but {len(correct)} grades")
    groups: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, correct):
        groups["all"].append(ok)
        groups[f"world/{item.problem.world}"].append(ok)
        groups[f"steps/{len(item.problem.steps)}"].append(ok)
    return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(groups.items())}


def write_eval_files(
    out_dir: str | Path,
    *,
    n_test: int = 500,
    n_dev: int = 200,
    num_fewshot: int = DEFAULT_NUM_FEWSHOT,
    seed: int = 0,
    latent_style: str = DEFAULT_LATENT_STYLE,
    args: WorldArgs | None = None,
    **knobs,
) -> dict[str, Path]:
    """Write the evaluation files (schema in the module docstring); returns the paths by split."""
    world = make_world_args(args, **knobs)
    out = Path(out_dir)
    sizes = {"fewshot": num_fewshot, "dev": n_dev, "test": n_test}
    paths = {}
    for split, n in sizes.items():
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(paths[split], (item.record(latent_style) for item in generate_eval_problems(n, seed, split, args=world)))
    meta = {
        "description": DESCRIPTION,
        "fewshot_delimiter": FORMAT.fewshot_delimiter,
        "target_delimiter": "",
        "num_fewshot": num_fewshot,
        "fewshot_sampler": "first_n",
        "until_raw": stop_strings("raw"),
        "until_latent": stop_strings("latent"),
        "max_gen_toks": MAX_GEN_TOKS,
        "latent_style": latent_style,
        "seed": seed,
        "counts": sizes,
        "knobs": asdict(world),
        "extraction": "latent: text after the first <|END_OF_LATENT|> (none: no answer); then the first line; "
        "then its first number -?\\d+(\\.\\d+)?, normalised; exact match with `answer`",
    }
    atomic_write_json(out / "meta.json", meta)
    mark_done(out, {"files": sorted(p.name for p in paths.values())})
    paths["meta"] = out / "meta.json"
    return paths
