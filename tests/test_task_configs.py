"""Every shipped lm-eval task YAML and eval config loads; raw/latent variants agree; local data."""

from pathlib import Path

import pytest

from apps.bolt.eval import EvalArgs
from apps.bolt.evaluation import task_functions as F
from apps.bolt.evaluation.tasks import (
    LATENT_PREFIX,
    TASK_PREFIX,
    TASKS_DIR,
    TaskConfigError,
    TaskLibrary,
    apply_variant,
    base_name,
    is_latent,
    localize,
    variant_for_layout,
)
from apps.bolt.formats import EOL, GSM8K_STYLE, MATH_STYLE, PRIOR, SOL
from lingua.args import load_config

ASSETS = Path(__file__).parent / "assets" / "eval_data"
CONFIGS = Path(__file__).resolve().parents[1] / "apps" / "bolt" / "configs"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The hand-written benchmark samples plus a small set of synthetic eval files."""
    from apps.bolt.synthetic.tasks import write_eval_files

    root = tmp_path_factory.mktemp("eval_data")
    for p in ASSETS.iterdir():
        (root / p.name).symlink_to(p)
    write_eval_files(root / "eval", n_test=6, n_dev=1)
    return root


@pytest.fixture(scope="module")
def lib(data_root):
    return TaskLibrary(data_root=data_root)


def _leaf_names(lib):
    return [n for n in lib.names if not lib.is_group(n)]


def test_every_yaml_is_indexed(lib):
    """Each *.yaml under configs/tasks defines exactly one task or group that lm-eval indexes,
    except the shared ``_*template.yaml`` files that subject tasks include."""
    yamls = sorted(p for p in TASKS_DIR.rglob("*.yaml") if not p.name.startswith("_"))
    templates = sorted(p.name for p in TASKS_DIR.rglob("_*.yaml"))
    assert templates == ["_latent_template.yaml", "_latent_template.yaml", "_template.yaml", "_template.yaml"]
    # gsm8k, math 7+group, mmlu 19+group, synthetic, each raw and latent; the synthetic chain-of-thought prompt (raw only)
    assert len(yamls) == len(lib.names) == 2 * (1 + 8 + 20 + 1) + 1
    assert {"bolt_gsm8k_cot", "bolt_hendrycks_math_cot", "bolt_mmlu_stem_cot", "bolt_synthetic_cot"} <= set(lib.names)
    assert all(n.startswith(TASK_PREFIX) for n in lib.names)  # never shadows an lm-eval task


def test_every_task_builds_from_local_files(lib):
    """Load every task (docs from the local sample files) and build one request with its shots."""
    for name in _leaf_names(lib):
        (task,) = lib.build([name])
        docs = list(task.test_docs())
        assert docs, name
        task.build_all_requests(limit=1)
        prompt = task.instances[0].args[0]
        shots = lib.config(name)["num_fewshot"]
        assert prompt.count(SOL + PRIOR) == (shots + 1 if is_latent(name) else 0), name
        assert task.doc_to_target(docs[0]), name


def test_groups_weight_by_size(lib):
    for group, n in [("hendrycks_math_cot", 7), ("mmlu_stem_cot", 19)]:
        for g in (group, LATENT_PREFIX + group):
            assert len(lib.leaf_tasks(g)) == n
            agg = lib.raw_config(g)["aggregate_metric_list"]
            assert agg[0]["metric"] == "exact_match" and agg[0]["weight_by_size"] is True


RAW_ONLY = {"bolt_synthetic_inline_cot"}
"""Prompts for models trained on text with the reasoning written out: no latent twin."""


def test_raw_and_latent_variants_pair_up(lib):
    names = set(_leaf_names(lib)) - RAW_ONLY
    for name in names:
        twin = apply_variant([name], "raw" if is_latent(name) else "latent")[0]
        assert twin in names, f"{name} has no {twin}"
        if is_latent(name):
            continue
        raw, lat = lib.config(name), lib.config(twin)
        for key in ("dataset_kwargs", "num_fewshot", "test_split", "fewshot_split", "output_type"):
            assert raw.get(key) == lat.get(key), (name, key)
        assert raw["target_delimiter"] == lat["target_delimiter"] == ""
        raw_until, lat_until = raw["generation_kwargs"]["until"], lat["generation_kwargs"]["until"]
        # raw prompts stop at the end of a thought (formats.EvalFormat.stop_strings); latent
        # models may close a thought but not open a new one
        assert EOL in raw_until
        assert SOL in lat_until and EOL not in lat_until
        assert raw["generation_kwargs"]["do_sample"] is False


def test_stop_strings_cover_the_eval_formats(lib):
    from apps.bolt.synthetic.tasks import FORMAT as SYNTHETIC_STYLE

    styles = [("gsm8k_cot", GSM8K_STYLE), ("hendrycks_math_cot_algebra", MATH_STYLE), ("mmlu_stem_cot_anatomy", F.MMLU_STYLE),
              ("synthetic_cot", SYNTHETIC_STYLE)]
    for task, style in styles:
        for latent in (False, True):
            cfg = lib.config(LATENT_PREFIX + task if latent else task)
            assert set(style.stop_strings(latent)) <= set(cfg["generation_kwargs"]["until"]), (task, latent)


def test_gsm8k_prompt_is_the_eval_format(lib):
    """The lm-eval prompt is exactly the formats.py few-shot prompt (exemplar order aside)."""
    from apps.bolt.evaluation.exemplars import GSM8K

    for latent in (False, True):
        name = "latent_gsm8k_cot" if latent else "gsm8k_cot"
        (task,) = lib.build([name])
        task.build_all_requests(limit=1)
        prompt = task.instances[0].args[0]
        delim = lib.config(name)["fewshot_delimiter"]
        blocks = prompt.split(delim)
        doc = next(iter(task.test_docs()))
        assert blocks[-1] == GSM8K_STYLE.query(doc["question"], latent)
        shots = F.latent_gsm8k_fewshot() if latent else F.gsm8k_fewshot()
        assert sorted(blocks[:-1]) == sorted(GSM8K_STYLE.query(s["question"], latent) + s["target"] for s in shots)
        assert len(blocks) == len(GSM8K) + 1
    raw_shot = F.gsm8k_fewshot()[0]["target"]
    lat_shot = F.latent_gsm8k_fewshot()[0]["target"]
    assert raw_shot.startswith(" In total") and raw_shot.endswith("Therefore, the final answer is 25. I hope it is correct.")
    assert lat_shot.endswith(f"Therefore, the answer is 25.{EOL} The final answer is 25. I hope it is correct.")


def test_math_and_mmlu_prompts(lib):
    (task,) = lib.build(["latent_hendrycks_math_cot_algebra"])
    task.build_all_requests(limit=1)
    prompt = task.instances[0].args[0]
    assert prompt.startswith(f"Problem:\nIf $3x - 7 = 11$, what is the value of $x^2$?\n{SOL}{PRIOR}Adding 7")
    assert prompt.endswith(f"Problem:\nSolve for $y$: $2y + 5 = 17$.\n{SOL}{PRIOR}")
    (task,) = lib.build(["mmlu_stem_cot_anatomy"])
    task.build_all_requests(limit=1)
    assert task.instances[0].args[0].endswith(
        "Question: Which organ pumps blood through the body?\n(A) lungs\n(B) heart\n(C) liver\n(D) kidney\nAnswer:"
    )
    assert task.doc_to_target(next(iter(task.test_docs()))) == "(B)"


@pytest.mark.parametrize("variant", ["raw", "latent"])
def test_synthetic_task_matches_the_world(lib, data_root, variant):
    """lm-eval's prompt is the world's own build_prompt; the YAML agrees with meta.json."""
    import json

    from apps.bolt.synthetic.tasks import build_prompt, generate_eval_problems

    name = "latent_synthetic_cot" if variant == "latent" else "synthetic_cot"
    meta = json.loads((data_root / "eval" / "meta.json").read_text())
    cfg = lib.config(name)
    assert cfg["description"] == meta["description"] and cfg["fewshot_delimiter"] == meta["fewshot_delimiter"]
    assert cfg["num_fewshot"] == meta["num_fewshot"] and cfg["fewshot_config"]["sampler"] == meta["fewshot_sampler"]
    assert cfg["generation_kwargs"]["until"] == meta[f"until_{variant}"]
    assert cfg["generation_kwargs"]["max_gen_toks"] == meta["max_gen_toks"]
    (task,) = lib.build([name])
    task.build_all_requests(limit=3)
    items, shots = generate_eval_problems(6, 0, "test"), generate_eval_problems(3, 0, "fewshot")
    assert [i.args[0] for i in task.instances] == [build_prompt(items[i.doc_id], shots, variant) for i in task.instances]


def test_hub_datasets_without_data_root():
    """The cluster path: configs keep naming the hub datasets."""
    hub = TaskLibrary()
    cfg = hub.config("hendrycks_math_cot_precalc")
    assert (cfg["dataset_path"], cfg["dataset_name"]) == ("EleutherAI/hendrycks_math", "precalculus")
    assert "dataset_kwargs" not in cfg


def test_local_files_are_absolute_and_checked(lib, tmp_path):
    cfg = lib.config("gsm8k_cot")
    path = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert cfg["dataset_path"] == "json" and path.is_absolute() and path == (ASSETS / "gsm8k/main/test.jsonl").resolve()
    with pytest.raises(TaskConfigError, match=r"gsm8k_cot: local data file not found: .*gsm8k/main/test.jsonl"):
        TaskLibrary(data_root=tmp_path).config("gsm8k_cot")
    local = {"task": "t", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "gsm8k/main/test.jsonl"}}}
    assert localize(local, ASSETS)["dataset_kwargs"]["data_files"]["test"] == str(path)
    with pytest.raises(TaskConfigError, match="relative; set data_root"):
        localize(local, None)


def test_unknown_task_is_a_clear_error(lib):
    with pytest.raises(TaskConfigError, match="unknown task 'gsm8k_cott'.*similar: bolt_gsm8k_cot"):
        lib.build(["gsm8k_cott"])


def test_unprefixed_names_still_resolve(lib):
    """``gsm8k_cot`` and ``latent_gsm8k_cot`` (the names before the prefix) build the bolt_ tasks."""
    for old, new in [("gsm8k_cot", "bolt_gsm8k_cot"), ("latent_hendrycks_math_cot", "bolt_latent_hendrycks_math_cot")]:
        assert lib.canonical(old) == new
        assert lib.raw_config(old) == lib.raw_config(new)
    (task,) = lib.build(["latent_gsm8k_cot"])
    assert task.config.task == "bolt_latent_gsm8k_cot"
    assert lib.leaf_tasks("hendrycks_math_cot")[0] == "bolt_hendrycks_math_cot_algebra"


@pytest.mark.parametrize("layout,variant", [("random", "latent"), ("prior", "latent"), ("raw", "raw"), ("posterior", "raw"), ("pure", "raw")])
def test_variant_follows_the_training_layout(layout, variant):
    assert variant_for_layout(layout) == variant


def test_variant_names():
    assert apply_variant(["gsm8k_cot", "latent_synthetic_cot"], "latent") == ["bolt_latent_gsm8k_cot", "bolt_latent_synthetic_cot"]
    assert apply_variant(["bolt_latent_gsm8k_cot", "mmlu_stem_cot"], "raw") == ["bolt_gsm8k_cot", "bolt_mmlu_stem_cot"]
    assert [base_name(n) for n in ("bolt_latent_gsm8k_cot", "latent_gsm8k_cot", "bolt_gsm8k_cot")] == ["gsm8k_cot"] * 3
    with pytest.raises(TaskConfigError, match="no training layout"):
        variant_for_layout(None)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("eval_*.yaml")), ids=lambda p: p.name)
def test_eval_configs_load(path):
    cfg = load_config(EvalArgs, path)
    lib = TaskLibrary()
    for name in apply_variant(cfg.task_list(), "latent") + apply_variant(cfg.task_list(), "raw"):
        assert lib.leaf_tasks(name)
