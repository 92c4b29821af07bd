"""Consolidated folders: exact save/load, relocatable, marker semantics, stable fingerprint."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lingua.consolidated import fingerprint, load_consolidated, read_extra, save_consolidated
from lingua.tokenizer import TokenizerArgs, build_tokenizer, train_tokenizer
from lingua.transformer import TransformerArgs, build_model

LATENT = ["<|START_OF_LATENT|>", "<|END_OF_LATENT|>", "<|PRIOR_PREFIX|>", "<|POSTERIOR_PREFIX|>"]


def _model(vocab: int, tie: bool = False, seed: int = 0):
    args = TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, tie_embeddings=tie, seed=seed)
    return build_model(args)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    tok = build_tokenizer(train_tokenizer(["some text 123 for the tokenizer"] * 20, tmp_path / "t", "sp", 300, LATENT))
    model = _model(tok.vocab_size, tie)
    out = save_consolidated(model, tok, tmp_path / "ckpt", extra={"step": 7})
    names = sorted(p.name for p in out.iterdir())
    assert {"consolidated.pt", "params.json", "tokenizer", "COMPLETE", "extra.json"} <= set(names)
    tok_args = json.loads((out / "tokenizer" / "tokenizer_args.json").read_text())
    assert tok_args == {"name": "sp", "path": "tokenizer.model", "special_tokens": LATENT}
    assert ("output.weight" in torch.load(out / "consolidated.pt")) is not tie

    # relocatable: the tokenizer path is relative to the folder
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(tmp_path / "t")
    model2, tok2 = load_consolidated(moved)
    assert not model2.training
    assert model2.args == model.args
    x = torch.randint(0, tok.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model2(x))
    assert tok2.special_ids == tok.special_ids
    assert tok2.encode("text<|PRIOR_PREFIX|>") == tok.encode("text<|PRIOR_PREFIX|>")
    assert read_extra(moved) == {"step": 7}


def test_fingerprint_is_content_hash_and_cached(tmp_path):
    tok = build_tokenizer(TokenizerArgs("bytes", None, LATENT))
    a = save_consolidated(_model(tok.vocab_size, seed=1), tok, tmp_path / "a")
    b = save_consolidated(_model(tok.vocab_size, seed=1), tok, tmp_path / "b")
    c = save_consolidated(_model(tok.vocab_size, seed=2), tok, tmp_path / "c")
    fa = fingerprint(a)
    assert len(fa) == 64 and fa == fingerprint(b) != fingerprint(c)
    assert json.loads((a / "COMPLETE").read_text())["fingerprint"] == fa

    # The sidecar answers while size+mtime match; a changed file is rehashed.
    sidecar = json.loads((a / ".fingerprint.json").read_text())
    sidecar["sha256"] = "cached-value"
    (a / ".fingerprint.json").write_text(json.dumps(sidecar))
    assert fingerprint(a) == "cached-value"
    for name in ("consolidated.pt", "params.json"):  # params differ too: they hold the seed
        shutil.copyfile(c / name, a / name)
        os.utime(a / name, ns=(1, 1))
    assert fingerprint(a) == fingerprint(c)


def test_missing_and_incomplete_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_consolidated(tmp_path / "absent")
    tok = build_tokenizer(TokenizerArgs("bytes", None, LATENT))
    out = save_consolidated(_model(tok.vocab_size), tok, tmp_path / "ckpt")
    (out / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_consolidated(out)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        fingerprint(out)


def test_failed_resave_leaves_folder_incomplete(tmp_path, monkeypatch):
    tok = build_tokenizer(TokenizerArgs("bytes", None, LATENT))
    out = save_consolidated(_model(tok.vocab_size), tok, tmp_path / "ckpt")

    def boom(_dir):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_consolidated(_model(tok.vocab_size, seed=5), tok, out)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_consolidated(out)


def test_mismatches_are_clear_errors(tmp_path):
    tok = build_tokenizer(TokenizerArgs("bytes", None, LATENT))
    with pytest.raises(ValueError, match="tokenizer has 262 ids"):
        save_consolidated(_model(200), tok, tmp_path / "small")
    out = save_consolidated(_model(tok.vocab_size), tok, tmp_path / "ckpt")
    params = json.loads((out / "params.json").read_text())
    params["dimm"] = 3
    (out / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="dimm"):
        load_consolidated(out)
    params.pop("dimm")
    params["n_layers"] = 3
    (out / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="do not match params.json"):
        load_consolidated(out)
