"""Data pipeline: exact resume, rank shares, epochs, mixing, bad input, packing, loss spans."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lingua.args import ConfigError, from_dict
from lingua.data import (
    BadRecord,
    DataArgs,
    DataError,
    DataStateMismatch,
    build_data_iterator,
    data_metrics,
    get_format,
    register_format,
    registered_formats,
    steps_for_token_budget,
)
from lingua.data.mixing import SourceMixer
from lingua.data.readers import LOG_IN_FULL, ShardReader, list_shards
from lingua.data.rng import make_rng, rng_from_state, rng_state
from lingua.tokenizer import ByteTokenizer

TOK = ByteTokenizer()  # bytes are ids 0-255, BOS 256, EOS 257
BOS, EOS = TOK.bos_id, TOK.eos_id
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def doc_text(source: str, i: int) -> str:
    """Distinct documents of varied length; every 7th is long enough to span several windows."""
    n = 20 if i % 7 == 3 else 1 + (i * 5) % 9
    return f"{source}{i:03d}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def write_source(root: Path, name: str, n_docs: int, shards: int = 2) -> list[dict]:
    """``n_docs`` records split into ``shards`` consecutive files; returns them in file order."""
    records = [{"id": f"{name}{i:03d}", "text": doc_text(name, i)} for i in range(n_docs)]
    folder = root / name
    folder.mkdir(parents=True)
    per = -(-n_docs // shards)
    for s in range(shards):
        with open(folder / f"part-{s:02d}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records[s * per : (s + 1) * per])
    return records


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_source(tmp_path, "web", 24)
    write_source(tmp_path, "math", 14, shards=3)
    return tmp_path


def make_args(root: Path, **kw) -> DataArgs:
    base = dict(
        root_dir=str(root), sources={"web": 0.6, "math": 0.4}, batch_size=3, seq_len=16, seed=7,
        shuffle_buffer=2, prefetch=False,
    )  # fmt: skip
    base.update(kw)
    return DataArgs(**base)


def take(it, n: int) -> list[tuple[dict, dict]]:
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[tuple[dict, dict]], b: list[tuple[dict, dict]]) -> None:
    assert len(a) == len(b)
    for i, ((ba, sa), (bb, sb)) in enumerate(zip(a, b)):
        assert ba.keys() == bb.keys(), i
        for key in ba:
            if isinstance(ba[key], torch.Tensor):
                assert ba[key].dtype == bb[key].dtype and torch.equal(ba[key], bb[key]), (i, key)
            else:
                assert ba[key] == bb[key], (i, key)
        assert sa == sb, i


def noisy_format(record: dict, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """Uses the formatter RNG for both content and loss spans, so resume must restore it."""
    return [(record["text"], True), (f" #{rng.integers(1000)}", bool(rng.random() < 0.5))]


def reader_epoch(state: dict, source: str) -> int:
    return state["position"]["packer"]["docs"]["sources"][source]["epoch"]


# ----------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_resume_is_exact(corpus: Path, world: int, rank: int, prefetch: bool) -> None:
    """N batches, JSON round trip of the state, rebuild, the next M batches are identical; at
    a shuffle-block boundary (N even), inside a block (N odd), and after epoch boundaries."""
    args = make_args(corpus, prefetch=prefetch, doc_mask=True)
    with build_data_iterator(args, TOK, rank=rank, world_size=world, format_fn=noisy_format) as it:
        run = take(it, 120)
    # the run crosses epochs of both sources, including reshuffled (permuted) epochs
    assert reader_epoch(run[-1][1], "web") >= 2 and reader_epoch(run[-1][1], "math") >= 2
    for n in (4, 5, 37, 80):
        saved = json.loads(json.dumps(run[n - 1][1]))
        with build_data_iterator(args, TOK, rank=rank, world_size=world, state=saved, format_fn=noisy_format) as it:
            assert_same_batches(take(it, 25), run[n : n + 25])


def test_resume_crosses_epoch_boundary(corpus: Path) -> None:
    args = make_args(corpus)
    with build_data_iterator(args, TOK, rank=0, world_size=1) as it:
        run = take(it, 60)
    # pick a resume point whose next batches take the web source into its next epoch
    n = next(i for i in range(1, 50) if reader_epoch(run[i - 1][1], "web") < reader_epoch(run[i + 9][1], "web"))
    with build_data_iterator(args, TOK, rank=0, world_size=1, state=json.loads(json.dumps(run[n - 1][1]))) as it:
        assert_same_batches(take(it, 10), run[n : n + 10])


def test_prefetch_thread_gives_the_same_stream(corpus: Path) -> None:
    with build_data_iterator(make_args(corpus, prefetch=False), TOK, rank=1, world_size=2) as it:
        sync = take(it, 30)
    with build_data_iterator(make_args(corpus, prefetch=True, prefetch_depth=3), TOK, rank=1, world_size=2) as it:
        threaded = take(it, 30)
    assert_same_batches(sync, threaded)


def test_no_shuffle_buffer_resume(corpus: Path) -> None:
    args = make_args(corpus, shuffle_buffer=0)
    with build_data_iterator(args, TOK, rank=0, world_size=2) as it:
        run = take(it, 40)
    with build_data_iterator(args, TOK, rank=0, world_size=2, state=json.loads(json.dumps(run[16][1]))) as it:
        assert_same_batches(take(it, 23), run[17:])


def test_dropped_or_closed_iterator_stops_its_thread(corpus: Path) -> None:
    it = build_data_iterator(make_args(corpus, prefetch=True), TOK, rank=0, world_size=1)
    next(it)
    thread = it._prefetcher._thread
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    with build_data_iterator(make_args(corpus, prefetch=True), TOK, rank=0, world_size=1) as it:
        next(it)
    with pytest.raises(RuntimeError, match="closed"):
        next(it)


def test_resume_refuses_changed_setup(corpus: Path) -> None:
    args = make_args(corpus)
    with build_data_iterator(args, TOK, rank=0, world_size=2) as it:
        _, state = next(it)
    with pytest.raises(DataStateMismatch, match="data.seq_len: saved 16, now 32"):
        build_data_iterator(dataclasses.replace(args, seq_len=32), TOK, rank=0, world_size=2, state=state)
    with pytest.raises(DataStateMismatch, match="rank: saved 0, now 1"):
        build_data_iterator(args, TOK, rank=1, world_size=2, state=state)
    with open(corpus / "web" / "part-00.jsonl", "a") as f:
        f.write(json.dumps({"text": "appended later"}) + "\n")
    with pytest.raises(DataStateMismatch, match="files"):
        build_data_iterator(args, TOK, rank=0, world_size=2, state=state)


def test_rng_state_round_trip() -> None:
    rng = make_rng(3, 1, 2)
    rng.random(5)
    saved = json.loads(json.dumps(rng_state(rng)))
    assert np.array_equal(rng_from_state(saved).random(10), rng.random(10))
    assert all(isinstance(v, (str, int)) and not isinstance(v, float) for v in saved.values())


# ------------------------------------------------------------------------- ranks and epochs


def read_epochs(reader: ShardReader, n: int) -> list[list[str]]:
    """Ids of the documents the reader yields in each of its first ``n`` epochs."""
    epochs: list[list[str]] = [[] for _ in range(n)]
    while True:
        record, _ = reader.next_record()
        if reader.epoch >= n:
            return epochs
        epochs[reader.epoch].append(record["id"])


def make_reader(root: Path, rank: int, world: int, seed: int = 7, reshuffle: bool = True) -> ShardReader:
    return ShardReader("web", list_shards(root, "web"), rank=rank, world_size=world, seed=seed, reshuffle=reshuffle)


def test_rank_shares_are_disjoint_and_cover_every_line(corpus: Path) -> None:
    all_ids = [f"web{i:03d}" for i in range(24)]
    for world in (1, 2, 3):
        shares = [read_epochs(make_reader(corpus, r, world), 1)[0] for r in range(world)]
        for r, share in enumerate(shares):
            assert share == all_ids[r::world]  # epoch 0: global line i goes to rank i % world
        assert sorted(sum(shares, [])) == all_ids


def test_shards_are_read_in_sorted_name_order(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    for name in ("c.jsonl", "a.jsonl", "b.jsonl"):  # created out of order
        (tmp_path / "s" / name).write_text(json.dumps({"id": name, "text": "t"}) + "\n")
    (tmp_path / "s" / "skip.txt").write_text("not a shard")
    reader = ShardReader("s", list_shards(tmp_path, "s"), rank=0, world_size=1, seed=0)
    assert [reader.next_record()[0]["id"] for _ in range(3)] == ["a.jsonl", "b.jsonl", "c.jsonl"]


def test_ranks_read_disjoint_documents_through_the_pipeline(corpus: Path) -> None:
    seen: dict[int, set[str]] = {0: set(), 1: set()}
    for rank in (0, 1):

        def spy(record: dict, rng: np.random.Generator, _rank: int = rank) -> str:
            seen[_rank].add(record["id"])
            return record["text"]

        with build_data_iterator(make_args(corpus), TOK, rank=rank, world_size=2, format_fn=spy) as it:
            take(it, 40)  # several epochs
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 24 + 14


def test_epoch_reshuffle_changes_order_and_is_seeded(corpus: Path) -> None:
    reader = make_reader(corpus, 0, 2)
    epochs = read_epochs(reader, 4)
    assert epochs[0] == [f"web{i:03d}" for i in range(0, 24, 2)]  # file order first
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # same share every epoch
    assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch
    again = make_reader(corpus, 0, 2)
    assert read_epochs(again, 4) == epochs  # seeded
    other = make_reader(corpus, 0, 2, seed=8)
    assert read_epochs(other, 4)[1:] != epochs[1:]
    fixed = make_reader(corpus, 0, 2, reshuffle=False)
    assert read_epochs(fixed, 3) == [epochs[0]] * 3  # reference behaviour


def test_reader_resumes_mid_file_and_mid_permutation(corpus: Path) -> None:
    reader = make_reader(corpus, 1, 2)
    ids = [reader.next_record()[0]["id"] for _ in range(40)]
    for n in (5, 12, 17, 30):  # in epoch 0 (byte offsets), at the epoch end, in epochs 1 and 2
        fresh = make_reader(corpus, 1, 2)
        for _ in range(n):
            fresh.next_record()
        resumed = ShardReader("web", list_shards(corpus, "web"), rank=1, world_size=2, seed=7,
                              state=json.loads(json.dumps(fresh.state())))  # fmt: skip
        assert [resumed.next_record()[0]["id"] for _ in range(40 - n)] == ids[n:]


# ---------------------------------------------------------------------------------- mixing


def test_mixer_frequencies_follow_weights() -> None:
    mixer = SourceMixer({"a": 3.0, "b": 1.0, "off": 0.0}, seed=0, rank=0, world_size=1)
    draws = [mixer.choose() for _ in range(20000)]
    assert "off" not in draws
    assert abs(draws.count("a") / len(draws) - 0.75) < 0.01
    with pytest.raises(ValueError, match="positive weight"):
        SourceMixer({"a": 0.0}, seed=0, rank=0, world_size=1)


def test_source_weights_respected_in_token_counts(tmp_path: Path) -> None:
    for name in ("a", "b"):  # documents of equal length, so token share = document share
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jsonl").write_text("".join(json.dumps({"text": f"{name}{i:02d} " * 4}) + "\n" for i in range(40)))
    args = make_args(tmp_path, sources={"a": 0.8, "b": 0.2})
    with build_data_iterator(args, TOK, rank=0, world_size=1) as it:
        run = take(it, 200)
    batch, state = run[-1]
    assert sum(batch["tokens_by_source"].values()) == 3 * 16
    totals = state["tokens_by_source"]
    assert totals == {k: sum(b["tokens_by_source"][k] for b, _ in run) for k in ("a", "b")}
    assert sum(totals.values()) == 200 * 3 * 16
    assert abs(totals["a"] / (200 * 3 * 16) - 0.8) < 0.04
    assert data_metrics(state)["data/tokens/a"] == totals["a"]


# ------------------------------------------------------------------------------ bad input

BAD_LINES = [
    b'{"text": "good one"}',
    b'{"text": "unterminated',
    b'{"text": "\xff\xfe bytes"}',
    b'{"other": 1}',
    b'{"text": "   "}',
    b"[1, 2]",
    b"",
    b'{"text": 5}',
    b'{"text": "good two"}',
]
BAD_REASONS = {"malformed_json": 1, "invalid_utf8": 1, "missing_key": 2, "empty_text": 1, "not_object": 1}


def write_bad_source(root: Path) -> Path:
    (root / "bad").mkdir()
    path = root / "bad" / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    return path


def test_bad_input_is_counted_logged_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_bad_source(tmp_path)
    reader = ShardReader("bad", [path], rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="lingua.data"):
        texts = [reader.next_record()[0]["text"] for _ in range(2)]
    assert texts == ["good one", "good two"]
    assert reader.counts == {"records": 2, **BAD_REASONS}
    assert f"{path}:2: malformed JSON" in caplog.text
    assert f"{path}:3: invalid UTF-8" in caplog.text
    assert f"{path}:4: missing key 'text'" in caplog.text
    assert f"{path}:5: empty text" in caplog.text
    assert f"{path}:7" not in caplog.text  # a blank line is not a document


def test_bad_input_through_the_pipeline_keeps_training(tmp_path: Path) -> None:
    write_bad_source(tmp_path)
    with build_data_iterator(make_args(tmp_path, sources={"bad": 1.0}), TOK, rank=0, world_size=1) as it:
        batches = take(it, 5)
    stats = batches[-1][1]["stats"]["bad"]
    epochs = stats["epoch"]
    assert epochs >= 1 and stats["counts"]["malformed_json"] in (epochs, epochs + 1)
    assert stats["counts"]["records"] >= 2 * epochs
    good = set(b"good one good two") | {BOS, EOS}
    assert all(set(b["input"].flatten().tolist()) <= good for b, _ in batches)  # only the good records
    assert data_metrics(batches[-1][1])["data/invalid_utf8/bad"] >= epochs


def test_strict_mode_names_file_and_line(tmp_path: Path) -> None:
    path = write_bad_source(tmp_path)
    args = make_args(tmp_path, sources={"bad": 1.0}, strict=True)
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        with build_data_iterator(args, TOK, rank=0, world_size=1) as it:
            next(it)
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):  # also through the thread
        with build_data_iterator(dataclasses.replace(args, prefetch=True), TOK, rank=0, world_size=1) as it:
            next(it)


def test_many_problems_log_first_few_then_totals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "s").mkdir()
    path = tmp_path / "s" / "x.jsonl"
    path.write_text("{broken\n" * 12 + '{"text": "fine"}\n')
    reader = ShardReader("s", [path], rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="lingua.data"):
        reader.next_record()
    full = [r for r in caplog.records if "malformed JSON" in r.getMessage()]
    assert len(full) == LOG_IN_FULL
    assert f"{path}:{LOG_IN_FULL}:" in full[-1].getMessage() and "only counted" in full[-1].getMessage()
    assert any("10 problem records so far (malformed_json=10)" in r.getMessage() for r in caplog.records)
    assert reader.counts["malformed_json"] == 12


def test_formatter_bad_record_and_bugs(tmp_path: Path) -> None:
    write_source(tmp_path, "web", 6, shards=1)

    def picky(record: dict, rng: np.random.Generator) -> str:
        if record["id"] == "web001":
            raise BadRecord("no chunks")
        return record["text"]

    with build_data_iterator(make_args(tmp_path, sources={"web": 1}), TOK, rank=0, world_size=1, format_fn=picky) as it:
        _, state = take(it, 3)[-1]
    assert state["stats"]["web"]["counts"]["format_error"] >= 1
    with pytest.raises(DataError, match=r"part-00.jsonl:2: formatter rejected the record: no chunks"):
        with build_data_iterator(make_args(tmp_path, sources={"web": 1}, strict=True), TOK, rank=0, world_size=1,
                                 format_fn=picky) as it:  # fmt: skip
            take(it, 3)

    def buggy(record: dict, rng: np.random.Generator) -> str:
        return record["missing"]

    for prefetch in (False, True):
        with pytest.raises(KeyError) as info:
            with build_data_iterator(make_args(tmp_path, sources={"web": 1}, prefetch=prefetch), TOK, rank=0,
                                     world_size=1, format_fn=buggy) as it:  # fmt: skip
                next(it)
        assert any("part-00.jsonl:1" in note for note in info.value.__notes__)


def test_long_documents_truncated_or_skipped(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.jsonl").write_text(json.dumps({"text": "x" * 50}) + "\n" + json.dumps({"text": "short"}) + "\n")
    args = make_args(tmp_path, sources={"s": 1}, shuffle_buffer=0, batch_size=1, max_doc_chars=10)
    with build_data_iterator(args, TOK, rank=0, world_size=1) as it:
        batch, state = next(it)
    stream = batch["input"][0].tolist() + batch["target"][0, -1:].tolist()
    assert stream[:13] == [BOS] + [ord("x")] * 10 + [EOS, BOS]  # truncated to 10 characters
    assert state["stats"]["s"]["counts"]["long_truncated"] == 1
    with build_data_iterator(dataclasses.replace(args, long_doc_policy="skip", strict=True), TOK, rank=0,
                             world_size=1) as it:  # fmt: skip  (strict: a policy, not bad input)
        batch, state = next(it)
    assert ord("x") not in batch["input"].tolist()[0]
    assert state["stats"]["s"]["counts"]["long_skipped"] >= 1


# ------------------------------------------------------------------ missing or empty data


def test_missing_or_empty_data_is_a_clear_error(tmp_path: Path) -> None:
    def build(**kw):
        return build_data_iterator(make_args(tmp_path, **kw), TOK, rank=0, world_size=1)

    with pytest.raises(DataError, match="dataset folder not found: .*nowhere"):
        build(root_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="root_dir is not set"):
        build(root_dir="")
    with pytest.raises(DataError, match="data.sources is empty"):
        build(sources={})
    with pytest.raises(DataError, match="source 'web': folder not found"):
        build(sources={"web": 1.0})
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "notes.txt").write_text("not jsonl")
    with pytest.raises(DataError, match=r"source 'web': no \*.jsonl files in .*web"):
        build(sources={"web": 1.0})
    (tmp_path / "web" / "a.jsonl").write_text("")
    with pytest.raises(DataError, match="source 'web': all .* are empty"):
        build(sources={"web": 1.0})
    (tmp_path / "web" / "a.jsonl").write_text(json.dumps({"text": "only one"}) + "\n")
    with pytest.raises(DataError, match="source 'web': no valid document for rank 1 of 2"):
        with build_data_iterator(make_args(tmp_path, sources={"web": 1.0}), TOK, rank=1, world_size=2) as it:
            next(it)
    (tmp_path / "web" / "a.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"no valid document .*malformed_json=1"):
        with build(sources={"web": 1.0}) as it:
            next(it)


# ------------------------------------------------------------------------------- packing


def stream_of(batches: list[tuple[dict, dict]]) -> list[int]:
    """The token stream behind unshuffled windows (consecutive windows share one token)."""
    out: list[int] = []
    for batch, _ in batches:
        for row_in, row_tgt in zip(batch["input"].tolist(), batch["target"].tolist()):
            assert row_in[1:] == row_tgt[:-1]
            if out:
                assert out[-1] == row_in[0]  # the last token of a window starts the next
                out += row_tgt
            else:
                out += [row_in[0]] + row_tgt
    return out


@pytest.mark.parametrize("add_bos,add_eos", [(True, True), (True, False), (False, True)])
def test_bos_eos_and_packing(tmp_path: Path, add_bos: bool, add_eos: bool) -> None:
    records = write_source(tmp_path, "web", 10)
    args = make_args(tmp_path, sources={"web": 1}, shuffle_buffer=0, add_bos=add_bos, add_eos=add_eos)
    with build_data_iterator(args, TOK, rank=0, world_size=1) as it:
        stream = stream_of(take(it, 6))
    expected: list[int] = []
    for r in records:  # epoch 0 is file order
        expected += [BOS] * add_bos + list(r["text"].encode()) + [EOS] * add_eos
    assert stream == expected[: len(stream)]
    assert len(stream) == 6 * 3 * 16 + 1


@pytest.mark.parametrize("add_bos,add_eos", [(True, True), (True, False), (False, True)])
def test_doc_ids_change_exactly_at_document_boundaries(corpus: Path, add_bos: bool, add_eos: bool) -> None:
    args = make_args(corpus, doc_mask=True, add_bos=add_bos, add_eos=add_eos, seq_len=48)
    with build_data_iterator(args, TOK, rank=0, world_size=1) as it:
        batches = take(it, 20)
    for batch, _ in batches:
        doc_ids, inp = batch["doc_ids"], batch["input"]
        assert doc_ids.dtype == torch.int64 and doc_ids.shape == inp.shape
        assert (doc_ids[:, 0] == 0).all()
        starts = (inp[:, 1:] == BOS) if add_bos else (inp[:, :-1] == EOS)  # a new document begins
        assert torch.equal(doc_ids[:, 1:] - doc_ids[:, :-1], starts.long())
    assert any(b["doc_ids"].max() >= 2 for b, _ in batches)
    with build_data_iterator(make_args(corpus, doc_mask=False), TOK, rank=0, world_size=1) as it:
        assert "doc_ids" not in next(it)[0]


def test_loss_mask_from_spans(tmp_path: Path) -> None:
    write_source(tmp_path, "web", 8)

    def layout(record: dict, rng: np.random.Generator) -> list[tuple[str, bool]]:
        return [("<", True), ("HIDDEN", False), ("> ", True), (record["text"], True)]

    args = make_args(tmp_path, sources={"web": 1}, seq_len=24)
    with build_data_iterator(args, TOK, rank=0, world_size=1, format_fn=layout) as it:
        batches = take(it, 8)
    hidden = torch.tensor(sorted(set(b"HIDDEN")))
    for batch, _ in batches:
        target, mask = batch["target"], batch["loss_mask"]
        assert mask.dtype == torch.bool and mask.shape == target.shape
        # texts are lower case, so capitals in targets come only from the excluded span
        assert torch.equal(mask, ~torch.isin(target, hidden))
    assert sum(int((~b["loss_mask"]).sum()) for b, _ in batches) > 0


def test_registered_text_format_and_text_key(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.jsonl").write_text(json.dumps({"body": "abc", "text": "zzz"}) + "\n")
    args = make_args(tmp_path, sources={"s": 1}, text_key="body", shuffle_buffer=0, batch_size=1, seq_len=4)
    with build_data_iterator(args, TOK, rank=0, world_size=1) as it:
        batch, _ = next(it)
    assert batch["input"][0].tolist() == [BOS, *b"abc"]
    assert "text" in registered_formats()
    assert get_format("text", text_key="body")({"body": "q"}, make_rng(0)) == "q"


def test_register_format_hook(tmp_path: Path) -> None:
    def shout_factory(suffix: str = "!"):
        return lambda record, rng: record["text"].upper() + suffix

    register_format("test_shout", shout_factory)
    register_format("test_shout", shout_factory)  # idempotent for the same factory
    with pytest.raises(ValueError, match="already registered"):
        register_format("test_shout", lambda: None)
    with pytest.raises(ValueError, match="unknown document format 'nope'; registered: .*'text'"):
        get_format("nope")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.jsonl").write_text(json.dumps({"text": "abc"}) + "\n")
    args = make_args(tmp_path, sources={"s": 1}, format="test_shout", shuffle_buffer=0, batch_size=1, seq_len=5)
    with build_data_iterator(args, TOK, rank=0, world_size=1) as it:
        assert next(it)[0]["input"][0].tolist() == [BOS, *b"ABC!"]
    with pytest.raises(ValueError, match="unknown document format"):
        build_data_iterator(dataclasses.replace(args, format="nope"), TOK, rank=0, world_size=1)


def test_special_tokens_in_formatted_text(tmp_path: Path) -> None:
    tok = ByteTokenizer(extra=["<|START_OF_LATENT|>", "<|END_OF_LATENT|>"])
    sol, eol = tok.special_ids["<|START_OF_LATENT|>"], tok.special_ids["<|END_OF_LATENT|>"]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.jsonl").write_text(json.dumps({"text": "ab"}) + "\n")

    def latent(record: dict, rng: np.random.Generator) -> list[tuple[str, bool]]:
        return [("<|START_OF_LATENT|>z<|END_OF_LATENT|>", False), (record["text"], True)]

    args = make_args(tmp_path, sources={"s": 1}, shuffle_buffer=0, batch_size=1, seq_len=6)
    with build_data_iterator(args, tok, rank=0, world_size=1, format_fn=latent) as it:
        batch, _ = next(it)
    assert batch["input"][0].tolist() == [tok.bos_id, sol, ord("z"), eol, *b"ab"]
    assert batch["loss_mask"][0].tolist() == [False, False, False, True, True, True]


# ----------------------------------------------------------------------- config and budget


def test_data_args_from_config_and_validation() -> None:
    args = from_dict(DataArgs, {"root_dir": "/d", "sources": {"web": 3, "math": 1}, "seq_len": 32})
    assert args.sources == {"web": 3.0, "math": 1.0} and args.seq_len == 32
    with pytest.raises(ConfigError, match="sources.web: weight must be >= 0"):
        from_dict(DataArgs, {"sources": {"web": -1}})
    with pytest.raises(ConfigError, match="long_doc_policy"):
        from_dict(DataArgs, {"long_doc_policy": "drop"})
    with pytest.raises(ConfigError, match="unknown config key 'shufle_buffer'"):
        from_dict(DataArgs, {"shufle_buffer": 3})


def test_steps_for_token_budget() -> None:
    assert steps_for_token_budget(13_000_000_000, 192, 2048) == 33_060  # the reference's M-step
    assert steps_for_token_budget(8_000_000_000, 96, 2048) == 40_690
    assert steps_for_token_budget(100, 4, 32) == 0
    with pytest.raises(ValueError):
        steps_for_token_budget(100, 0, 32)
