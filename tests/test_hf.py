"""HF Llama interop against transformers itself: tiny random LlamaForCausalLM built locally (no
download) -> import -> our logits equal theirs; export -> transformers reloads it -> equal again;
added latent tokens keep old rows; the CLIs; the offline download message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lingua.consolidated import load_consolidated, read_extra
from lingua.hf import NEW_ROW_NOISE, export_hf, import_hf, permute_from_hf, permute_to_hf
from lingua.tokenizer import TokenizerArgs, build_tokenizer, train_tokenizer
from setup.convert_hf import latent_tokens
from setup.convert_hf import main as convert_main

transformers = pytest.importorskip("transformers")
LATENT = ["<|START_OF_LATENT|>", "<|END_OF_LATENT|>", "<|PRIOR_PREFIX|>", "<|POSTERIOR_PREFIX|>"]
TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "gqa_untied": dict(kv=2, tie=False, rope={"rope_type": "default", "rope_theta": 10000.0}),
    "mha_tied": dict(kv=4, tie=True, rope={"rope_type": "default", "rope_theta": 10000.0}),
    "gqa_llama3_scaling": dict(
        kv=2,
        tie=False,
        rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    corpus = ["the quick brown fox jumps over the lazy dog 123", "héllo wörld, some more text\n"] * 30
    return Path(train_tokenizer(corpus, tmp_path_factory.mktemp("tok"), "hf", 300).path).parent


def _hf_model(case: str, vocab: int, bos: int, eos: int):
    c = CASES[case]
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=c["kv"], max_position_embeddings=128, rms_norm_eps=1e-5, rope_parameters=c["rope"],
        tie_word_embeddings=c["tie"], bos_token_id=bos, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, hf_tokenizer_dir):
    """case -> (HF folder with safetensors + tokenizer, the transformers model)."""
    tok = build_tokenizer(TokenizerArgs("hf", str(hf_tokenizer_dir)))
    out = {}
    for case in CASES:
        model = _hf_model(case, tok.vocab_size, tok.bos_id, tok.eos_id)
        d = tmp_path_factory.mktemp(case)
        model.save_pretrained(d)
        tok.save(d)
        out[case] = (d, model)
    return out


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def test_permutation_round_trip():
    w = torch.randn(4 * 16, 64)
    assert torch.equal(permute_from_hf(permute_to_hf(w, 4), 4), w)
    assert not torch.equal(permute_to_hf(w, 4), w)


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_logits_match_transformers(hf_folders, case, tmp_path, capsys):
    src, hf_model = hf_folders[case]
    ckpt = import_hf(src, tmp_path / "ckpt")
    model, tok = load_consolidated(ckpt)
    assert model.args.kv_heads == CASES[case]["kv"] and model.args.tie_embeddings == CASES[case]["tie"]
    assert model.args.rope_theta == CASES[case]["rope"]["rope_theta"]
    x = torch.randint(0, tok.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    ref = _logits(hf_model, x)
    ours = _logits(model, x)
    d_import = (ours - ref).abs().max().item()
    assert d_import < TOL

    # The q/k permutation is what makes them agree: without it the logits differ clearly.
    broken = {k: v for k, v in model.state_dict().items()}
    broken["layers.0.attention.wq.weight"] = permute_to_hf(broken["layers.0.attention.wq.weight"], 4)
    model.load_state_dict(broken)
    assert (_logits(model, x) - ref).abs().max().item() > 100 * TOL

    out = export_hf(ckpt, tmp_path / "hf")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "COMPLETE"} <= {
        p.name for p in out.iterdir()
    }
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    d_export = (_logits(reloaded, x) - ref).abs().max().item()
    assert d_export < TOL
    with capsys.disabled():
        print(f"\n[hf parity {case}] ours vs transformers: {d_import:.2e}; exported+reloaded vs original: {d_export:.2e}")


@pytest.mark.parametrize("case", list(CASES))
def test_latent_tokens_round_trip_keeps_old_rows(hf_folders, case, tmp_path):
    src, hf_model = hf_folders[case]
    ckpt = import_hf(src, tmp_path / "ckpt", add_tokens=LATENT, seed=42)
    model, tok = load_consolidated(ckpt)
    v_old = hf_model.config.vocab_size
    assert model.args.vocab_size == tok.vocab_size == v_old + 4
    new_ids = [tok.special_ids[t] for t in LATENT]
    assert new_ids == list(range(v_old, v_old + 4))
    assert read_extra(ckpt)["new_ids"] == new_ids

    sd = model.state_dict()
    hf_emb = hf_model.model.embed_tokens.weight.detach()
    assert torch.equal(sd["tok_embeddings.weight"][:v_old], hf_emb)
    pairs = [("tok_embeddings.weight", hf_emb)]
    if not CASES[case]["tie"]:
        assert torch.equal(sd["output.weight"][:v_old], hf_model.lm_head.weight.detach())
        pairs.append(("output.weight", hf_model.lm_head.weight.detach()))
    for key, old in pairs:
        new = sd[key][v_old:]
        dev = (new - old.mean(0)).std().item()
        assert 0 < dev < 3 * NEW_ROW_NOISE * old.std(0).mean().item()  # mean + small noise
        assert torch.unique(new, dim=0).shape[0] == 4  # still distinguishable

    x = torch.randint(0, v_old, (2, 64), generator=torch.Generator().manual_seed(2))
    assert (_logits(model, x)[..., :v_old] - _logits(hf_model, x)).abs().max().item() < TOL

    # same seed -> same rows; export -> transformers -> import gives the same weights back
    again, _ = load_consolidated(import_hf(src, tmp_path / "ckpt2", add_tokens=LATENT, seed=42))
    assert torch.equal(again.tok_embeddings.weight, model.tok_embeddings.weight)
    out = export_hf(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(hf_tok) == v_old + 4
    text = "fox<|START_OF_LATENT|><|PRIOR_PREFIX|>think<|END_OF_LATENT|> jumps"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.encode(text) == tok.encode(text, add_bos=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x4 = torch.tensor([tok.encode(text, add_bos=True)])
    assert (_logits(reloaded, x4) - _logits(model, x4)).abs().max().item() < TOL
    back, tok_back = load_consolidated(import_hf(out, tmp_path / "back", add_tokens=LATENT))
    assert tok_back.special_ids == tok.special_ids
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_export_is_idempotent_and_reads_bin_weights(hf_folders, tmp_path):
    src, hf_model = hf_folders["gqa_untied"]
    ckpt = import_hf(src, tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "hf")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert export_hf(ckpt, tmp_path / "hf") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # skipped: same source
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["architectures"] == ["LlamaForCausalLM"]

    # a .bin folder (older checkpoints) imports to the same weights
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(hf_model.state_dict(), bin_dir / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bin_dir / f).write_bytes((src / f).read_bytes())
    a, _ = load_consolidated(ckpt)
    b, _ = load_consolidated(import_hf(bin_dir, tmp_path / "ckpt_bin"))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_concurrent_exports_to_one_folder_write_it_once(hf_folders, tmp_path, monkeypatch):
    """The shards of a vLLM E-step start together and export the same checkpoint: one writes,
    the others wait on the lock beside the folder and reuse the complete export."""
    import threading
    import time

    from lingua import hf
    from lingua.io import is_done

    src, _ = hf_folders["gqa_untied"]
    ckpt = import_hf(src, tmp_path / "ckpt")
    writes, real = [], hf._write_export

    def slow_write(*args):
        writes.append(threading.current_thread().name)
        time.sleep(0.3)  # long enough for every other thread to find the lock held
        real(*args)

    monkeypatch.setattr(hf, "_write_export", slow_write)
    monkeypatch.setattr(hf, "EXPORT_POLL_S", 0.05)
    results: dict[str, Path] = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: export_hf(ckpt, tmp_path / "hf", dtype="bfloat16")}),
                                name=f"shard{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 1 and sorted(results) == list(range(4)) and set(results.values()) == {tmp_path / "hf"}
    assert is_done(tmp_path / "hf") and not (tmp_path / "hf.lock").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    export_hf(ckpt, tmp_path / "hf", dtype="float32")  # other options: exported again, under the lock
    assert len(writes) == 2


def test_cli_import_export(hf_folders, tmp_path, capsys):
    src, _ = hf_folders["mha_tied"]
    assert list(latent_tokens()) == LATENT  # the app's strings, in the documented order
    assert convert_main(["import", "--hf-dir", str(src), "--out", str(tmp_path / "c"), "--add-latent-tokens"]) == 0
    _, tok = load_consolidated(tmp_path / "c")
    assert all(t in tok.special_ids for t in LATENT)
    assert convert_main(["export", "--ckpt", str(tmp_path / "c"), "--out", str(tmp_path / "h")]) == 0
    assert (tmp_path / "h" / "COMPLETE").is_file()
    with pytest.raises(SystemExit) as failed:
        convert_main(["import", "--hf-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert failed.value.code == 1
    err = capsys.readouterr().err
    assert "no config.json" in err and str(tmp_path / "nothing") in err


def test_unsupported_configs_are_clear_errors(hf_folders, tmp_path):
    src, _ = hf_folders["gqa_untied"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    for patch, msg in (({"model_type": "mistral"}, "model_type"), ({"attention_bias": True}, "attention_bias"),
                       ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn")):  # fmt: skip
        (bad / "config.json").write_text(json.dumps({**cfg, **patch}))
        with pytest.raises(ValueError, match=msg):
            import_hf(bad, tmp_path / "out")


@pytest.mark.parametrize("offline", [True, False])
def test_download_fails_cleanly_offline(tmp_path, offline):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(ROOT))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: refused at once
    r = subprocess.run(
        [sys.executable, "-m", "setup.download_hf_ckpt", "--out", str(tmp_path / "ckpt")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("download_hf_ckpt: error: cannot download TinyLlama/TinyLlama_v1.1")
    assert not (tmp_path / "ckpt").exists()


def _tokenizers_of_every_kind(d: Path) -> dict:
    import base64

    import sentencepiece as spm

    corpus = ["the quick brown fox jumps over 12 lazy dogs", "héllo wörld 日本語 😀  spaced  out\n"] * 30
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" t", b"ox"]
    (d / "t.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    (d / "c.txt").write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(
        input=str(d / "c.txt"), model_prefix=str(d / "llama"), vocab_size=300, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip  (Llama-style: dummy prefix on)
    llama_hf = d / "llama_hf"
    llama_hf.mkdir()
    (llama_hf / "tokenizer.model").write_bytes((d / "llama.model").read_bytes())
    (llama_hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    transformers.AutoTokenizer.from_pretrained(str(llama_hf)).save_pretrained(str(llama_hf))
    return {
        "bytes": TokenizerArgs("bytes", None, LATENT),
        "sp": train_tokenizer(corpus, d / "sp", "sp", 400, LATENT),
        "hf": train_tokenizer(corpus, d / "hf", "hf", 400, LATENT),
        "tiktoken": TokenizerArgs("tiktoken", str(d / "t.tiktoken"), LATENT),
        "sp_llama": TokenizerArgs("sp", str(d / "llama.model"), LATENT),
        "hf_llama": TokenizerArgs("hf", str(llama_hf / "tokenizer.json"), LATENT),
    }


def test_exported_tokenizers_match_ours(tmp_path):
    """transformers' AutoTokenizer on the exported files gives our ids for every backend, with no
    dummy prefix (training and inference tokenization agree, unlike the reference §2.2)."""
    from lingua.hf import write_hf_tokenizer

    texts = ["the fox", " the fox", "\nthe", "a  b\t\tc  ", "héllo 日本語 😀", "12 dogs<|START_OF_LATENT|>x",
             "<|PRIOR_PREFIX|> leading<|END_OF_LATENT|>"]  # fmt: skip
    for kind, args in _tokenizers_of_every_kind(tmp_path).items():
        ours = build_tokenizer(args)
        out = tmp_path / f"export_{kind}"
        out.mkdir()
        write_hf_tokenizer(ours, out)
        theirs = transformers.AutoTokenizer.from_pretrained(str(out))
        assert len(theirs) == ours.vocab_size, kind
        for s in texts:
            ids = ours.encode(s)
            assert theirs.encode(s, add_special_tokens=False) == ids, (kind, s)
            assert theirs.encode(s) == [ours.bos_id] + ids, (kind, s)
            assert theirs.decode(ids) == s, (kind, s)
        assert theirs.encode("the fox", add_special_tokens=False) != theirs.encode(" the fox", add_special_tokens=False)
