"""Exports outside our engine: a tiny model that learned one latent completion is exported, loaded
back with transformers (AutoTokenizer / AutoModelForCausalLM, default decoding that skips special
tokens, as lm-eval's ``hf`` model and vLLM do), and its completion graded by our latent filters
must equal what our engine gives. The same through lm-eval itself: ``simple_evaluate`` with its
own ``hf`` model (HFLM, which needs ``accelerate``, a test requirement) on the export and with the
``bolt`` model on the consolidated checkpoint, on one latent generate_until task, must give the
same generation and grade. Also: the export's tokens, configs, model card, chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apps.bolt.evaluation import task_functions
from apps.bolt.formats import EOL, PRIOR, SOL, SPECIAL_TOKENS
from lingua.consolidated import save_consolidated
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model

transformers = pytest.importorskip("transformers")

PROMPT = f"Q: 2+3?{SOL}{PRIOR}"
COMPLETION = f"2 + 3 = 5, so the answer is 5.{EOL} The final answer is 5."


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A 2-layer width-64 byte model overfit on PROMPT + COMPLETION (a few seconds on CPU)."""
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    torch.manual_seed(0)
    model = build_model(TransformerArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, multiple_of=16, max_seqlen=256))
    ids = torch.tensor([tok.encode(PROMPT + COMPLETION, add_bos=True) + [tok.eos_id]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    return save_consolidated(model, tok, tmp_path_factory.mktemp("ckpt") / "c"), model, tok


def _grade(text: str) -> dict[str, str]:
    filters = {
        "strict-match": task_functions.strict_number_filter,
        "latent-strict-match": task_functions.latent_strict_number_filter,
        "latent-flexible-extract": task_functions.latent_flexible_number_filter,
    }
    return {name: f([[text]], [{}])[0][0] for name, f in filters.items()}


def test_latent_completion_survives_transformers_round_trip(trained_ckpt, tmp_path):
    from lm_eval.api.instance import Instance

    from apps.bolt.evaluation.harness import BoltLM
    from lingua.generation import Engine
    from lingua.hf import export_hf

    ckpt, model, tok = trained_ckpt
    until = ["Q:", SOL]
    req = Instance("generate_until", {}, (PROMPT, {"until": until, "max_gen_toks": 80, "do_sample": False}), 0)
    ours = BoltLM(Engine(model, tok), max_gen_tokens=100).generate_until([req])[0]
    assert ours.startswith(COMPLETION)

    out = export_hf(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = hf_tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(PROMPT, add_bos=True)
    with torch.no_grad():
        gen = hf_model.generate(ids, max_new_tokens=80, do_sample=False)  # generation_config: greedy
    theirs = hf_tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)  # lm-eval hf / vLLM default
    for s in until:
        theirs = theirs.split(s)[0]
    assert EOL in theirs
    assert theirs == ours
    assert _grade(theirs) == _grade(ours) == {"strict-match": "5", "latent-strict-match": "5", "latent-flexible-extract": "5"}
    # what the old export (latent tokens special) handed the grader: the thought is lost
    assert _grade(theirs.replace(EOL, ""))["latent-strict-match"] == "[invalid]"


def _latent_task(folder: Path, data: Path) -> str:
    """A one-document latent generate_until task (our latent filters, exact match on "5")."""
    data.write_text(json.dumps({"q": PROMPT, "a": "5"}) + "\n")
    folder.mkdir()
    fn = "!function apps.bolt.evaluation.task_functions"
    filters = "".join(
        f"  - name: {name}\n    filter:\n      - function: custom\n        filter_fn: {fn}.{f}\n"
        "      - function: take_first\n"
        for name, f in (("strict-match", "strict_number_filter"), ("latent-strict-match", "latent_strict_number_filter"),
                        ("latent-flexible-extract", "latent_flexible_number_filter"))
    )  # fmt: skip
    (folder / "tiny_hf_latent.yaml").write_text(
        "task: tiny_hf_latent\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "target_delimiter: ''\n"
        f"generation_kwargs:\n  until: {json.dumps(['Q:', SOL])}\n  max_gen_toks: 80\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        f"filter_list:\n{filters}"
    )
    return "tiny_hf_latent"


def test_lm_eval_hf_model_on_the_export_matches_the_bolt_model_on_the_checkpoint(trained_ckpt, tmp_path):
    """lm-eval's own ``hf`` model (HFLM) on the export and ``bolt`` (BoltLM) on the consolidated
    checkpoint, both through ``lm_eval.simple_evaluate`` on the same latent task: the same
    generation (the thought kept: the latent tokens are decoded), the same grades, all 1.0."""
    pytest.importorskip("accelerate")  # HFLM imports it
    import lm_eval
    import lm_eval.models  # noqa: F401  registers hf (lm-eval does only into an empty registry)
    from lm_eval.tasks import TaskManager

    from apps.bolt.evaluation.cli import register_bolt_model
    from lingua.hf import export_hf

    ckpt, _, _ = trained_ckpt
    export = export_hf(ckpt, tmp_path / "hf")
    task = _latent_task(tmp_path / "tasks", tmp_path / "doc.jsonl")
    register_bolt_model()
    runs = {
        "hf": f"pretrained={export},tokenizer={export},dtype=float32,device=cpu,batch_size=1",
        "bolt": f"ckpt={ckpt},max_gen_tokens=100,device=cpu",
    }
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # ours only: fast
    out = {}
    for name, model_args in runs.items():
        res = lm_eval.simple_evaluate(
            model=name, model_args=model_args, tasks=[task], task_manager=tasks,
            log_samples=True, bootstrap_iters=0,
        )  # fmt: skip
        samples = {x["filter"]: (x["resps"], x["filtered_resps"]) for x in res["samples"][task]}  # one per filter
        out[name] = samples, res["results"][task]
    (hf_samples, hf_metrics), (bolt_samples, bolt_metrics) = out["hf"], out["bolt"]
    assert hf_samples == bolt_samples
    filters = ("strict-match", "latent-strict-match", "latent-flexible-extract")
    assert set(hf_samples) == set(filters)
    for f in filters:
        (gen,), graded = hf_samples[f][0][0], hf_samples[f][1]
        assert gen == COMPLETION and EOL in gen  # the thought decoded, cut at "Q:" / EOS
        assert graded == ["5"], f
        assert hf_metrics[f"exact_match,{f}"] == bolt_metrics[f"exact_match,{f}"] == 1.0, f


def test_export_tokens_configs_and_model_card(trained_ckpt, tmp_path):
    from lingua.hf import export_hf

    ckpt, _, tok = trained_ckpt
    out = export_hf(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for t in SPECIAL_TOKENS:
        ids = hf_tok.encode(t, add_special_tokens=False)
        assert ids == [tok.special_ids[t]], t  # one id each
        assert hf_tok.decode(ids, skip_special_tokens=True) == t
    text = f"x{SOL}{PRIOR}think{EOL} y"
    ids = hf_tok.encode(text)
    assert hf_tok.decode(ids, skip_special_tokens=True) == text  # BOS dropped, latents kept
    assert hf_tok.decode(ids) == "".join([tok.decode([tok.bos_id]), text])

    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert config["pad_token_id"] == gen["pad_token_id"] == tok.eos_id  # bytes tokenizer: no PAD
    assert gen["do_sample"] is False and gen["temperature"] == 1.0 and gen["top_p"] == 1.0
    gc = transformers.GenerationConfig.from_pretrained(out)
    assert gc.pad_token_id == tok.eos_id and not gc.do_sample

    card = (out / "README.md").read_text()
    for s in (*SPECIAL_TOKENS, "skip_special_tokens", "AutoModelForCausalLM", "Chat template: none"):
        assert s in card, s
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_chat_template_option(trained_ckpt, tmp_path, capsys):
    from lingua.errors import ExpectedError
    from setup.convert_hf import main as convert_main

    ckpt, _, _ = trained_ckpt
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: ")
    out = tmp_path / "hf"
    assert convert_main(["export", "--ckpt", str(ckpt), "--out", str(out), "--chat_template", str(template)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "2+3?"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False) == "user: 2+3?\nassistant: "
    assert "Chat template: included" in (out / "README.md").read_text()
    # a different template is a different export (not skipped as already complete); none removes it
    assert convert_main(["export", "--ckpt", str(ckpt), "--out", str(out), "--chat_template", "none"]) == 0
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    with pytest.raises((ExpectedError, SystemExit)):
        convert_main(["export", "--ckpt", str(ckpt), "--out", str(out), "--chat_template", str(tmp_path / "missing")])
    assert "no such file" in capsys.readouterr().err


def test_bolt_lm_eval_cli_runs_lm_eval_with_the_bolt_model(trained_ckpt, tmp_path):
    """``python -m apps.bolt.evaluation.cli`` (the ``bolt-lm-eval`` console script) in a fresh
    interpreter: lm-eval's own CLI finds ``--model bolt`` with no import of ours beforehand, scores
    a one-document latent task, and BoltLM shows a progress bar."""
    import subprocess
    import sys

    ckpt, _, _ = trained_ckpt
    data = tmp_path / "doc.jsonl"
    data.write_text(json.dumps({"q": PROMPT, "a": COMPLETION}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(
        "task: tiny_latent\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "target_delimiter: ''\n"
        "generation_kwargs:\n  until: ['Q:']\n  max_gen_toks: 80\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "apps.bolt.evaluation.cli", "--model", "bolt", "--model_args",
           f"ckpt={ckpt},max_gen_tokens=100", "--tasks", "tiny_latent", "--include_path", str(tasks),
           "--output_path", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no model for this name" not in proc.stderr
    assert "bolt generate_until" in proc.stderr  # the tqdm bar
    (results,) = out.rglob("results_*.json")
    assert json.loads(results.read_text())["results"]["tiny_latent"]["exact_match,none"] == 1.0


def test_cli_adds_the_shipped_task_folder():
    from apps.bolt.evaluation.cli import register_bolt_model, with_task_path
    from apps.bolt.evaluation.tasks import TASKS_DIR

    assert with_task_path(["--model", "bolt", "--tasks", "bolt_gsm8k_cot"])[-2:] == ["--include_path", str(TASKS_DIR)]
    assert with_task_path(["ls", "tasks"]) == ["ls", "tasks", "--include_path", str(TASKS_DIR)]
    assert with_task_path(["run", "--include_path", "/x", "--tasks", "t"]) == ["run", "--include_path", "/x", "--tasks", "t"]
    assert with_task_path(["--help"]) == ["--help"]
    register_bolt_model()
    register_bolt_model()  # idempotent
    from lm_eval.api.registry import get_model

    from apps.bolt.evaluation.harness import BoltLM

    assert get_model("bolt") is BoltLM
