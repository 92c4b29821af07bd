"""E-step: sampling + joint scoring + resampling on a tiny random model, cache top-up and resume,
shards and merge."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from apps.bolt import estep
from apps.bolt.formats import EOL, POST, PRIOR, SOL, SPECIAL_TOKENS
from apps.bolt.posterior import compute_elbo
from lingua.args import load_config
from lingua.consolidated import save_consolidated
from lingua.generation import Engine
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model

DOCS = [
    "Solving 3x + 7 = 31 gives x = 8. The crate holds 305 pens. It is sunny. We add 2 and 3. Done.",
    "A shop sells 4 pens. Each costs 3 dollars. So 12 dollars in all. That is cheap.",
    "One sentence only.",
    "First. Second one here. Third! Fourth? Fifth. Sixth. Seventh. Eighth. Ninth. Tenth.",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("estep")
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    args = TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, max_seqlen=512)
    torch.manual_seed(0)
    model = build_model(args)
    ckpt = save_consolidated(model, tok, root / "model")
    src = root / "raw"
    src.mkdir()
    (src / "raw.chunk.00.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(DOCS))
        + "{not json\n"  # a bad line: skipped and counted
    )
    return root, ckpt, src


def _cfg(world, out, *extra):
    root, ckpt, src = world
    base = [f"ckpt={ckpt}", f"src={src}", f"out={out}", "posterior.max_latent_tokens=12",
            "posterior.num_samples=4", "progress=false", "chunk.units_per_chunk=2", "batch_chunks=5"]
    return load_config(estep.EStepArgs, None, base + list(extra))


def _records(out):
    return [json.loads(l) for l in (Path(out) / "latents.chunk.00.jsonl").read_text().split("\n") if l]


def _assert_same(recs_a, recs_b, tol=2e-3):
    """Equal up to float noise: batch composition changes reduction order (documented in
    lingua.generation), so log-weights agree to ~1e-4, while samples and choices are identical."""
    assert [r["id"] for r in recs_a] == [r["id"] for r in recs_b]
    for a, b in zip(recs_a, recs_b):
        for ca, cb in zip(a["chunks"], b["chunks"], strict=True):
            assert (ca["suffix"], ca["latent"], ca["selected"]) == (cb["suffix"], cb["latent"], cb["selected"])
            assert ca["log_w"] == pytest.approx(cb["log_w"], abs=tol)


def test_estep_outputs_and_weights_match_full_forward(world, tmp_path):
    out = tmp_path / "out"
    lineage = estep.run(_cfg(world, out))
    recs = _records(out)
    assert [r["id"] for r in recs] == ["d0", "d1", "d2", "d3"]
    for r in recs:
        assert "".join(c["suffix"] for c in r["chunks"]) == r["text"]
        assert r["num_chunks"] == len(r["chunks"]) >= 1
        for c in r["chunks"]:
            assert len(c["log_w"]) == 4 and 0 <= c["selected"] < 4
            assert 1.0 - 1e-6 <= c["ess"] <= 4.0 + 1e-6
            assert c["elbo_1"] == pytest.approx(c["log_w"][0], abs=1e-3)
            lse = max(c["log_w"]) + math.log(sum(math.exp(x - max(c["log_w"])) for x in c["log_w"]))
            assert c["elbo_4"] == pytest.approx(lse - math.log(4), abs=1e-3)
    assert lineage["docs"] == 4 and lineage["num_samples"] == 4 and lineage["selection"] == "sir"
    assert lineage["stats"]["samples_drawn"] == 4 * sum(r["num_chunks"] for r in recs)
    assert lineage["stats"]["cost_ratio_vs_sampling"] > 1.0
    assert (out / "COMPLETE").is_file()

    # Recompute one chunk's log w from scratch with plain forward passes.
    root, ckpt, _ = world
    from lingua.consolidated import load_consolidated

    model, tok = load_consolidated(ckpt)
    r = recs[0]
    c = r["chunks"][1]
    prefix = r["chunks"][0]["suffix"]  # prefix = previous chunks (only one before chunk 1)
    latent = c["latent"]
    prompt = tok.encode(prefix + SOL + EOL + c["suffix"] + SOL + POST, add_bos=True)
    # the sampled ids (random bytes need not be valid UTF-8, so redraw them with the same seed)
    from lingua.sampling import SamplingParams

    # latents never contain the markers, BOS or EOS (posterior.ban_special_tokens, on by default)
    banned = sorted([tok.special_ids[s] for s in (SOL, PRIOR, POST)] + [tok.bos_id, tok.eos_id])
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[tok.special_ids[EOL]], ignore_eos=True, n=4, seed=42,
                            banned_token_ids=banned)
    gen = Engine(model, tok).generate([prompt], params)[0][c["selected"]].token_ids
    joint_ctx = tok.encode(prefix, add_bos=True)
    joint_cont = tok.encode(SOL + PRIOR + latent + EOL + c["suffix"])

    def lp(ctx, cont, banned=()):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = model(ids)[0]
        logits[:, list(banned)] = float("-inf")  # q is renormalized over the allowed tokens
        logits = logits.log_softmax(-1)
        return sum(float(logits[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))

    assert not set(gen) & set(banned)
    assert tok.decode([t for t in gen if t != tok.special_ids[EOL]]) == latent
    expected = lp(joint_ctx, joint_cont) - lp(prompt, gen, banned)
    assert c["log_w"][c["selected"]] == pytest.approx(expected, abs=2e-3)


def test_topup_draws_only_missing_samples_and_keeps_old_ones(world, tmp_path):
    out2, out4 = tmp_path / "k2", tmp_path / "k4"
    cache = tmp_path / "shared.db"
    l2 = estep.run(_cfg(world, out2, "posterior.num_samples=2", "posterior.elbo_samples=[1,2]", f"cache={cache}"))
    l4 = estep.run(_cfg(world, out4, f"cache={cache}"))
    n_chunks = l2["stats"]["chunks"]
    assert l2["stats"]["samples_drawn"] == 2 * n_chunks
    assert l4["stats"]["samples_drawn"] == 2 * n_chunks and l4["stats"]["samples_cached"] == 2 * n_chunks
    for a, b in zip(_records(out2), _records(out4)):
        for ca, cb in zip(a["chunks"], b["chunks"]):
            assert ca["log_w"] == pytest.approx(cb["log_w"][:2], abs=2e-3)
    # and K=4 with a fresh cache gives the same samples (seeded per sample index)
    fresh = tmp_path / "fresh"
    estep.run(_cfg(world, fresh))
    _assert_same(_records(fresh), _records(out4))


def test_shards_merge_equal_single_run_and_refuse_incomplete(world, tmp_path):
    single = tmp_path / "single"
    estep.run(_cfg(world, single))
    sharded = tmp_path / "sharded"
    estep.run(_cfg(world, sharded, "num_shards=3", "shard=0"))
    with pytest.raises(RuntimeError, match="2 of 3 shards incomplete"):
        estep.run(_cfg(world, sharded, "num_shards=3", "action=merge"))
    for i in (1, 2):
        estep.run(_cfg(world, sharded, "num_shards=3", f"shard={i}", "action=shard"))
    lineage = estep.run(_cfg(world, sharded, "num_shards=3", "action=merge"))
    assert lineage["docs"] == 4
    _assert_same(_records(sharded), _records(single))
    # rerunning a finished shard is a no-op that returns its info
    again = estep.run(_cfg(world, sharded, "num_shards=3", "shard=1", "action=shard"))
    assert again["doc_range"] == [1, 2] and again["stats"]["samples_drawn"] == 4 * again["chunks"]


def test_killed_run_resumes_from_cache_without_duplicates(world, tmp_path):
    root, ckpt, src = world
    out = tmp_path / "killed"
    argv = [f"ckpt={ckpt}", f"src={src}", f"out={out}", "posterior.max_latent_tokens=12", "progress=false",
            "chunk.units_per_chunk=2", "batch_chunks=1"]
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from apps.bolt import posterior
        orig = posterior.PosteriorSampler.run
        def slow(self, chunks):
            r = orig(self, chunks)
            print("@@batch", flush=True)
            return r
        posterior.PosteriorSampler.run = slow
        from apps.bolt import estep
        estep.main({argv!r})
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    batches = 0
    t0 = time.time()
    while batches < 3 and time.time() - t0 < 60:
        if p.stdout.readline().startswith("@@batch"):
            batches += 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "COMPLETE").exists()
    lineage = estep.run(load_config(estep.EStepArgs, None, argv))
    assert lineage["stats"]["samples_cached"] >= 3 * 4
    assert lineage["stats"]["samples_cached"] + lineage["stats"]["samples_drawn"] == 4 * lineage["stats"]["chunks"]
    ref = tmp_path / "ref"
    estep.run(load_config(estep.EStepArgs, None, [a.replace(str(out), str(ref)) for a in argv]))
    _assert_same(_records(out), _records(ref))


def test_overflow_rule_truncates_prefix_and_counts(world, tmp_path):
    out = tmp_path / "small"
    lineage = estep.run(_cfg(world, out, "posterior.max_context_tokens=64", "chunk.units_per_chunk=3"))
    assert lineage["stats"]["prefix_truncated"] + lineage["stats"]["suffix_truncated"] > 0
    recs = _records(out)
    assert any("prefix_chars_dropped" in c or "suffix_tokens_cut" in c for r in recs for c in r["chunks"])
    for r in recs:  # records keep the whole text
        assert "".join(c["suffix"] for c in r["chunks"]) == r["text"]


def test_bad_config_and_missing_inputs(world, tmp_path):
    from lingua.args import ConfigError

    with pytest.raises(ConfigError, match="selection must be one of"):
        _cfg(world, tmp_path / "x", "posterior.selection=best")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        _cfg(world, tmp_path / "x", "dtype=int8")
    with pytest.raises(ConfigError, match="shard < num_shards"):
        _cfg(world, tmp_path / "x", "shard=2", "num_shards=2")
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl files"):
        list(estep.list_docs(tmp_path / "empty"))


def test_bfloat16_estep_loads_bf16_weights_and_has_its_own_recipe(world, tmp_path):
    """bf16 weights (the GPU setting) give a different recipe, so bf16 and fp32 shards never mix;
    the output is a complete, consistent E-step (log-probs are taken in float32 from bf16 logits)."""
    fp32, bf16 = _cfg(world, tmp_path / "a"), _cfg(world, tmp_path / "b", "dtype=bfloat16")
    assert estep.recipe_hash(fp32, "m") != estep.recipe_hash(bf16, "m")
    engine, _ = estep._load_backend(bf16)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    estep.run(bf16)
    recs = _records(tmp_path / "b")
    assert [r["id"] for r in recs] == ["d0", "d1", "d2", "d3"]
    for r in recs:
        assert "".join(c["suffix"] for c in r["chunks"]) == r["text"]
        for c in r["chunks"]:
            assert len(c["log_w"]) == 4 and all(math.isfinite(x) for x in c["log_w"])
            assert c["elbo_1"] == pytest.approx(c["log_w"][0], abs=1e-3)


def test_compute_elbo_matches_per_chunk_bounds_and_orders(world):
    root, ckpt, _ = world
    from lingua.consolidated import load_consolidated

    model, tok = load_consolidated(ckpt)
    engine = Engine(model, tok)
    docs = DOCS[:2]
    out = compute_elbo(engine, docs, elbo_samples=[4, 1, 2], seed=3, max_latent_tokens=8)
    chars = sum(map(len, docs))
    assert set(out) == {f"elbo_{n}_{u}" for n in (1, 2, 4) for u in ("per_token", "per_char", "per_doc")}
    # byte tokenizer: one token per character of these ASCII docs
    assert out["elbo_4_per_token"] == pytest.approx(out["elbo_4_per_char"] * chars / chars)
    assert out["elbo_4_per_doc"] == pytest.approx(out["elbo_4_per_char"] * chars / 2)
    assert out["elbo_1_per_token"] < 0
    # the same seed reproduces (the order of num_samples does not matter)
    assert compute_elbo(engine, docs, elbo_samples=[1, 2, 4], seed=3, max_latent_tokens=8) == out


def test_per_token_elbo_counts_only_the_scored_tokens_of_a_cut_suffix(world):
    """A sentence longer than the window is cut for scoring; its per-token ELBO divides by the
    tokens it covers (it was once divided by all of them: -0.2 nats/token instead of about -4)."""
    root, ckpt, _ = world
    from lingua.consolidated import load_consolidated

    model, tok = load_consolidated(ckpt)
    engine = Engine(model, tok)
    short = ["A short line of text that fits. Another one that fits too."]
    long = ["x" * 2000 + "."]  # one sentence, 4x the 512-token window of the byte model
    fits = compute_elbo(engine, short, elbo_samples=[1], seed=0, max_latent_tokens=8)["elbo_1_per_token"]
    cut = compute_elbo(engine, long, elbo_samples=[1], seed=0, max_latent_tokens=8)
    # an untrained byte model: about -log(vocab) nats per scored token either way
    assert fits == pytest.approx(cut["elbo_1_per_token"], rel=0.25)
    assert cut["elbo_1_per_token"] < -3
    # per char divides by all characters, so it is smaller in magnitude than per token here
    assert cut["elbo_1_per_char"] > cut["elbo_1_per_token"] / 3


def test_merge_streams_records_with_unicode_line_separators(tmp_path):
    recs = [{"id": "a", "latent": "x\u2028y\u0085z"}, {"id": "b", "latent": "plain"}]
    parts = []
    for i, r in enumerate(recs):
        p = tmp_path / f"p{i}.jsonl"
        p.write_text(json.dumps(r, ensure_ascii=False) + "\n", encoding="utf-8")
        parts.append(p)
    n = estep._concatenate(parts, tmp_path / "out.jsonl")
    lines = (tmp_path / "out.jsonl").read_bytes().split(b"\n")
    assert n == 2 and [json.loads(x) for x in lines if x] == recs
