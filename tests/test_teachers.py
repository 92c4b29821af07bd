"""Teacher interface, prompts, cache, and gen_latents with an in-process teacher (no network)."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
from collections import Counter
from pathlib import Path

import pytest

from apps.bolt.chunking import ChunkArgs, chunk_text
from apps.bolt.gen_latents import GenLatentsArgs, run
from apps.bolt.teachers import WHOLE_DOC, LatentRequest, LatentResponse, build_teacher, register_teacher
from apps.bolt.teachers.cache import ResponseCache
from apps.bolt.teachers.prompts import PromptSpec, RequestBuilder, Sampling
from lingua.args import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "apps" / "bolt" / "configs"

# The reference texts (the original BoLT code's configs/gen/ files), copied verbatim: the prompt files must
# reproduce them exactly.
REF_SYSTEM = "You are an advanced AI system, highly knowledgeable and capable of deeply understanding and reasoning through any web document."
REF_USER = (
    "You are provided with a pair of web document prefix and suffix. Your task is to insert latent thoughts between them underlying the creation of the suffix conditioned on the prefix. The latent thoughts should include: the missing background knowledge and the reasoning traces underlying each claim (especially, step-by-step derivations or logical reasoning).\n\n### Prefix:\n{prefix}\n\n### Suffix:\n{suffix}\n\n### Your turn:\nNow provide the latent thoughts. Use concise, simple, and declarative language. Do not give any supporting remarks or references to the terms 'prefix' and 'suffix', as this output will go directly into a computer program. Do not apply any markdown formatting or text embellishments. Optimize the content to ensure every word is informative, avoid vague language like 'xxx is essential'. Emphasize on the suffix without repeating the content in the prefix. Focus on implicit reasoning and background knowledge that is not explicitly stated in the suffix, and use concrete logical reasoning or mathematical derivations when applicable."
)
REF_WRAP = [
    "For the following website, give me a paraphrase of it using a very small vocabulary and extremely simple sentences that a toddler will understand.\n\n## Website\n{text}",
    "For the following website, give me a paraphrase of it using very terse and abstruse language that only an erudite scholar will understand. Replace simple words and phrases with rare and complex ones.\n\n## Website\n{text}",
    "For the following website, give me a diverse paraphrase of it in high quality English language, as in sentences on Wikipedia.\n\n## Website\n{text}",
    "Convert the following website into a conversational format with multiple tags of 'Question:' followed by 'Answer:'.\n\n## Website\n{text}",
]
REF_WRAP_COT = "You are provided with the following document. Give me a diverse paraphrase in high quality English language that preserves all information in the original document. Also, insert detailed reasoning thoughts (especially, step-by-step mathematical derivations or logical reasoning). Do not output '## Paraphrased Document'.\n\n## Document\n{text}"


class EchoTeacher:
    """A deterministic in-process teacher for tests: the latent names its request."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def complete(self, requests):
        return [
            LatentResponse(f"thought {r.doc_id}/{r.chunk_idx}/{r.repeat}: {len(r.prefix)}+{len(r.suffix)}", "stop",
                           {"input_tokens": len(r.suffix) // 4, "output_tokens": 3})
            for r in requests
        ]


register_teacher("echo", EchoTeacher)

TEXTS = [
    "Solve 3x + 7 = 31. So x = 8. The area is 12 square units. Next, a train leaves at 9. It arrives at 11! Why? Speed.",
    "A short one.",
    "",
    "Dr. Smith has 3 apples. He buys 4 more. Now he has 7. " * 6,
    "Line one.\n\nLine two after a blank line. And {braces} stay {prefix} literal.",
]


def write_source(folder: Path, texts=TEXTS, split: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "part.00.jsonl", "w") as f:
        for i, t in enumerate(texts[:split]):
            f.write(json.dumps({"id": f"doc{i}", "text": t, "meta": i}) + "\n")
        f.write("\n")  # blank lines are not documents
    with open(folder / "part.01.jsonl", "w") as f:
        for i, t in enumerate(texts[split:], split):
            f.write(json.dumps({"id": f"doc{i}", "text": t, "meta": i}) + "\n")
    return folder


def gen(tmp_path: Path, name: str, **kw) -> dict:
    cfg = GenLatentsArgs(src=str(kw.pop("src", tmp_path / "src")), out=str(tmp_path / name), backend=kw.pop("backend", "echo"),
                         progress=False, **kw)
    cfg.validate()
    return run(cfg)


def read_out(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_text().splitlines()]


# -- interface and registry -----------------------------------------------------------------------
def test_registry_builds_registered_and_rejects_unknown():
    teacher = build_teacher("echo", method="latent_thoughts")
    out = teacher.complete([LatentRequest("d", 0, "", "x"), LatentRequest("d", 1, "x", "yy", 2)])
    assert [r.latent for r in out] == ["thought d/0/0: 0+1", "thought d/1/2: 1+2"]
    with pytest.raises(KeyError, match="unknown teacher 'nope'.*echo"):
        build_teacher("nope")


# -- prompts --------------------------------------------------------------------------------------
def test_prompt_files_match_the_reference_exactly():
    lt = PromptSpec.for_method("latent_thoughts")
    assert lt.system == REF_SYSTEM and lt.templates == (REF_USER,) and lt.chunked and lt.empty_prefix == "N/A"
    assert (lt.defaults.model, lt.defaults.max_tokens, lt.defaults.temperature, lt.defaults.num_repeats) == ("gpt-4o-mini-2024-07-18", 6000, 0.7, 1)
    wb = PromptSpec.for_method("wrap_baseline")
    assert wb.system is None and list(wb.templates) == REF_WRAP and not wb.chunked
    assert (wb.defaults.max_tokens, wb.defaults.num_repeats) == (5000, 5)
    wc = PromptSpec.for_method("wrap_cot")
    assert wc.templates == (REF_WRAP_COT,) and (wc.defaults.max_tokens, wc.defaults.num_repeats) == (8000, 4)


def test_messages_render_exact_text_and_system_roles():
    spec = PromptSpec.for_method("latent_thoughts")
    req = LatentRequest("d", 0, "", "Cost is {x}. So $5.")
    msgs = spec.messages(req, seed=42, system_role="auto", model="gpt-4o-mini-2024-07-18")
    assert msgs == [{"role": "system", "content": REF_SYSTEM},
                    {"role": "user", "content": REF_USER.replace("{prefix}", "N/A").replace("{suffix}", "Cost is {x}. So $5.")}]
    # Non-GPT models get the system prompt prepended, as in the reference.
    local = spec.messages(LatentRequest("d", 1, "Before.", " After."), seed=42, system_role="auto", model="tiny")
    assert len(local) == 1 and local[0]["content"].startswith(REF_SYSTEM + "\n\n") and "### Prefix:\nBefore.\n\n### Suffix:\n After." in local[0]["content"]
    assert spec.messages(req, seed=42, system_role="system", model="tiny")[0]["role"] == "system"


def test_wrap_template_choice_is_seeded_per_document_and_repeat():
    spec = PromptSpec.for_method("wrap_baseline")
    reqs = [LatentRequest(f"d{i}", WHOLE_DOC, "", f"document number {i}", r) for i in range(300) for r in range(2)]
    picks = [spec.template_index(r, seed=42) for r in reqs]
    assert picks == [spec.template_index(r, seed=42) for r in reqs]  # deterministic
    # independent of the id: the text and repeat decide
    assert spec.template_index(LatentRequest("other", WHOLE_DOC, "", "document number 5", 1), 42) == picks[11]
    counts = Counter(picks)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 100  # ~150 each of 600
    same = sum(picks[2 * i] == picks[2 * i + 1] for i in range(300))
    assert 40 < same < 110  # repeats draw independently (expected 75)
    assert [spec.template_index(r, seed=7) for r in reqs] != picks


def test_cache_key_changes_with_prompt_text_model_sampling_and_repeat(tmp_path):
    spec = PromptSpec.for_method("latent_thoughts")
    req = LatentRequest("d", 0, "", "Two plus two is four.")
    base = RequestBuilder(spec, Sampling("gpt-4o-mini-2024-07-18", 6000, 0.7))
    key = base.key(base.body(req), 0)
    assert key == RequestBuilder(spec, Sampling("gpt-4o-mini-2024-07-18", 6000, 0.7)).key(base.body(req), 0)
    edited = tmp_path / "lt.yaml"
    edited.write_text((CONFIGS / "prompts" / "latent_thoughts.yaml").read_text().replace("concise, simple", "concise and simple"))
    other = RequestBuilder(PromptSpec.load(edited), Sampling("gpt-4o-mini-2024-07-18", 6000, 0.7))
    variants = [
        other.key(other.body(req), 0),
        base.key({**base.body(req), "model": "gpt-4o"}, 0),
        base.key({**base.body(req), "temperature": 1.0}, 0),
        base.key({**base.body(req), "max_tokens": 100}, 0),
        base.key(base.body(req), 1),
    ]
    assert len(set(variants + [key])) == 6


def test_bad_prompt_file_names_file_and_problem(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text((CONFIGS / "prompts" / "wrap_cot.yaml").read_text().replace("{text}", "{txt}"))
    with pytest.raises(ValueError, match=r"p\.yaml: templates\[0\] has placeholders \['txt'\]"):
        PromptSpec.load(bad)


# -- cache ----------------------------------------------------------------------------------------
def _writer(path: str, start: int) -> None:
    cache = ResponseCache(path)
    for i in range(start, start + 50):
        cache.put_many([(f"k{i}", LatentResponse(f"v{i}", "stop", {"output_tokens": i}))])
    cache.close()


def test_cache_stores_successes_only_and_is_safe_across_processes(tmp_path):
    path = str(tmp_path / "c.sqlite")
    cache = ResponseCache(path)
    cache.put_many([("a", LatentResponse("x", "stop", {"input_tokens": 3})), ("b", LatentResponse("", "error", {}, error="boom"))])
    got = cache.get_many(["a", "b"])
    assert set(got) == {"a"} and got["a"].latent == "x" and got["a"].usage == {"input_tokens": 3}
    cache.close()  # no connection crosses the fork
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, s)) for s in (0, 50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    got = ResponseCache(path).get_many([f"k{i}" for i in range(100)])
    assert len(got) == 100 and got["k77"].latent == "v77"


# -- gen_latents with an in-process teacher --------------------------------------------------------
def test_latent_dataset_schema_and_chunking(tmp_path):
    write_source(tmp_path / "src")
    result = gen(tmp_path, "out")
    records = read_out(tmp_path / "out")
    assert [r["id"] for r in records] == [f"doc{i}" for i in range(len(TEXTS))]
    for rec, text in zip(records, TEXTS):
        chunks = chunk_text(text, ChunkArgs())
        assert rec["text"] == text and rec["meta"] == int(rec["id"][3:])  # source fields kept
        assert rec["num_chunks"] == len(chunks) == len(rec["chunks"])
        assert "".join(c["suffix"] for c in rec["chunks"]) == text
        for i, (c, ref) in enumerate(zip(rec["chunks"], chunks)):
            assert c["suffix"] == ref.suffix and "prefix" not in c
            assert c["latent"] == f"thought {rec['id']}/{i}/0: {len(ref.prefix)}+{len(ref.suffix)}"
            assert c["finish_reason"] == "stop"
        assert rec["latent_source"] == {"method": "latent_thoughts", "backend": "echo", "model": "echo", "prompt": None, "repeat": 0}
    assert any(r["num_chunks"] > 1 for r in records) and records[2]["num_chunks"] == 0
    lineage = json.loads((tmp_path / "out" / "lineage.json").read_text())
    assert lineage["counts"]["documents"] == 5 and lineage["counts"]["latents"] == sum(r["num_chunks"] for r in records)
    assert (tmp_path / "out" / "COMPLETE").is_file() and result["status"] == "merged"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == ["part.00.jsonl", "part.01.jsonl"]


def test_shards_then_merge_equal_one_run_and_merge_refuses_missing_shards(tmp_path):
    write_source(tmp_path / "src")
    gen(tmp_path, "single", store_prefix=True)
    with pytest.raises(RuntimeError, match=r"merge refused: 3 of 3 shards incomplete \(0, 1, 2\)"):
        gen(tmp_path, "sharded", store_prefix=True, num_shards=3, merge=True)
    for i in (2, 0):
        assert gen(tmp_path, "sharded", store_prefix=True, num_shards=3, shard=i)["status"] == "shard_done"
    with pytest.raises(RuntimeError, match=r"1 of 3 shards incomplete \(1\)"):
        gen(tmp_path, "sharded", store_prefix=True, num_shards=3, merge=True)
    gen(tmp_path, "sharded", store_prefix=True, num_shards=3, shard=1)
    gen(tmp_path, "sharded", store_prefix=True, num_shards=3, merge=True)
    assert read_out(tmp_path / "sharded") == read_out(tmp_path / "single")
    rec = read_out(tmp_path / "single")[0]
    assert [c["prefix"] for c in rec["chunks"]] == [c.prefix for c in chunk_text(TEXTS[0])]
    # A finished dataset is not redone; other settings in the same folder are refused.
    assert gen(tmp_path, "sharded", store_prefix=True, num_shards=3)["status"] == "complete"
    with pytest.raises(RuntimeError, match="different settings"):
        gen(tmp_path, "sharded", store_prefix=True, num_shards=3, seed=1)


def test_wrap_repeats_first_pass_in_order_later_passes_shuffled(tmp_path):
    texts = [f"Document {i} says {i} + {i} = {2 * i}." for i in range(40)]
    write_source(tmp_path / "src", texts, split=40)
    gen(tmp_path, "wrap", method="wrap_baseline", num_shards=2)
    out = read_out(tmp_path / "wrap")
    assert len(out) == 5 * 40
    passes = [out[40 * r: 40 * (r + 1)] for r in range(5)]
    assert [r["id"] for r in passes[0]] == [f"doc{i}" for i in range(40)]
    for r, p in enumerate(passes):
        assert sorted(x["id"] for x in p) == sorted(f"doc{i}" for i in range(40))
        assert all(x["latent_source"]["repeat"] == r and x["latent"].endswith(f"/-1/{r}: 0+{len(x['text'])}") for x in p)
        assert "chunks" not in p[0] and p[0]["finish_reason"] == "stop"
    assert [x["id"] for x in passes[1]] != [x["id"] for x in passes[0]] != [x["id"] for x in passes[2]]


def test_bad_source_line_is_reported_with_file_and_line(tmp_path):
    src = write_source(tmp_path / "src")
    with open(src / "part.01.jsonl", "a") as f:
        f.write('{"id": "x", "txt": "no text key"}\n')
    with pytest.raises(ValueError, match=r"part\.01\.jsonl:3: no string field 'text'"):
        gen(tmp_path, "out")


def test_shipped_gen_configs_load():
    for path in sorted(CONFIGS.glob("gen_*.yaml")):
        cfg = load_config(GenLatentsArgs, path, ["src=/tmp/a", "out=/tmp/b"])
        assert cfg.method in ("latent_thoughts", "wrap_baseline", "wrap_cot"), path
    cot = load_config(GenLatentsArgs, CONFIGS / "gen_wrap_cot.yaml", ["src=a", "out=b"])
    assert (cot.backend, cot.batch.max_requests_per_batch, cot.prices.output_per_mtok) == ("openai_batch", 20000, 0.30)
    with pytest.raises(ConfigError, match="unknown config key 'chunk.sead'"):
        load_config(GenLatentsArgs, None, ["src=a", "out=b", "chunk.sead=1"])


@pytest.mark.skipif(importlib.util.find_spec("apps.bolt.synthetic.oracle") is None, reason="oracle teacher not there yet")
def test_oracle_builds_the_synthetic_warmstart_latents(tmp_path):
    from apps.bolt.synthetic.corpus import generate_corpus

    docs = list(generate_corpus(30, seed=5))
    src = tmp_path / "src"
    src.mkdir()
    (src / "warmstart.chunk.00.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    gen(tmp_path, "oracle", backend="oracle", src=src, num_shards=2)
    out = read_out(tmp_path / "oracle")
    assert [r["id"] for r in out] == [d["id"] for d in docs]
    for rec, doc in zip(out, docs):
        assert [c["suffix"] for c in rec["chunks"]] == [c.suffix for c in chunk_text(doc["text"])]
        # every statement's derivation lands in exactly one chunk, in text order
        assert " ".join(c["latent"] for c in rec["chunks"] if c["latent"]) == " ".join(p["derivation"] for p in doc["problems"])
    lineage = json.loads((tmp_path / "oracle" / "lineage.json").read_text())
    usage = lineage["teacher_totals"]["usage_totals"]
    assert usage["statements"] == sum(len(d["problems"]) for d in docs) and usage["mismatched_answers"] == 0


def test_cost_estimate_follows_its_token_model():
    from apps.bolt.teachers.api import PriceArgs
    from apps.bolt.teachers.cost import CostArgs, estimate, instruction_tokens

    spec = PromptSpec.for_method("latent_thoughts")
    instr = instruction_tokens(spec, 4.0)
    assert instr == pytest.approx((len(REF_SYSTEM) + len(REF_USER) - len("{prefix}{suffix}") + 1.5) / 4)
    est = estimate(CostArgs(raw_tokens=1e6, tokens_per_chunk=100, prices=PriceArgs(1.0, 2.0)))
    assert est["requests"] == 10_000 and est["input_tokens"] == round(10_000 * (instr + 200))
    assert est["output_tokens"] == 2_300_000
    assert est["batch_cost_usd"] == pytest.approx(est["input_tokens"] / 1e6 + 4.6, abs=0.01)
    wrap = estimate(CostArgs(method="wrap_cot", raw_tokens=1e6, tokens_per_doc=1000, prices=PriceArgs(1.0, 2.0)))
    assert wrap["requests"] == 4000 and wrap["output_tokens"] == round(0.7008 * 4e6)
