"""Finetuning evaluation (apps.bolt.finetune, finetune_data, finetune_eval, finetune_sweep): the
completion-only loss mask, formats and grading, pass@k / maj@k, a real tiny SFT run that beats the
un-finetuned model, and a resumable sweep with its CSV."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from apps.bolt.finetune import FinetuneArgs, main, plan_steps, SFTArgs
from apps.bolt.finetune_data import (
    FORMATS, FinetuneDataArgs, Problem, TaskFormat, choose_format, load_problems, sft_format, sft_records,
)
from apps.bolt.finetune_eval import SampleEvalArgs, default_ks, draw_samples, evaluate, sample_metrics
from apps.bolt.formats import EOL, PRIOR, SOL, SPECIAL_TOKENS
from lingua.args import load_config
from lingua.consolidated import save_consolidated
from lingua.generation import GenerationResult
from lingua.io import write_jsonl
from lingua.sample_store import SampleStore
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets" / "eval_data"
SYNTH_CONFIG = ROOT / "apps" / "bolt" / "configs" / "finetune_synthetic.yaml"
EASY_WORLD = ["data.world.worlds=[shop]", "data.world.min_steps=1", "data.world.max_steps=2", "data.world.ops=+-"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """An un-finetuned 2-layer, 64-wide model saved as a training run's consolidated checkpoint
    whose config says it was trained with the random layout (so format=auto picks thought)."""
    step = tmp_path_factory.mktemp("base") / "run" / "checkpoints" / "0000000001"
    torch.manual_seed(0)
    margs = TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, max_seqlen=256)
    model = build_model(margs, init=True)
    save_consolidated(model, tok, step / "consolidated", extra={"step": 1})
    (step / "config.yaml").write_text("layout:\n  name: random\n")
    return step / "consolidated"


def _synthetic(n_train: int = 6, n_test: int = 4) -> FinetuneDataArgs:
    return load_config(FinetuneDataArgs, None, [f"synthetic_train={n_train}", f"synthetic_test={n_test}"])


# ----------------------------------------------------------------------------- data and formats
def test_completion_only_loss_masks_exactly_the_prompt_tokens(tok, tmp_path):
    from lingua.data import DataArgs, build_data_iterator

    fmt = TaskFormat("synthetic", "thought")
    records = sft_records(load_problems("synthetic", "train", _synthetic()), fmt, "<|bos|>", seed=3)
    write_jsonl(tmp_path / "train" / "sft.jsonl", records)
    stream, flags = [], []
    for r in records:  # what the loss must see: BOS and prompt masked, completion and EOS trained
        prompt, completion = tok.encode(r["prompt"]), tok.encode(r["completion"]) + [tok.eos_id]
        assert prompt[0] == tok.bos_id and prompt[-2:] == [tok.special_ids[SOL], tok.special_ids[PRIOR]]
        stream += prompt + completion
        flags += [False] * len(prompt) + [True] * len(completion)
    seq = len(stream) - 1
    args = DataArgs(root_dir=str(tmp_path), sources={"train": 1.0}, batch_size=1, seq_len=seq, add_bos=False,
                    add_eos=True, format="sft", doc_mask=True, shuffle_buffer=0, prefetch=False)
    with build_data_iterator(args, tok, rank=0, world_size=1, format_fn=sft_format()) as it:
        batch, _ = next(it)
    assert batch["input"][0].tolist() == stream[:-1] and batch["target"][0].tolist() == stream[1:]
    assert batch["loss_mask"][0].tolist() == flags[1:]
    masked = [t for t, m in zip(stream[1:], flags[1:]) if not m]
    assert len(masked) == sum(len(tok.encode(r["prompt"])) for r in records) - 1  # all but the first BOS (never a target)
    assert int(batch["doc_ids"][0].max()) == len(records) - 1


def _gold_problem(task: str) -> Problem:
    args = load_config(FinetuneDataArgs, None, [f"root={ASSETS}", "synthetic_test=3"])
    return load_problems(task, "test", args)[1]


@pytest.mark.parametrize("task", ["synthetic", "gsm8k", "math"])
def test_formats_and_grading(task):
    p = _gold_problem(task)
    for name in FORMATS:
        fmt = TaskFormat(task, name)
        prompt, completion = fmt.prompt(p), fmt.completion(p)
        assert fmt.grade(completion, p), (name, completion)  # the gold completion grades right
        assert not fmt.grade(completion.replace(p.gold, p.gold + "7"), p)
        assert not any(s in completion for s in fmt.stop_strings()), name  # sampling stops after it, not in it
    thought, delim, text = (TaskFormat(task, f) for f in FORMATS)
    assert thought.prompt(p).endswith(SOL + PRIOR) and thought.completion(p) == f"{p.thought}{EOL} {p.answer}"
    assert delim.prompt(p) == thought.prompt(p)[: -len(PRIOR)] and delim.completion(p) == f"{p.thought} {p.answer}"
    assert not any(s in text.prompt(p) + text.completion(p) for s in SPECIAL_TOKENS)
    if task == "synthetic":
        assert not thought.grade(p.thought + " " + p.answer, p)  # a thought never closed gives no answer


def test_data_sources_and_errors(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(ASSETS, root)
    for f in root.rglob("test.jsonl"):
        shutil.copy(f, f.with_name("train.jsonl"))
    args = load_config(FinetuneDataArgs, None, [f"root={root}", "train_limit=5"])
    gsm = load_problems("gsm8k", "test", args)
    assert [p.gold for p in gsm] == ["32", "3", "1335", "-5"] and "<<" not in gsm[0].thought
    assert gsm[0].thought.endswith("Therefore, the answer is 32.")
    math_train = load_problems("math", "train", args)
    assert len(math_train) == 5 and len(load_problems("math", "test", args)) == 10  # all: no test_limit
    assert math_train == load_problems("math", "train", args)
    (root / "gsm8k" / "main" / "train.jsonl").unlink()
    with pytest.raises(Exception, match=r"no local copy .*gsm8k/main/train.jsonl"):
        load_problems("gsm8k", "train", args)
    with pytest.raises(Exception, match=r"not available from the Hugging Face Hub .*data.root=DIR"):
        load_problems("gsm8k", "train", FinetuneDataArgs())  # tests run with the hub offline


def test_synthetic_train_problems_are_disjoint_from_the_evaluation_slice():
    from apps.bolt.synthetic.corpus import parse_question, split_of
    from apps.bolt.synthetic.tasks import generate_eval_problems

    args = _synthetic(300, 100)
    train, test = load_problems("synthetic", "train", args), load_problems("synthetic", "test", args)
    keys = [parse_question(p.question).key for p in train]
    assert len(set(keys)) == 300 and all(split_of(parse_question(p.question), 0.1) == "train" for p in train)
    assert not set(keys) & {parse_question(p.question).key for p in test}
    assert [p.question for p in test] == [e.problem.question for e in generate_eval_problems(100, 0, "test")]
    assert train == load_problems("synthetic", "train", args)  # seeded


def test_format_choice_and_step_plan():
    assert choose_format("auto", "random") == "thought" and choose_format("auto", "prior") == "thought"
    assert choose_format("auto", "raw") == "delimiter" and choose_format("text", "random") == "text"
    with pytest.raises(ValueError, match="records no training layout"):
        choose_format("auto", None)
    # MATH-sized: 7,500 examples of 300 tokens, windows of 2048, 8 per micro-batch, one GPU
    assert plan_steps(SFTArgs(), 7500, 2_250_000, 2048, 1) == {"grad_acc_steps": 1, "steps": 687, "warmup": 35}
    assert plan_steps(SFTArgs(), 7500, 2_250_000, 512, 1) == {"grad_acc_steps": 5, "steps": 549, "warmup": 28}
    assert plan_steps(SFTArgs(grad_acc_steps=2, epochs=1), 10, 1000, 100, 2) == {"grad_acc_steps": 2, "steps": 1, "warmup": 1}


# ------------------------------------------------------------------------------------ metrics
def test_pass_and_majority_at_k_on_fixed_samples():
    keys = [["5", "3", "5", "7"], [None, "2", "4", "4"], ["1", "1", "9", None]]
    gold = ["5", "2", "9"]
    correct = [[k == g for k in ks] for ks, g in zip(keys, gold)]
    m = sample_metrics(correct, keys, lambda a, b: a == b)
    assert m["accuracy"] == pytest.approx(4 / 12) and m["accuracy_se"] == pytest.approx(math.sqrt(2 / 27))
    assert (m["pass@1"], m["pass@2"], m["pass@4"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert (m["maj@1"], m["maj@2"], m["maj@4"]) == pytest.approx((1 / 3, 2 / 3, 1 / 3))
    assert (m["n_problems"], m["samples_per_problem"]) == (3, 4)
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(3) == [1, 2, 3] and default_ks(1) == [1]
    with pytest.raises(ValueError, match="exceeds"):
        sample_metrics(correct, keys, lambda a, b: a == b, ks=[8])
    # MATH votes by math-verify equivalence: 1/2 and 0.5 outvote 3 (and are right)
    fmt = TaskFormat("math", "thought")
    m = sample_metrics([[True, False, True]], [["\\frac{1}{2}", "3", "0.5"]], fmt.same, ks=[3])
    assert m["maj@3"] == 1.0


class Scripted:
    """A generation backend whose samples are a function of (prompt, sample index); counts calls."""

    max_seq_len = 512

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.n, params.sample_offset))
        return [[GenerationResult(self.answer(p, params.sample_offset + j), [], [], [], [], "stop", None, 1)
                 for j in range(params.n)] for p in prompts]


def test_evaluate_grades_samples_and_tops_up_the_store(tmp_path):
    problems = load_problems("gsm8k", "test", load_config(FinetuneDataArgs, None, [f"root={ASSETS}"]))
    fmt = TaskFormat("gsm8k", "thought")
    by_prompt = {fmt.prompt(p): p for p in problems}

    def answer(prompt, j):  # problem i is right on samples 0..i-1, and says 0 otherwise
        i = problems.index(by_prompt[prompt])
        return fmt.completion(by_prompt[prompt]) if j < i else f"No idea.{EOL} The final answer is 0."

    backend = Scripted(answer)
    args = SampleEvalArgs(ks=[1, 4])
    m, rows = evaluate(backend, problems, fmt, args, n=4, seed=0, store_path=tmp_path / "s.sqlite", model_key="m")
    assert m["accuracy"] == pytest.approx((0 + 1 + 2 + 3) / 16)
    assert (m["pass@1"], m["pass@4"], m["maj@1"], m["maj@4"]) == pytest.approx((0.75, 0.75, 0.75, 0.5))
    assert rows[3]["correct"] == [True, True, True, False] and rows[0]["answers"] == ["0"] * 4
    assert backend.calls == [(4, 4, 0)]
    m2, _ = evaluate(backend, problems, fmt, args, n=4, seed=0, store_path=tmp_path / "s.sqlite", model_key="m")
    assert m2 == m and len(backend.calls) == 1  # everything came from the store
    with SampleStore(tmp_path / "s.sqlite") as store:  # a larger n draws only the missing samples
        draw_samples(backend, [fmt.prompt(problems[0])], fmt_params(fmt, 6), store, "m")
    assert backend.calls[-1] == (1, 2, 4)


def fmt_params(fmt, n):
    from apps.bolt.finetune_eval import sampling_params

    return sampling_params(SampleEvalArgs(), fmt, n, seed=0, window=512)


# ---------------------------------------------------------------------------------- the stage
SFT = [f"config={SYNTH_CONFIG}", *EASY_WORLD, "data.synthetic_train=400", "data.synthetic_test=40", "train.batch_size=8",
       "train.optim.lr=3e-3", "train.epochs=8", "train.examples_per_step=16", "train.log_freq=50",
       "eval.max_new_tokens=48", "eval.before=true"]


def test_tiny_sft_raises_sampling_accuracy_and_reruns_nothing(base, tmp_path, capsys):
    out = tmp_path / "ft"
    result = main([f"ckpt={base}", f"out={out}", *SFT])
    before, after = result["before"], result["metrics"]
    with capsys.disabled():  # the measured numbers, for the record (pytest -s)
        print(f"\ntiny SFT: accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}, pass@1 {after['pass@1']:.4f}, "
              f"pass@4 {after['pass@4']:.4f}, maj@4 {after['maj@4']:.4f}, {result['train']['steps']} steps, "
              f"final loss {result['train']['final_loss']:.3f}")
    assert result["format"] == "thought" and result["train"]["examples"] == 400
    assert before["accuracy"] == 0.0 and after["accuracy"] >= 0.08 and after["pass@4"] >= after["pass@1"] > 0
    assert after["n_problems"] == 40 and after["samples_per_problem"] == 4
    assert result["train"]["final_loss"] < 0.5 and (out / "COMPLETE").is_file()
    samples = [json.loads(x) for x in (out / "eval" / "after" / "samples.jsonl").read_text().splitlines()]
    assert sum(sum(s["correct"]) for s in samples) == round(after["accuracy"] * 160)
    assert json.loads((out / "result.json").read_text())["metrics"] == after

    stamp = (out / "train" / "metrics.jsonl").stat().st_mtime_ns
    assert main([f"ckpt={base}", f"out={out}", *SFT, "eval.device=cpu"]) == result  # complete: nothing redone
    assert (out / "train" / "metrics.jsonl").stat().st_mtime_ns == stamp
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([f"ckpt={base}", f"out={out}", *SFT, "eval.n=2"])
    assert e.value.code == 2 and "is complete with other settings" in capsys.readouterr().err


def test_cli_errors_are_one_line(capsys):
    for argv, code, text in ((["task=nope"], 2, "task must be one of"), (["task=math"], 2, "ckpt=... and out=... are required")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == code and text in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------- the sweep
TINY = [*EASY_WORLD, "data.synthetic_train=40", "data.synthetic_test=8", "train.batch_size=8", "train.epochs=1",
        "train.optim.lr=3e-3", "eval.n=2", "eval.max_new_tokens=24"]


def test_sweep_resumes_and_writes_mean_and_se(base, tmp_path):
    from apps.bolt import finetune_sweep

    out = tmp_path / "sweep"
    argv = [f"finetune.config={SYNTH_CONFIG}", f"out={out}", f"trials={{a: {base}, b: {base}}}",
            f"finetune.overrides={json.dumps(TINY)}"]
    finetune_sweep.main([*argv, "seeds=[1]"])
    first = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert sorted(p.parent.name for p in first) == ["a_seed1", "b_seed1"]
    summary = finetune_sweep.main([*argv, "seeds=[1,2]"])
    assert {p: p.stat().st_mtime_ns for p in first} == first  # complete runs were skipped
    runs = {p.parent.name: json.loads(p.read_text()) for p in out.glob("runs/*/result.json")}
    assert sorted(runs) == ["a_seed1", "a_seed2", "b_seed1", "b_seed2"] and runs["a_seed2"]["seed"] == 2
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["row"], r["trial"], r["seed"], r["runs"]) for r in rows] == [
        ("run", "a", "1", "1"), ("run", "a", "2", "1"), ("run", "b", "1", "1"), ("run", "b", "2", "1"),
        ("trial", "a", "", "2"), ("trial", "b", "", "2"), ("all", "", "", "4")]
    accs = [runs[n]["metrics"]["accuracy"] for n in ("a_seed1", "a_seed2", "b_seed1", "b_seed2")]
    mean = sum(accs) / 4
    se = math.sqrt(sum((a - mean) ** 2 for a in accs) / 3 / 4)
    assert float(rows[-1]["accuracy"]) == pytest.approx(mean) and float(rows[-1]["accuracy_se"] or 0) == pytest.approx(se)
    assert float(rows[0]["accuracy_se"]) == pytest.approx(runs["a_seed1"]["metrics"]["accuracy_se"])
    assert {"pass@1", "pass@2", "maj@1", "maj@2", "pass@2_se"} <= set(rows[0]) and summary["rows"][-1]["runs"] == 4
    # the same data and seed give the same run: trial a and b share the checkpoint
    assert runs["a_seed1"]["metrics"]["accuracy"] == runs["b_seed1"]["metrics"]["accuracy"]


def test_sweep_aggregate_exact_numbers_and_failures(tmp_path, monkeypatch):
    from apps.bolt import finetune, finetune_sweep

    values = {("a", 1): 0.2, ("a", 2): 0.4, ("b", 1): 0.6, ("b", 2): 0.9}
    calls = []

    def fake_run(cfg):  # stands in for the (tested above) stage: the sweep's own logic is what runs
        trial = "a" if cfg.ckpt == "A" else "b"
        calls.append((trial, cfg.seed))
        if (trial, cfg.seed) == ("b", 2) and len(calls) < 5:
            raise RuntimeError("out of memory")
        m = {"accuracy": values[trial, cfg.seed], "accuracy_se": 0.01, "n_problems": 10, "pass@1": values[trial, cfg.seed]}
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "result.json").write_text(json.dumps({"metrics": m}))
        (Path(cfg.out) / "COMPLETE").write_text("{}")

    monkeypatch.setattr(finetune, "run", fake_run)
    argv = [f"out={tmp_path}", "trials={a: A, b: B}", "seeds=[1,2]", "finetune.config="]
    with pytest.raises(SystemExit):
        finetune_sweep.main(argv)
    assert len(calls) == 4 and not (tmp_path / "COMPLETE").exists()
    finetune_sweep.main(argv)  # the rerun does only the failed run
    assert calls[4:] == [("b", 2)]
    rows = {(r["row"], r["trial"]): r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert float(rows["trial", "a"]["accuracy"]) == pytest.approx(0.3)
    assert float(rows["trial", "a"]["accuracy_se"]) == pytest.approx(0.1)  # std(0.2, 0.4) / sqrt(2)
    assert float(rows["all", ""]["accuracy"]) == pytest.approx(0.525)
    assert float(rows["all", ""]["accuracy_se"]) == pytest.approx(math.sqrt(0.2675 / 3 / 4))
    assert (tmp_path / "COMPLETE").is_file()


def test_shipped_configs_load():
    from apps.bolt.finetune_sweep import SweepArgs

    for path in sorted((ROOT / "apps" / "bolt" / "configs").glob("finetune_*.yaml")):
        if path.name.startswith("finetune_sweep_"):
            cfg = load_config(SweepArgs, path)
            assert (ROOT / cfg.finetune.config).is_file()
        else:
            cfg = load_config(FinetuneArgs, path, ["ckpt=x", "out=y"])
            assert cfg.train.optim.beta2 == 0.95 and cfg.train.optim.weight_decay == 0.0 and cfg.eval.top_k == 50
    math_cfg = load_config(FinetuneArgs, ROOT / "apps/bolt/configs/finetune_math.yaml")
    assert (math_cfg.eval.n, math_cfg.train.optim.lr, math_cfg.train.epochs, math_cfg.eval.max_new_tokens) == (4, 1e-4, 5, 1600)
    assert load_config(FinetuneArgs, ROOT / "apps/bolt/configs/finetune_gsm8k.yaml").eval.n == 16


def test_bin_script_prints_the_command():
    import subprocess

    out = subprocess.run(["bash", str(ROOT / "bin" / "finetune.sh"), "cat", "--", "config=c.yaml", "ckpt=x", "out=y"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip().endswith("-m apps.bolt.finetune config=c.yaml ckpt=x out=y")
