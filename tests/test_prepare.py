"""Dataset preparation: determinism, disjoint budgeted subsets, validation split, bad input,
resume after interruption, idempotent reruns, parquet input, offline HF error, shipped configs."""

import json
import sys
from pathlib import Path

import pytest

from apps.bolt import prepare as prep
from apps.bolt.prepare import PrepareArgs, PrepareError, main, run
from lingua.args import ConfigError, from_dict, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "apps" / "bolt" / "configs").glob("prepare_*.yaml"))
GEN = "tests.test_prepare:fake_corpus"


FAIL_AFTER = -1  # set by a test to kill the generator mid-stream (same config, same staging key)


def fake_corpus(num_docs: int, seed: int, bad_every: int = 0):
    """A generator source: documents of varied length; optionally bad records or a crash."""
    for i in range(num_docs):
        if i == FAIL_AFTER:
            raise KeyboardInterrupt("simulated kill")
        if bad_every and i % bad_every == bad_every - 1:
            yield {"id": f"s{seed}-{i}", "body": "no text field"}
            continue
        yield {"id": f"s{seed}-{i}", "text": f"Doc {i}. " + "word " * ((i * 7 + seed) % 23), "n": i}


def cfg(out, num_docs=400, subsets=None, **over) -> PrepareArgs:
    data = {
        "out_dir": str(out),
        "source": {"kind": "synthetic", "generator": GEN, "num_docs": num_docs, "seed": 3},
        "subsets": subsets if subsets is not None else [{"name": "warm", "tokens": 3000}, {"name": "boot", "docs": 50}, {"name": "rest"}],
        "docs_per_shard": 40,
        **over,
    }
    return from_dict(PrepareArgs, data)


def read_set(folder: Path) -> list[dict]:
    lineage = json.loads((folder / "lineage.json").read_text())
    out = []
    for shard in lineage["shards"]:
        out += [json.loads(line) for line in (folder / shard["file"]).read_text().splitlines()]
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the built sets (not the staging area), by relative path."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".staging" not in p.parts
    }


def test_deterministic(tmp_path):
    run(cfg(tmp_path / "a"))
    run(cfg(tmp_path / "b"))
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    a.pop("prepare_config.yaml"), b.pop("prepare_config.yaml")  # names its out_dir
    assert a == b and len(a) > 6
    run(cfg(tmp_path / "c", seed=7))
    assert read_set(tmp_path / "c" / "validation") != read_set(tmp_path / "a" / "validation")


def test_parallel_token_counting_matches(tmp_path):
    run(cfg(tmp_path / "one"))
    run(cfg(tmp_path / "two", num_workers=2))
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert {k: v for k, v in one.items() if k.endswith(".json") or k.endswith(".jsonl")} == {
        k: v for k, v in two.items() if k.endswith(".json") or k.endswith(".jsonl")
    }


def test_disjoint_subsets_and_budgets(tmp_path):
    info = run(cfg(tmp_path))
    sets = {name: read_set(tmp_path / name) for name in ["validation", "warm", "boot", "rest"]}
    ids = [d["id"] for docs in sets.values() for d in docs]
    assert len(ids) == len(set(ids)) == 400  # disjoint and complete
    assert len(sets["validation"]) == 1  # ceil(0.001 * 400) = 1
    assert len(sets["boot"]) == 50
    warm_tokens = [len(d["text"].encode()) for d in sets["warm"]]
    assert sum(warm_tokens) >= 3000 > sum(warm_tokens) - warm_tokens[-1]  # stops right at the budget
    for name, docs in sets.items():
        lineage = json.loads((tmp_path / name / "lineage.json").read_text())
        assert lineage["num_docs"] == len(docs) == info[name]["num_docs"]
        assert lineage["num_tokens"] == sum(len(d["text"].encode()) for d in docs)  # bytes tokenizer
        assert lineage["seed"] == 42 and lineage["tokenizer"]["name"] == "bytes"
        assert lineage["source"]["config"]["generator"] == GEN and lineage["source"]["usable_docs"] == 400
        assert [s["docs"] for s in lineage["shards"]] == [min(40, len(docs) - i) for i in range(0, len(docs), 40)]
    # Consecutive permutation positions: the ranges tile [0, N).
    positions = [info[n]["positions"] for n in ["validation", "warm", "boot", "rest"]]
    assert positions[0][0] == 0 and positions[-1][1] == 400
    assert all(p[1] == q[0] for p, q in zip(positions, positions[1:]))
    lineage = json.loads((tmp_path / "warm" / "lineage.json").read_text())
    assert lineage["selection"]["budget"] == {"tokens": 3000} and lineage["selection"]["budget_met"]


@pytest.mark.parametrize("n, fraction, min_docs, expected", [(2500, 0.001, 1, 3), (10, 0.001, 1, 1), (100, 0.001, 5, 5), (100, 0.1, 1, 10)])
def test_validation_split_size(tmp_path, n, fraction, min_docs, expected):
    info = run(cfg(tmp_path, num_docs=n, subsets=[], val={"fraction": fraction, "min_docs": min_docs}))
    assert info["validation"]["num_docs"] == expected


def test_short_budget(tmp_path):
    with pytest.raises(PrepareError, match="subset 'big' needs .*allow_short=true"):
        run(cfg(tmp_path, subsets=[{"name": "big", "tokens": 10**9}]))
    assert not (tmp_path / "big").exists()
    info = run(cfg(tmp_path, subsets=[{"name": "big", "tokens": 10**9}], allow_short=True))
    assert info["big"]["num_docs"] == 399
    assert json.loads((tmp_path / "big" / "lineage.json").read_text())["selection"]["budget_met"] is False


def test_generator_bad_records(tmp_path):
    info = run(cfg(tmp_path, source={"kind": "synthetic", "generator": GEN, "num_docs": 100, "seed": 1, "options": {"bad_every": 10}}, subsets=[{"name": "all"}]))
    assert info["validation"]["num_docs"] + info["all"]["num_docs"] == 90
    lineage = json.loads((tmp_path / "all" / "lineage.json").read_text())
    assert lineage["source"]["bad_inputs"] == {"no string field 'text'": 10}
    assert lineage["source"]["bad_examples"][0] == f"{GEN}:9: no string field 'text'"


def test_bad_input_counted_and_reported(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = [json.dumps({"text": f"document number {i}"}) for i in range(30)]
    (src / "b.jsonl").write_bytes(
        ("\n".join(good[:10] + ["{not json", "[1, 2]", '{"text": "   "}', '{"text": 5}']) + "\n").encode()
        + b'{"text": "\xff\xfe"}\n'
    )
    (src / "a.jsonl").write_text("\n".join(good[10:]) + "\n\n")
    info = run(from_dict(PrepareArgs, {"out_dir": str(tmp_path / "out"), "source": {"path": str(src)}}))
    assert info["validation"]["num_docs"] == 1
    lineage = json.loads((tmp_path / "out" / "validation" / "lineage.json").read_text())
    assert lineage["source"]["usable_docs"] == 30
    assert lineage["source"]["bad_inputs"] == {
        "malformed JSON": 1, "not a JSON object": 1, "blank text": 1, "no string field 'text'": 1, "invalid UTF-8": 1
    }
    assert lineage["source"]["bad_examples"][0] == f"{src / 'b.jsonl'}:11: malformed JSON"
    assert f"{src / 'b.jsonl'}:15: invalid UTF-8" in lineage["source"]["bad_examples"]
    # Records get an id naming where they came from; files are read in sorted order.
    staged = (next((tmp_path / "out" / ".staging").iterdir()) / "docs.jsonl").read_text().splitlines()
    assert json.loads(staged[0])["id"] == f"{src / 'a.jsonl'}:1"
    with pytest.raises(PrepareError, match=r"b\.jsonl:11: malformed JSON \(strict=true\)"):
        run(from_dict(PrepareArgs, {"out_dir": str(tmp_path / "strict"), "source": {"path": str(src)}, "strict": True}))


def test_resume_after_interrupted_staging(tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    run(cfg(clean))
    out = tmp_path / "out"
    monkeypatch.setattr(sys.modules[__name__], "FAIL_AFTER", 200)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(out))
    staging = next((out / ".staging").iterdir())
    assert not (staging / "COMPLETE").exists()
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))  # the partial file was removed
    monkeypatch.setattr(sys.modules[__name__], "FAIL_AFTER", -1)
    run(cfg(out))  # same config: the unfinished staging is redone
    assert [p.name for p in (out / ".staging").iterdir()] == [staging.name]
    assert snapshot(out).keys() == snapshot(clean).keys()
    assert {k: v for k, v in snapshot(out).items() if k != "prepare_config.yaml"} == {
        k: v for k, v in snapshot(clean).items() if k != "prepare_config.yaml"
    }


def test_resume_after_interrupted_writing(tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    run(cfg(clean))
    out = tmp_path / "out"
    real_finish = prep.SetWriter.finish

    def dying_finish(self, *a, **k):
        if self.name == "boot":
            raise KeyboardInterrupt("killed while finishing 'boot'")
        return real_finish(self, *a, **k)

    monkeypatch.setattr(prep.SetWriter, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(out))
    assert (out / "warm" / "COMPLETE").exists() and not (out / "boot" / "COMPLETE").exists()
    assert list((out / "boot").glob("*.jsonl"))  # shards were written before the kill
    warm_mtime = (out / "warm" / "warm.chunk.00.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(prep.SetWriter, "finish", real_finish)
    run(cfg(out))
    assert (out / "warm" / "warm.chunk.00.jsonl").stat().st_mtime_ns == warm_mtime  # skipped
    got = {k: v for k, v in snapshot(out).items() if k != "prepare_config.yaml"}
    assert got == {k: v for k, v in snapshot(clean).items() if k != "prepare_config.yaml"}


def test_idempotent_rerun_and_recipe_change(tmp_path, monkeypatch):
    first = run(cfg(tmp_path))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jsonl")}
    calls = []
    monkeypatch.setattr(prep.SetWriter, "add", lambda *a: calls.append(a))
    assert run(cfg(tmp_path)) == first
    assert calls == [] and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jsonl")} == before
    monkeypatch.undo()
    changed = [{"name": "warm", "tokens": 3000}, {"name": "boot", "docs": 60}, {"name": "rest"}]
    with pytest.raises(PrepareError, match=r"boot was built from a different recipe .* overwrite=true"):
        run(cfg(tmp_path, subsets=changed))
    info = run(cfg(tmp_path, subsets=changed, overwrite=True))
    assert info["warm"] == first["warm"] and info["boot"]["num_docs"] == 60
    assert info["rest"]["num_docs"] == first["rest"]["num_docs"] - 10


def test_foreign_files_are_never_deleted(tmp_path):
    (tmp_path / "warm").mkdir(parents=True)
    (tmp_path / "warm" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="did not write"):
        run(cfg(tmp_path))
    assert (tmp_path / "warm" / "notes.txt").read_text() == "mine"


def test_parquet_source_and_extra_set(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "pq"
    src.mkdir()
    pq.write_table(pa.table({"text": [f"row {i} text" for i in range(20)] + [None], "score": list(range(21))}), src / "p0.parquet")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(5)))
    data = {
        "out_dir": str(tmp_path / "out"),
        "source": {"kind": "parquet", "path": str(src)},
        "subsets": [{"name": "train"}],
        "extra": [{"name": "eval", "source": {"kind": "jsonl", "path": str(tasks), "text_key": "question"}}],
    }
    info = run(from_dict(PrepareArgs, data))
    assert info["validation"]["num_docs"] + info["train"]["num_docs"] == 20
    train = read_set(tmp_path / "out" / "train")
    assert {"text", "score", "id"} <= set(train[0]) and ":row " in train[0]["id"]
    lineage = json.loads((tmp_path / "out" / "validation" / "lineage.json").read_text())
    assert lineage["source"]["bad_inputs"] == {"no string field 'text'": 1}
    assert [t["id"] for t in read_set(tmp_path / "out" / "eval")] == [f"q{i}" for i in range(5)]  # source order


def test_offline_hf_source_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([f"out_dir={tmp_path}", "source.kind=hf", "source.name=HuggingFaceTB/finemath", "source.config=finemath-4plus"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare: error: source kind 'hf' needs the Hugging Face Hub")
    assert "offline" in err[0] and "source.kind=parquet" in err[0]


def test_cli_and_config_errors(tmp_path, capsys):
    main([f"out_dir={tmp_path}", "source.kind=synthetic", f"source.generator={GEN}", "source.num_docs=30"])
    assert "validation: 1 docs" in capsys.readouterr().out
    assert (tmp_path / "prepare_config.yaml").exists()
    with pytest.raises(SystemExit):
        main([f"out_dir={tmp_path}", "source.kind=csv"])
    assert "source kind 'csv' is unknown" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="set one of tokens/docs"):
        cfg(tmp_path, subsets=[{"name": "x", "tokens": 5, "docs": 5}])
    with pytest.raises(ConfigError, match="distinct"):
        cfg(tmp_path, subsets=[{"name": "validation"}])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    c = load_config(PrepareArgs, path)
    assert c.subsets and c.out_dir


def test_synthetic_world_sets(tmp_path):
    """The shipped synthetic recipe, scaled down: corpus sets plus the eval task folder."""
    path = next(p for p in CONFIGS if p.name == "prepare_synthetic.yaml")
    c = load_config(PrepareArgs, path, [
        f"out_dir={tmp_path}", "source.num_docs=200",
        "subsets=[{name: warmstart, tokens: 15000}, {name: bootstrap, tokens: 40000}]",
        "extra=[{name: eval, builder: 'apps.bolt.synthetic.tasks:write_eval_files', options: {n_test: 12, n_dev: 6}}]",
    ])
    info = run(c)
    assert info["validation"]["num_docs"] == 4  # 2% of 200
    ids = [d["id"] for n in ("validation", "warmstart", "bootstrap") for d in read_set(tmp_path / n)]
    assert len(ids) == len(set(ids)) and all(i.startswith("synth-0-") for i in ids)
    assert info["warmstart"]["num_tokens"] >= 15000 and info["bootstrap"]["num_tokens"] >= 40000
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "COMPLETE", "dev.jsonl", "fewshot.jsonl", "lineage.json", "meta.json", "test.jsonl"
    ]
    assert info["eval"]["num_docs"] == 12 + 6 + 3  # test + dev + the default 3 few-shot exemplars
    assert not list(tmp_path.glob(".eval.building"))
    assert run(c) == info  # idempotent, eval included


def test_no_usable_documents(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": " "}\n{oops\n')
    with pytest.raises(PrepareError, match="no usable documents"):
        run(from_dict(PrepareArgs, {"out_dir": str(tmp_path / "out"), "source": {"path": str(src)}}))
    with pytest.raises(prep.SourceError, match="no .jsonl files found"):
        run(from_dict(PrepareArgs, {"out_dir": str(tmp_path / "out"), "source": {"path": str(tmp_path / "nope")}}))


def test_long_stages_log_progress(tmp_path, monkeypatch, caplog):
    """Staging and writing print a progress line now and then (here: on every check)."""
    monkeypatch.setattr(prep, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="apps.bolt.prepare"):
        run(cfg(tmp_path / "out", num_docs=2100, subsets=[{"name": "warm", "tokens": 30000}, {"name": "rest"}]))
    assert "staging synthetic source: " in caplog.text and " bad inputs so far" in caplog.text
    assert "rest: " in caplog.text and " tokens in " in caplog.text
    assert "warm: " not in caplog.text or "%)" in caplog.text  # a budgeted set says how far it is
