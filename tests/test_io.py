"""lingua.io: the one atomic writer (umask-respecting modes, nothing left behind on failure), the
one reader of JSONL documents, and the listing that fingerprints input files."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from lingua import io


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# ------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("mask, want_file, want_dir", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_atomic_writers_take_their_mode_from_the_umask(tmp_path, umask, mask, want_file, want_dir):
    umask(mask)
    assert io.current_umask() == mask
    io.atomic_write_bytes(tmp_path / "a.bin", b"x")
    io.atomic_write_json(tmp_path / "sub" / "b.json", {"k": 1})
    with io.atomic_open(tmp_path / "c.txt", "w", encoding="utf-8") as f:
        f.write("hello")
    with io.atomic_path(tmp_path / "d.pt") as tmp:
        torch.save({"w": torch.zeros(2)}, tmp)
    with io.atomic_dir(tmp_path / "folder") as d:
        io.atomic_write_text(d / "e.txt", "e")
    for name in ("a.bin", "sub/b.json", "c.txt", "d.pt", "folder/e.txt"):
        assert mode(tmp_path / name) == want_file, name
    assert mode(tmp_path / "folder") == want_dir
    assert (tmp_path / "c.txt").read_text() == "hello" and torch.load(tmp_path / "d.pt")["w"].shape == (2,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.txt", "d.pt", "folder", "sub"]  # no temp files


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "t.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), io.atomic_open(target, "w") as f:
        f.write("half a new file")
        raise RuntimeError("disk full")
    with pytest.raises(KeyboardInterrupt), io.atomic_path(target) as tmp:
        tmp.write_text("new")
        raise KeyboardInterrupt
    with pytest.raises(RuntimeError), io.atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("x")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]
    with pytest.raises(ValueError, match="mode must start with 'w'"), io.atomic_open(target, "a"):
        pass


def test_atomic_dir_existing_target_and_fixed_temp_name(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with pytest.raises(FileExistsError, match="already exists"), io.atomic_dir(final) as d:
        (d / "x").write_text("x")
    with io.atomic_dir(final, clear=lambda f: False) as d:  # keep the existing one (a concurrent winner)
        (d / "x").write_text("x")
    assert list(final.iterdir()) == []
    stale = tmp_path / ".out.building"
    stale.mkdir()
    (stale / "leftover").write_text("from a killed run")
    with io.atomic_dir(final, tmp=stale, clear=lambda f: (f.rmdir(), True)[1]) as d:
        assert d == stale and list(d.iterdir()) == []
        (d / "x").write_text("x")
    assert [p.name for p in final.iterdir()] == ["x"] and not stale.exists()


def test_published_artefacts_are_readable_by_the_group_under_umask_002(tmp_path, umask):
    """Fault 9: model.safetensors, consolidated.pt, merged teacher data and the tokenizer cache
    were written 0600/0700 (0644 at best) whatever the umask."""
    from apps.bolt.formats import SPECIAL_TOKENS
    from apps.bolt.synthetic.tokenizer import get_synthetic_tokenizer
    from apps.bolt.teachers.shards import merge_shards, write_shard_records
    from lingua.consolidated import save_consolidated
    from lingua.hf import export_hf
    from lingua.tokenizer import TokenizerArgs, build_tokenizer
    from lingua.transformer import TransformerArgs, build_model

    umask(0o002)
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    model = build_model(TransformerArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, max_seqlen=64))
    ckpt = save_consolidated(model, tok, tmp_path / "model")
    hf = export_hf(ckpt, tmp_path / "hf")
    shard = tmp_path / "teacher" / "_work" / "shard_0"
    shard.mkdir(parents=True)
    write_shard_records(shard, [(0, 0, {"text": "a", "latent": "b"})], 1)
    merge_shards([shard], ["src.jsonl"], tmp_path / "teacher", 1, 0)
    tok_args = get_synthetic_tokenizer(tmp_path / "tokcache", num_docs=40, vocab_size=400)
    tok_dir = Path(tok_args.path).parent
    for f in (ckpt / "consolidated.pt", hf / "model.safetensors", shard / "records_r00.jsonl",
              tmp_path / "teacher" / "src.jsonl", Path(tok_args.path), tok_dir / "tokenizer_args.json"):
        assert mode(f) == 0o664, f
    assert mode(tok_dir) == 0o775


# ------------------------------------------------------------------------------------ reading


def _write(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    _write(folder / "b.jsonl", [b'{"text": "b1"}', b"{not json", b'{"text": "b3"}'])
    _write(folder / "a.jsonl", [b'{"text": "a1"}', b"", b'{"id": 7}', b'["list"]', b'{"text": "caf\xe9"}',
                                b'{"text": "  "}', b'{"text": "a7"}'])
    return folder


def test_read_docs_order_skips_counted_and_logged(src, caplog):
    skipped = io.Skipped()
    docs = list(io.read_docs(src, skipped=skipped, nonblank=True))
    assert [d.record["text"] for d in docs] == ["a1", "a7", "b1", "b3"]  # sorted files, then lines
    assert [(d.path.name, d.line) for d in docs] == [("a.jsonl", 1), ("a.jsonl", 7), ("b.jsonl", 1), ("b.jsonl", 3)]
    assert skipped.as_dict()["reasons"] == {"blank text": 1, "invalid UTF-8": 1, "malformed JSON": 1,
                                            "no string field 'text'": 1, "not a JSON object": 1}
    assert f"{src / 'a.jsonl'}:3: no string field 'text'" in caplog.text
    assert "skipped 5 bad line(s)" in caplog.text
    # blank text is a document unless nonblank; a single file is a source too
    assert [d.record["text"] for d in io.read_docs(src / "a.jsonl")] == ["a1", "  ", "a7"]


def test_read_docs_limit_start_stop_and_strict(src):
    texts = lambda **kw: [d.record["text"] for d in io.read_docs(src, nonblank=True, **kw)]  # noqa: E731
    assert texts(limit=2) == ["a1", "a7"]
    assert texts(limit=0) == texts() == texts(limit=None)  # 0 means all, never "one document"
    with pytest.raises(ValueError, match="limit must be >= 0"):
        texts(limit=-1)
    # start/stop count non-blank lines, good or bad, so shard bounds do not depend on content
    assert texts(start=5, stop=8) == ["a7", "b1"]
    with pytest.raises(io.BadRecord, match=r"a\.jsonl:3: no string field 'text'"):
        list(io.read_docs(src, strict=True))
    assert [d.record["text"] for d in io.read_docs(src, strict=True, start=8)] == ["b3"]
    with pytest.raises(io.BadRecord, match=r"b\.jsonl:2: malformed JSON"):
        list(io.read_docs(src, strict=True, start=7))
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl files"):
        list(io.read_docs(src / "missing"))


def test_file_listing_and_changes(src):
    before = io.file_listing(sorted(src.glob("*.jsonl")), src)
    size = (src / "b.jsonl").stat().st_size
    assert [e[:2] for e in before] == [["a.jsonl", (src / "a.jsonl").stat().st_size], ["b.jsonl", (src / "b.jsonl").stat().st_size]]
    assert io.file_listing([src / "a.jsonl"], src, mtime=False) == [before[0][:2]]
    with open(src / "b.jsonl", "ab") as f:
        f.write(b'{"text": "b4"}\n')
    _write(src / "c.jsonl", [b'{"text": "c"}'])
    (src / "a.jsonl").unlink()
    after = io.file_listing(sorted(src.glob("*.jsonl")), src)
    assert io.listing_changes(before, after) == [
        "a.jsonl removed", f"b.jsonl changed size ({size} -> {size + 15} bytes)", "c.jsonl added"]
    os.utime(src / "c.jsonl", ns=(1, 1))
    assert io.listing_changes(after, io.file_listing(sorted(src.glob("*.jsonl")), src)) == [
        "c.jsonl modified (same size, new modification time)"]
