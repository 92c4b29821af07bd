"""lm-eval's own tasks and their derived latent variants (apps/bolt/evaluation/standard.py).

Offline: the task configs come from lm-eval's installed YAMLs (an index of three task folders, not
all of lm-eval); every ``ConfigurableTask`` is built with ``custom_dataset`` returning a one-row
in-memory dataset, so lm-eval builds the prompt (description + exemplars + query) and applies the
filters and ``process_results`` exactly as in a run, without any download.

The prompt property checked (``_strip`` / ``_source_prompt``): the latent prompt with the three
marker strings removed equals the source task's prompt built with ``target_delimiter: ""``. That
is the only whitespace difference: the latent variant drops lm-eval's target delimiter (one " "
between each exemplar's question and its reasoning) so the thought starts right after
``<|PRIOR_PREFIX|>``; the whitespace between reasoning and answer sentence is kept after
``<|END_OF_LATENT|>``, and the query's own text (including a trailing "Let's think step by step.")
is unchanged.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

pytest.importorskip("lm_eval")

import datasets  # noqa: E402
import lm_eval  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402

from apps.bolt.evaluation import standard  # noqa: E402
from apps.bolt.evaluation.standard import (  # noqa: E402
    LATENT_STD_PREFIX,
    StandardTaskError,
    StandardTasks,
    answer_after_thought_filter,
    derive_latent_config,
    split_exemplar,
    std_metric_keys,
)
from apps.bolt.evaluation.tasks import TaskLibrary, apply_variant, base_name, is_latent  # noqa: E402
from apps.bolt.formats import EOL, PRIOR, SOL  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
FOLDERS = [LM_EVAL_TASKS / "gsm8k", LM_EVAL_TASKS / "minerva_math", LM_EVAL_TASKS / "mmlu" / "flan_cot_fewshot"]
GSM8K = "gsm8k_cot"
MATH = "minerva_math_algebra"
MMLU = "mmlu_flan_cot_fewshot_abstract_algebra"
DOCS: dict[str, dict[str, Any]] = {
    GSM8K: {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "3 + 2 = 5\n#### 5"},
    MATH: {"problem": "What is $1+1$?", "solution": "We have $1+1=\\boxed{2}$.", "answer": "2"},
    MMLU: {"question": "What is 2+2?", "choices": ["1", "2", "3", "4"], "answer": 3, "subject": "abstract_algebra"},
}
GENERATIONS = {  # a latent generation whose thought holds a wrong candidate before the answer
    GSM8K: ("3 + 2 = 5, not 7.", " The answer is 5."),
    MATH: ("Adding, $1+1=\\boxed{3}$ is wrong; $1+1=2$.", "\nFinal Answer: The final answer is $2$. I hope it is correct."),
    MMLU: ("Let's think step by step. 2+2 is 4, not (B).", " The answer is (D)."),
}


@pytest.fixture(scope="module", autouse=True)
def minerva_utils():
    """lm-eval's minerva_math/utils.py refuses to import unless antlr4-python3-runtime is 4.11;
    this venv has 4.13 (math-verify's latex2sympy2_extended needs it). Its prompt functions do not
    use antlr, so the module is loaded once with the check satisfied (lm-eval caches it)."""
    from lm_eval.tasks._yaml_loader import _load_module_with_cache

    real = importlib.metadata.version
    fake = lambda name: "4.11.0" if name == "antlr4-python3-runtime" else real(name)  # noqa: E731
    with mock.patch("importlib.metadata.version", fake):
        _load_module_with_cache((LM_EVAL_TASKS / "minerva_math" / "utils.py").resolve())


@pytest.fixture(scope="module")
def std() -> StandardTasks:
    return StandardTasks(FOLDERS)


def _task(cfg: dict[str, Any], doc: dict[str, Any]) -> ConfigurableTask:
    """lm-eval's task for ``cfg`` over a one-document in-memory dataset (no download)."""
    cfg = {k: v for k, v in cfg.items() if k not in ("tag", "group")}
    ds = datasets.Dataset.from_list([doc])
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({"train": ds, "validation": ds, "test": ds})
    return ConfigurableTask(config=cfg)


def _prompt(cfg: dict[str, Any], doc: dict[str, Any]) -> str:
    task = _task(cfg, doc)
    return task.fewshot_context(doc=doc, num_fewshot=task.config.num_fewshot)


def _strip(text: str) -> str:
    for marker in (SOL, PRIOR, EOL):
        text = text.replace(marker, "")
    return text


def _source_prompt(cfg: dict[str, Any], doc: dict[str, Any]) -> str:
    """The source prompt with ``target_delimiter: ""`` (see the module docstring)."""
    cfg = dict(cfg, target_delimiter="")
    cfg["fewshot_config"] = dict(cfg.get("fewshot_config") or {}, target_delimiter="")
    return _prompt(cfg, doc)


@pytest.mark.parametrize("name", [GSM8K, MATH, MMLU])
def test_latent_prompt_differs_only_by_markers(std, name):
    source, latent = std.config(name), std.config(LATENT_STD_PREFIX + name)
    doc = DOCS[name]
    shots = source["num_fewshot"]
    latent_prompt = _prompt(latent, doc)
    assert _strip(latent_prompt) == _source_prompt(source, doc)
    # the source as lm-eval runs it has one target delimiter more per exemplar, nothing else
    full = _prompt(source, doc)
    assert len(full) - len(_strip(latent_prompt)) == shots * len(source.get("target_delimiter", " "))
    # every exemplar and the query open a thought; every exemplar closes it before its answer
    assert latent_prompt.count(SOL + PRIOR) == shots + 1 and latent_prompt.count(EOL) == shots
    assert latent_prompt.count(SOL) == shots + 1 and PRIOR not in latent_prompt.replace(SOL + PRIOR, "")
    query = latent_prompt.rsplit(EOL, 1)[1]
    assert SOL + PRIOR in query and EOL not in query
    if name == MMLU:  # the shared CoT opening goes inside the thought, as in the exemplars
        assert query.endswith(SOL + PRIOR + "Let's think step by step.")
    else:
        assert latent_prompt.endswith(SOL + PRIOR)


def test_exemplar_answers_follow_the_thought(std):
    for name, answer_start in [(GSM8K, "The answer is"), (MATH, "Final Answer:"), (MMLU, "The answer is")]:
        for sample in std.config(LATENT_STD_PREFIX + name)["fewshot_config"]["samples"]:
            thought, _, answer = sample[standard.LATENT_TARGET_KEY].partition(EOL)
            assert answer.lstrip().startswith(answer_start) and answer_start not in thought, (name, sample)


@pytest.mark.parametrize("name", [GSM8K, MATH, MMLU])
def test_latent_grading_reads_the_answer_after_the_thought(std, name):
    latent = std.config(LATENT_STD_PREFIX + name)
    assert SOL in latent["generation_kwargs"]["until"]
    task = _task(latent, DOCS[name])
    thought, answer = GENERATIONS[name]
    task.build_all_requests(limit=1, rank=0, world_size=1)
    scores = {}
    for filt in task._filters:
        inst = task.instances[0]
        inst.resps = [thought + EOL + answer]
        filt.apply([inst])
        scores[filt.name] = task.process_results(DOCS[name], [inst.filtered_resps[filt.name]])
    for filt, metrics in scores.items():
        assert metrics["exact_match"] == 1, (name, filt, scores)
    # the answer sentence alone scores the same; the thought alone never reaches the grader
    assert answer_after_thought_filter([[thought + EOL + answer]], None) == [[answer]]


def test_raw_names_resolve_to_lm_eval_tasks_unchanged(std):
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in (GSM8K, MATH, MMLU):
        for spelling in (name, "std_" + name, "bolt_std_" + name):
            assert std.resolve(spelling) == name
        assert std.config(name) == load_yaml(std.manager.task_index[name].yaml_path, resolve_func=True)
        for spelling in (LATENT_STD_PREFIX + name, "latent_std_" + name, "bolt_latent_" + name):
            assert std.resolve(spelling) == LATENT_STD_PREFIX + name


def test_library_names_and_variants(std):
    assert apply_variant(["std_gsm8k_cot", "gsm8k_cot"], "raw") == ["std_gsm8k_cot", "bolt_gsm8k_cot"]
    assert apply_variant(["std_gsm8k_cot", "bolt_latent_std_minerva_math"], "latent") == [
        "bolt_latent_std_gsm8k_cot",
        "bolt_latent_std_minerva_math",
    ]
    assert apply_variant(["bolt_latent_std_gsm8k_cot"], "raw") == ["std_gsm8k_cot"]
    assert base_name("bolt_latent_std_gsm8k_cot") == "std_gsm8k_cot" and is_latent("bolt_latent_std_gsm8k_cot")
    lib = TaskLibrary(standard=std)
    assert lib.is_shipped("gsm8k_cot") and not lib.is_shipped("std_gsm8k_cot")
    assert lib.leaf_tasks("std_gsm8k_cot") == [GSM8K]  # lm-eval's, not the shipped bolt_gsm8k_cot
    assert lib.leaf_tasks("bolt_latent_std_gsm8k_cot") == [LATENT_STD_PREFIX + GSM8K]
    tag = "mmlu_flan_cot_fewshot_stem"
    assert sorted(lib.leaf_tasks(LATENT_STD_PREFIX + tag)) == sorted(LATENT_STD_PREFIX + t for t in lib.leaf_tasks(tag))
    flat = {"gsm8k_cot/exact_match/strict-match": 0.5, "latent_std_gsm8k_cot/exact_match/strict-match": 0.4}
    assert std_metric_keys(flat, {GSM8K}) == {
        "std_gsm8k_cot/exact_match/strict-match": 0.5,
        "latent_std_gsm8k_cot/exact_match/strict-match": 0.4,
    }


def test_task_manager_knows_derived_names(std):
    """lm-eval's own matching (what ``bolt-lm-eval --tasks`` uses) accepts the derived names."""
    assert std.manager.match_tasks([LATENT_STD_PREFIX + GSM8K, "gsm8k_cot"]) == [LATENT_STD_PREFIX + GSM8K, GSM8K]
    assert LATENT_STD_PREFIX + GSM8K in std.manager.task_index


def test_unsplittable_exemplar_is_a_clear_error(std):
    assert split_exemplar("So 2 + 2 = 4. The answer is 4.", "t", 0) == ("So 2 + 2 = 4.", " ", "The answer is 4.")
    cfg = std.config(GSM8K)
    cfg["fewshot_config"]["samples"] = [*cfg["fewshot_config"]["samples"][:2], {"question": "q", "target": "It is 4."}]
    with pytest.raises(StandardTaskError, match=r"task gsm8k_cot: few-shot exemplar 2 has no answer sentence"):
        derive_latent_config(cfg)
    cfg["fewshot_config"]["samples"][2]["target"] = "The answer is 4."
    with pytest.raises(StandardTaskError, match=r"exemplar 2 has no reasoning"):
        derive_latent_config(cfg)
    with pytest.raises(StandardTaskError, match="no generated reasoning"):
        derive_latent_config({"task": "mc", "output_type": "multiple_choice"})


def test_unknown_name_is_a_clear_error(std):
    from apps.bolt.evaluation.tasks import TaskConfigError

    with pytest.raises(TaskConfigError, match=r"unknown task 'gsm8k_cott' in .*lm-eval's: unknown lm-eval task 'gsm8k_cott'"):
        TaskLibrary(standard=std).build(["gsm8k_cott"])
