"""lm-eval integration (apps/bolt/evaluation): the bolt LM against our engine, limits, GSM8K and
MATH end to end with a scripted backend, checkpoints, results files, in-training hooks."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apps.bolt.eval import EvalArgs, main, run
from apps.bolt.evaluation import in_training as T
from apps.bolt.evaluation.checkpoints import resolve_checkpoint
from apps.bolt.evaluation.harness import BoltLM, ContextOverflow, cut_at_stop
from apps.bolt.evaluation.results import mean_se
from apps.bolt.evaluation.options import HarnessOptions
from apps.bolt.evaluation.runner import evaluate_tasks
from apps.bolt.evaluation.tasks import TaskLibrary
from apps.bolt.formats import EOL, PRIOR, SOL, SPECIAL_TOKENS
from lingua.generation import Engine, GenerationResult
from lingua.sampling import SamplingParams
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model

ASSETS = Path(__file__).parent / "assets" / "eval_data"
ARITH = [{"question": f"{a}+{b}", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (4, 4), (7, 2)]]
MC = [{"question": f"{a}+{b}", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "label": 0} for a, b in [(1, 2), (3, 4), (2, 5), (6, 1)]]

GEN_TASK = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny/arith.jsonl
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:{suffix}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  do_sample: false
  max_gen_toks: 6
filter_list:
  - name: flexible-extract
    filter:
      - function: custom
        filter_fn: !function apps.bolt.evaluation.task_functions.flexible_number_filter
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
MC_TASK = """
task: tiny_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny/mc.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster on a shared, busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))


@pytest.fixture(scope="module")
def model(tok):
    """A 2-layer, 64-wide model trained for a few seconds on "Q: a+b\\nA: c" lines."""
    torch.manual_seed(0)
    m = build_model(TransformerArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seqlen=128, multiple_of=32))
    stream = []
    for a in range(10):
        for b in range(10):
            stream += tok.encode(f"Q: {a}+{b}\nA: {a + b}\n", add_bos=True)
    data = torch.tensor(stream)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        starts = torch.randint(0, len(data) - 33, (16,), generator=gen)
        batch = torch.stack([data[s : s + 33] for s in starts])
        loss = F.cross_entropy(m(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    """A task folder and a data root with two small local tasks (relative data_files)."""
    root = tmp_path_factory.mktemp("tiny")
    tasks, data = root / "tasks", root / "data" / "tiny"
    tasks.mkdir()
    data.mkdir(parents=True)
    (data / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARITH))
    (data / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tasks / "tiny_arith.yaml").write_text(GEN_TASK.format(name="tiny_arith", suffix=""))
    (tasks / "latent_tiny_arith.yaml").write_text(GEN_TASK.format(name="latent_tiny_arith", suffix=SOL + PRIOR))
    (tasks / "tiny_arith_mc.yaml").write_text(MC_TASK)
    return TaskLibrary(tasks, root / "data")


def test_lm_eval_numbers_equal_the_engine(model, tok, tiny_tasks):
    """generate_until and loglikelihood through lm-eval give exactly what the engine gives."""
    engine = Engine(model, tok)
    out = evaluate_tasks(engine, ["tiny_arith", "tiny_arith_mc"], tiny_tasks, HarnessOptions(max_gen_tokens=16))
    res, samples = out.results[0]["results"], out.samples[0]

    prompts = [f"Q: {r['question']}\nA:" for r in ARITH]
    direct = [g[0].text for g in engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6, stop_strings=["\n", "Q:"]))]
    by_doc = {s["doc"]["question"]: s for s in samples["tiny_arith"]}
    assert [by_doc[r["question"]]["resps"][0][0] for r in ARITH] == direct
    acc = np.mean([d.strip() == r["answer"] for d, r in zip(direct, ARITH)])
    assert res["tiny_arith"]["exact_match,flexible-extract"] == pytest.approx(acc)
    assert all(d.strip().isdigit() for d in direct)  # the trained model answers in the format

    pairs = [(f"Q: {r['question']}\nA:", f" {c}") for r in MC for c in r["choices"]]
    scores = engine.score(pairs)
    lm_scores = [resp[0] for s in sorted(samples["tiny_arith_mc"], key=lambda s: s["doc_id"]) for resp in s["resps"]]
    assert [float(x[0]) for x in lm_scores] == pytest.approx([s.sum_logprob for s in scores], abs=1e-6)
    assert [bool(x[1]) for x in lm_scores] == [s.is_greedy for s in scores]
    best = np.array([s.sum_logprob for s in scores]).reshape(len(MC), 3).argmax(1)
    assert res["tiny_arith_mc"]["acc,none"] == pytest.approx(np.mean(best == 0))
    assert out.limits[0]["prompts_truncated"] == 0 and out.limits[0]["loglikelihood_requests"] == len(pairs)


def _req(*args):
    from lm_eval.api.instance import Instance

    return Instance(request_type="x", doc={}, arguments=args, idx=0)


def test_loglikelihood_rolling_scores_every_token_once(model, tok):
    engine = Engine(model, tok)
    text = "Q: 1+2\nA: 3\n" * 5  # 60 tokens
    whole = engine.score([("", text)])[0].sum_logprob
    assert BoltLM(engine, max_gen_tokens=8).loglikelihood_rolling([_req(text)]) == [pytest.approx(whole, abs=1e-4)]

    calls = []

    class Recording:
        tokenizer, max_seq_len = engine.tokenizer, engine.max_seq_len

        def score(self, pairs, max_len=None, add_bos=True):
            calls.append((pairs, max_len, add_bos))
            return engine.score(pairs, max_len=max_len, add_bos=add_bos)

    lm = BoltLM(Recording(), max_gen_tokens=8, context_window=16)
    (total,) = lm.loglikelihood_rolling([_req(text)])
    (pairs, max_len, add_bos), = calls
    assert max_len == 16 and add_bos is False and pairs[0][0] == [tok.bos_id]
    assert [t for _, cont in pairs for t in cont] == tok.encode(text)  # each token predicted once
    assert all(len(c) + len(x) <= 16 for c, x in pairs) and len(pairs) == lm.limits.rolling_windows == 4
    assert total == pytest.approx(sum(r.sum_logprob for r in engine.score(pairs, max_len=16, add_bos=False)))


def test_limits_are_explicit_and_reported(model, tok, caplog):
    engine = Engine(model, tok)
    long_prompt = "Q: 1+2\nA: 3\n" * 12 + "Q: 2+2\nA:"  # 154 tokens > window 128
    lm = BoltLM(engine, max_gen_tokens=8)
    with caplog.at_level("WARNING"):
        (text,) = lm.generate_until([_req(long_prompt, {"until": ["\n"], "max_gen_toks": 32})])
    assert lm.limits.prompts_truncated == 1 and lm.limits.prompt_tokens_dropped == len(tok.encode(long_prompt, add_bos=True)) - 120
    assert lm.limits.gen_toks_capped == 1  # the task asked for 32 new tokens, the cap is 8
    assert "limits bound" in caplog.text and "prompts_truncated=1" in caplog.text
    # the same truncation the engine does when asked directly
    direct = engine.generate([long_prompt], SamplingParams(temperature=0, max_new_tokens=8, stop_strings=["\n"], max_prompt_tokens=120))
    assert text == direct[0][0].text
    with pytest.raises(ContextOverflow, match="exceeds context_window=128"):
        BoltLM(engine, max_gen_tokens=8, overflow="error").generate_until([_req(long_prompt, {"until": ["\n"]})])
    with pytest.raises(ValueError, match="max_gen_tokens"):
        BoltLM(engine, max_gen_tokens=128)


def test_stop_strings_are_cut_even_if_the_backend_keeps_them():
    assert cut_at_stop("12 apples\nQ: next", ["Q:", "\n"]) == "12 apples"
    assert cut_at_stop(f"thought{EOL} answer{SOL}more", [SOL]) == f"thought{EOL} answer"
    assert cut_at_stop("no stop", ["", "Z"]) == "no stop"


# ----------------------------------------------------------------- scripted GSM8K and MATH
class Scripted:
    """A GenerationBackend that answers from a table keyed by the last question of the prompt,
    and keeps stop strings in its text (so the LM's own cutting is exercised)."""

    max_seq_len = 100_000

    def __init__(self, tok, answer):
        self.tokenizer, self.answer, self.prompts = tok, answer, []

    def generate(self, prompts, params):
        self.prompts += prompts
        return [
            [GenerationResult(self.answer(p, params.seed) + "\n\nQuestion: junk", [], [], [], [], "stop", None, len(p), 0)]
            for p in prompts
        ]


GSM8K_SCRIPT = {  # question start -> (seed 0 generation, seed 1 generation)
    "Sam has": ("3*6=18, 14+18=32. The final answer is 32. I hope it is correct.",) * 2,
    "A farmer": ("He fills 10 cartons and 3 are left.",) * 2,  # right number, no "answer is"
    "A bike": ("The final answer is 1,300. I hope it is correct.",) * 2,  # wrong
    "The temperature": ("4 - 9 = -5. The final answer is -5. I hope it is correct.", "The final answer is 5."),
}


def _gsm8k_answer(prompt, seed):
    question = prompt.rsplit("Question: ", 1)[1]
    return next(v[seed] for k, v in GSM8K_SCRIPT.items() if question.startswith(k))


def test_gsm8k_end_to_end_with_known_accuracy(tok, tmp_path):
    backend = Scripted(tok, _gsm8k_answer)
    run_dir = tmp_path / "run"
    cfg = EvalArgs(tasks="gsm8k_cot", variant="raw", data_root=str(ASSETS), out_dir=str(tmp_path / "out"),
                   metrics_file=str(run_dir / "metrics.eval.jsonl"), harness=HarnessOptions(seeds=[0, 1]))
    summary = run(cfg, backend=backend)["summary"]
    strict, flexible = summary["gsm8k_cot/exact_match/strict-match"], summary["gsm8k_cot/exact_match/flexible-extract"]
    assert strict["values"] == [0.5, 0.25] and flexible["values"] == [0.75, 0.5]
    assert strict["mean"] == pytest.approx(0.375) and strict["se"] == pytest.approx(0.125)
    assert len(backend.prompts) == 8 and all(p.count("##Problem\nQuestion: ") == 8 for p in backend.prompts)

    (line,) = [json.loads(x) for x in (run_dir / "metrics.eval.jsonl").read_text().splitlines()]
    assert line["eval/gsm8k_cot/exact_match/flexible-extract"] == pytest.approx(0.625)
    assert line["eval/gsm8k_cot/exact_match/strict-match_se"] == pytest.approx(0.125)
    assert line["variant"] == "raw" and line["n_seeds"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "COMPLETE", "config.yaml", "results_seed0.json", "results_seed1.json", "samples_seed0.jsonl", "samples_seed1.jsonl", "summary.json"]
    assert json.loads((tmp_path / "out" / "results_seed1.json").read_text())["results"]["bolt_gsm8k_cot"]["exact_match,strict-match"] == 0.25

    # rerun: already complete, nothing generated, no duplicate metrics line
    again = Scripted(tok, _gsm8k_answer)
    assert run(cfg, backend=again)["summary"] == summary and again.prompts == []
    assert len((run_dir / "metrics.eval.jsonl").read_text().splitlines()) == 1


MATH_SCRIPT = {  # problem start -> generation; the expected grade is the third element
    "Solve for $y$": "Final Answer: The final answer is $6$. I hope it is correct.",  # right
    "What is the slope": "Final Answer: The final answer is $0.5$. I hope it is correct.",  # right (= 1/2)
    "How many ways": "There are 6 orders. Final Answer: The final answer is $3$. I hope it is correct.",  # wrong
    "A fair coin": "so $\\boxed{0.25}$",  # right
    "What is the area": "Final Answer: The final answer is $49$. I hope it is correct.",  # right
    "Find the sum": "Final Answer: The final answer is $14$. I hope it is correct.",  # wrong
    "What is the remainder": "Final Answer: The final answer is $2$. I hope it is correct.",  # right
    "What is the greatest": "I do not know.",  # wrong
    "What is $15": "Final Answer: The final answer is $12$. I hope it is correct.",  # right
    "What is $\\cos(0)$": "Final Answer: The final answer is $0$. I hope it is correct.",  # wrong
}


def _math_answer(prompt, seed):
    problem = prompt.rsplit("Problem:\n", 1)[1]
    return next(v for k, v in MATH_SCRIPT.items() if problem.startswith(k))


def test_math_end_to_end_grouped_and_weighted(tok, tmp_path):
    backend = Scripted(tok, _math_answer)
    cfg = EvalArgs(tasks="hendrycks_math_cot", variant="raw", data_root=str(ASSETS), out_dir=str(tmp_path / "o"), metrics_file="none")
    s = run(cfg, backend=backend)["summary"]
    per_subject = {k.split("/")[0]: v["mean"] for k, v in s.items() if k != "hendrycks_math_cot/exact_match/none"}
    assert per_subject == {
        "hendrycks_math_cot_algebra": 1.0, "hendrycks_math_cot_counting_and_prob": 0.5, "hendrycks_math_cot_geometry": 1.0,
        "hendrycks_math_cot_intermediate_algebra": 0.0, "hendrycks_math_cot_num_theory": 0.5,
        "hendrycks_math_cot_prealgebra": 1.0, "hendrycks_math_cot_precalc": 0.0,
    }
    # the group weights subjects by size: 6 right of 10 problems, not the mean of subject means
    assert s["hendrycks_math_cot/exact_match/none"]["mean"] == pytest.approx(0.6)
    assert len(backend.prompts) == 10 and all(p.count("Problem:\n") == 5 for p in backend.prompts)


def test_latent_gsm8k_filters(tok, tmp_path):
    def answer(prompt, seed):
        assert prompt.endswith(SOL + PRIOR)
        return f"3 * 6 = 18. Therefore, the answer is 18.{EOL} The final answer is 32. I hope it is correct."

    cfg = EvalArgs(tasks="gsm8k_cot", variant="latent", data_root=str(ASSETS), out_dir=str(tmp_path / "l"),
                   metrics_file="none", harness=HarnessOptions(limit=1, subset="first"))  # "Sam has" (32)
    s = run(cfg, backend=Scripted(tok, answer))["summary"]
    got = {k.split("/")[-1]: v["mean"] for k, v in s.items()}
    assert got == {"strict-match": 0.0, "flexible-extract": 1.0, "latent-strict-match": 0.0, "latent-flexible-extract": 0.0}


@pytest.mark.parametrize("variant", ["raw", "latent"])
def test_synthetic_task_grades_like_the_world(tok, tmp_path, variant):
    from apps.bolt.synthetic.tasks import grade, write_eval_files

    write_eval_files(tmp_path / "eval", n_test=6, n_dev=1)
    docs = [json.loads(x) for x in (tmp_path / "eval" / "test.jsonl").read_text().splitlines()]

    def generation(doc):  # right answers for even ids; odd ones never reach an answer
        target = doc[f"target_{variant}"]
        good = int(doc["id"][-1]) % 2 == 0
        return target if good else target.split(EOL)[0] if variant == "latent" else " I am not sure."

    def answer(prompt, seed):
        (doc,) = [d for d in docs if prompt.endswith(d[f"query_{variant}"])]
        return generation(doc)

    cfg = EvalArgs(tasks="synthetic_cot", variant=variant, data_root=str(tmp_path), out_dir=str(tmp_path / "o"), metrics_file="none")
    (value,) = [v["mean"] for v in run(cfg, backend=Scripted(tok, answer))["summary"].values()]
    expected = np.mean([grade(generation(d), d["answer"], variant) for d in docs])
    assert value == pytest.approx(expected) == pytest.approx(0.5)


# ----------------------------------------------------------------- checkpoints and the CLI
def _fake_run(tmp_path, model, tok, layout):
    """RUN/checkpoints/0000000007/ as the trainer writes it (DCP shards, train state, config)."""
    import torch.distributed.checkpoint as dcp
    from lingua.args import to_dict
    from lingua.io import mark_done

    run_dir = tmp_path / "run"
    step = run_dir / "checkpoints" / "0000000007"
    step.mkdir(parents=True)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step), no_dist=True)
    (step / "train_state.json").write_text(json.dumps({"step": 7}))
    (step / "params.json").write_text(json.dumps(to_dict(model.args)))
    (step / "config.yaml").write_text(f"data:\n  format: {layout}\n")
    tok.save(run_dir / "tokenizer")
    (run_dir / "tokenizer" / "tokenizer_args.json").write_text(json.dumps(to_dict(TokenizerArgs("bytes", None, list(SPECIAL_TOKENS)))))
    mark_done(step)
    return run_dir, step


def test_cli_on_a_training_checkpoint(model, tok, tiny_tasks, tmp_path, capsys):
    run_dir, step = _fake_run(tmp_path, model, tok, "random")
    ref = resolve_checkpoint(run_dir)  # a run folder means its newest checkpoint
    assert (ref.step, ref.layout, ref.run_dir) == (7, "random", run_dir.resolve())
    assert ref.consolidated == (step / "consolidated").resolve() and (ref.consolidated / "COMPLETE").is_file()

    main([f"ckpt={step}", "tasks=tiny_arith", f"include_path={tiny_tasks.include_path}",
          f"data_root={tiny_tasks.data_root}", "harness.max_gen_tokens=16"])
    out = capsys.readouterr().out
    assert "latent_tiny_arith | exact_match | flexible-extract" in out  # random layout -> latent variant
    (line,) = [json.loads(x) for x in (run_dir / "metrics.eval.jsonl").read_text().splitlines()]
    assert line["step"] == 7 and line["variant"] == "latent" and "eval/tiny_arith/exact_match/flexible-extract" in line
    summary = json.loads(next((ref.consolidated / "eval").glob("*/summary.json")).read_text())
    assert summary["layout"] == "random" and summary["checkpoint"] == str(ref.consolidated)

    lm = BoltLM.create_from_arg_string(f"ckpt={ref.consolidated},max_gen_tokens=8")
    assert lm.context_window == 128 and lm.max_gen_tokens == 8


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a consolidated folder"):
        resolve_checkpoint(tmp_path)


def test_mean_se():
    assert mean_se([1.0]) == (1.0, None)
    m, se = mean_se([0.2, 0.4, 0.9])
    assert m == pytest.approx(0.5) and se == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1) / math.sqrt(3))


# ----------------------------------------------------------------- in-training hooks
DOCS = ["Q: 1+2\nA: 3\n", "Q: 4+4\nA: 8\nQ: 2+5\nA: 7\n", "x" * 300]


def test_validation_nll_is_positive_and_exact(model, tok):
    hook = T.ValidationNLL(DOCS, tok, source="val")
    got = hook(model, 5, Path("."))
    nll, tokens, chars = 0.0, 0, 0
    for text in DOCS:
        ids = tok.encode(text)[:127]
        seq = torch.tensor([[tok.bos_id] + ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq)[0, :-1].float(), -1)
        nll -= lp.gather(1, seq[0, 1:, None]).sum().item()
        tokens += len(ids)
        chars += len(tok.decode(ids))
    assert got["val/val/nll_per_token"] > 0
    assert got["val/val/nll_per_token"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["val/val/nll_per_char"] == pytest.approx(nll / chars, rel=1e-5)
    assert got["val/val/docs_truncated"] == 1 and got["val/val/tokens"] == tokens


def test_elbo_hook_schedules_and_names_the_posterior_elbo(model, tok):
    calls = []

    def fake_compute_elbo(backend, docs, *, elbo_samples, seed):
        calls.append((type(backend).__name__, list(docs), elbo_samples, seed))
        return {f"elbo_{n}_per_token": -1.0 / n for n in elbo_samples}

    hook = T.ValidationELBO(DOCS[:2], tok, elbo_samples=(4, 1, 2), every=10, final_step=25, compute_elbo=fake_compute_elbo)
    assert hook(model, 5, Path(".")) == {}  # not due
    assert hook(model, 20, Path(".")) == {"val/heldout/elbo_1_per_token": -1.0, "val/heldout/elbo_2_per_token": -0.5, "val/heldout/elbo_4_per_token": -0.25}
    assert hook(model, 25, Path("."))  # the final step
    assert calls[0] == ("Engine", DOCS[:2], [1, 2, 4], 0) and len(calls) == 2
    with pytest.raises(ValueError, match="elbo_samples"):
        T.ValidationELBO(DOCS, tok, elbo_samples=(0, 2))


def test_elbo_hook_with_the_posterior_elbo(model, tok):
    got = T.ValidationELBO(DOCS[:2], tok, elbo_samples=(1, 2))(model, 1, Path("."))
    assert set(got) >= {"val/heldout/elbo_1_per_token", "val/heldout/elbo_2_per_token", "val/heldout/elbo_2_per_char"}
    assert all(math.isfinite(v) and v < 0 for v in got.values())


def test_build_eval_hooks_and_task_hook(model, tok, tiny_tasks, tmp_path, monkeypatch, caplog):
    docs = tmp_path / "val.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS) + json.dumps({"text": ""}) + "\n")
    args = T.InTrainingEvalArgs(val_docs=str(docs), elbo="off", tasks="tiny_arith", data_root=str(tiny_tasks.data_root),
                                harness=HarnessOptions(max_gen_tokens=16))
    monkeypatch.setattr("apps.bolt.evaluation.tasks.TASKS_DIR", tiny_tasks.include_path)
    with caplog.at_level("WARNING"):
        hooks = T.build_eval_hooks(args, tok, layout="random")
    assert [type(h).__name__ for h in hooks] == ["ValidationNLL", "TaskEvalHook"]
    assert "skipped 1 bad line(s)" in caplog.text and "val.jsonl:4: blank text" in caplog.text
    assert [type(h).__name__ for h in T.build_eval_hooks(T.InTrainingEvalArgs(val_docs=str(docs)), tok, layout="random")] == ["ValidationNLL", "ValidationELBO"]
    assert [type(h).__name__ for h in T.build_eval_hooks(T.InTrainingEvalArgs(val_docs=str(docs)), tok, layout="raw")] == ["ValidationNLL"]
    assert [type(h).__name__ for h in T.build_eval_hooks(T.InTrainingEvalArgs(val_docs=str(docs), elbo="on"), tok, layout="raw")] == ["ValidationNLL", "ValidationELBO"]

    got = hooks[1](model, 3, tmp_path)
    assert set(got) == {"eval/tiny_arith/exact_match/flexible-extract"}
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.eval.jsonl").read_text().splitlines()]
    assert line["step"] == 3 and line["variant"] == "latent" and line["eval/tiny_arith/exact_match/flexible-extract"] == got["eval/tiny_arith/exact_match/flexible-extract"]
    assert (tmp_path / "evals" / "0000000003" / "tiny_arith-intrain" / "COMPLETE").is_file()


def test_launch_hook_prints_one_eval_job_per_checkpoint(model, tok, tmp_path, capsys):
    from lingua.launch import LaunchArgs

    run_dir, step = _fake_run(tmp_path, model, tok, "raw")
    hook = T.LaunchEvalHook(LaunchArgs(mode="cat", module="apps.bolt.eval"), ["config=apps/bolt/configs/eval_benchmarks.yaml"])
    assert hook(model, 7, run_dir) == {"eval/jobs_launched": 1.0}
    printed = capsys.readouterr().out.strip()
    assert printed.endswith(f"-m apps.bolt.eval config=apps/bolt/configs/eval_benchmarks.yaml ckpt={step}")
    assert hook(model, 8, run_dir) == {}  # no checkpoint saved at step 8
