"""E-step input handling: shards record their source and refuse a changed one (fault 1: 2 of 14
documents were silently lost), ``limit_docs`` means what it says, and an empty or all-bad source
fails instead of writing COMPLETE with 0 documents (fault 5)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from apps.bolt import estep
from apps.bolt.formats import SPECIAL_TOKENS
from lingua.args import ConfigError, load_config
from lingua.consolidated import save_consolidated
from lingua.io import is_done
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model


def _docs(lo: int, hi: int) -> str:
    return "".join(json.dumps({"id": f"d{i}", "text": f"Doc {i} says {i} plus {i}."}) + "\n" for i in range(lo, hi))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    torch.manual_seed(0)
    model = build_model(TransformerArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, max_seqlen=256))
    return save_consolidated(model, tok, tmp_path_factory.mktemp("estep_source") / "model")


def _cfg(ckpt, src, out, *extra):
    base = [f"ckpt={ckpt}", f"src={src}", f"out={out}", "posterior.num_samples=2", "posterior.max_latent_tokens=4",
            "progress=false", "batch_chunks=32"]
    return load_config(estep.EStepArgs, None, base + list(extra))


def _ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (out / "latents.chunk.00.jsonl").read_text().splitlines() if line]


def test_shards_of_a_changed_source_are_refused_never_merged(ckpt, tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    src.mkdir()
    (src / "raw.jsonl").write_text(_docs(0, 10))
    shard = ("action=shard", "num_shards=2")
    estep.run(_cfg(ckpt, src, out, *shard, "shard=0"))
    with open(src / "raw.jsonl", "a") as f:  # the source grows between the shards
        f.write(_docs(10, 14))
    estep.run(_cfg(ckpt, src, out, *shard, "shard=1"))
    # before: the merge wrote 12 of 14 documents (d5, d6 lost), rc 0
    with pytest.raises(ConfigError, match=r"shard 1 was made from a different version of src=.* than shard 0 "
                                          r"\(raw\.jsonl changed size"):
        estep.run(_cfg(ckpt, src, out, "action=merge", "num_shards=2"))
    assert not is_done(out) and not (out / "latents.chunk.00.jsonl").exists()
    # a finished shard is not skipped over a changed source either
    with pytest.raises(ConfigError, match=r"shard 0 of 2 .* was made from a different version of src=.*raw\.jsonl changed size"):
        estep.run(_cfg(ckpt, src, out, *shard, "shard=0"))


def test_all_shards_agree_but_the_source_changed_before_the_merge(ckpt, tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    src.mkdir()
    (src / "raw.jsonl").write_text(_docs(0, 6))
    for i in range(2):
        estep.run(_cfg(ckpt, src, out, "action=shard", "num_shards=2", f"shard={i}"))
    (src / "raw.jsonl").write_text(_docs(0, 4))  # shrinking used to duplicate ids
    with pytest.raises(ConfigError, match=r"shard 0 was made from a different version .* than the current one \(raw\.jsonl changed size"):
        estep.run(_cfg(ckpt, src, out, "action=merge", "num_shards=2"))
    (src / "raw.jsonl").write_text(_docs(0, 6))  # restored: same size but a new mtime, so redo
    shutil.rmtree(out / "work")
    for i in range(2):
        estep.run(_cfg(ckpt, src, out, "action=shard", "num_shards=2", f"shard={i}"))
    lineage = estep.run(_cfg(ckpt, src, out, "action=merge", "num_shards=2"))
    assert _ids(out) == [f"d{i}" for i in range(6)] and lineage["docs"] == 6
    assert lineage["source"]["files"][0][:2] == ["raw.jsonl", (src / "raw.jsonl").stat().st_size]


def test_limit_docs_zero_means_all_and_negative_is_a_config_error(ckpt, tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "raw.jsonl").write_text(_docs(0, 5))
    with pytest.raises(ConfigError, match="limit_docs must be >= 0"):
        _cfg(ckpt, src, tmp_path / "neg", "limit_docs=-1")
    estep.run(_cfg(ckpt, src, tmp_path / "zero", "limit_docs=0"))  # before: one document
    assert _ids(tmp_path / "zero") == [f"d{i}" for i in range(5)]
    estep.run(_cfg(ckpt, src, tmp_path / "two", "limit_docs=2"))
    assert _ids(tmp_path / "two") == ["d0", "d1"]


@pytest.mark.parametrize("content", ["", "\n\n", "{broken\n" + json.dumps({"txt": "x"}) + "\n" + json.dumps({"text": " "}) + "\n"])
def test_empty_or_all_bad_source_fails_without_writing_complete(ckpt, tmp_path, content):
    src, out = tmp_path / "raw", tmp_path / "out"
    src.mkdir()
    (src / "raw.jsonl").write_text(content)
    with pytest.raises(ConfigError, match="holds no usable documents"):
        estep.run(_cfg(ckpt, src, out))  # before: COMPLETE with 0 documents, rc 0
    assert not is_done(out) and not list((out / "work").glob("*.done.json"))


def test_skipped_lines_are_counted_in_the_lineage(ckpt, tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    src.mkdir()
    (src / "raw.jsonl").write_bytes(_docs(0, 3).encode() + b"{broken\n" + b'{"text": "\xff"}\n' + b'{"id": 1}\n')
    lineage = estep.run(_cfg(ckpt, src, out))
    skipped = lineage["source"]["skipped"]
    assert lineage["docs"] == lineage["source"]["docs"] == 3
    assert skipped["total"] == 3
    assert skipped["reasons"] == {"invalid UTF-8": 1, "malformed JSON": 1, "no string field 'text'": 1}
    assert skipped["examples"][0] == f"{src / 'raw.jsonl'}:4: malformed JSON"
    assert json.loads((out / "lineage.json").read_text())["source"]["skipped"] == skipped
