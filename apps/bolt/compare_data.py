"""What each condition of the data comparison trains on, measured: tokens, ratios and leakage.

For every condition's dataset (:mod:`apps.bolt.compare`) the ``scan`` stage records, in
``DUMP/scan.json``:

* ``packed_tokens`` and ``raw_tokens`` of one pass over the dataset in the condition's layout
  (BOS/EOS counted as in packing; :func:`apps.bolt.em_report.raw_fraction`), and the
  *synthetic-to-raw ratio* ``packed_tokens / raw_tokens``: 1 for raw data, about 2 for the
  synthetic world's thoughts (3.3 in the paper), about 1.2 per paraphrase here (0.48 and 0.70
  for GPT-4o-mini's WRAP and WRAP-CoT in the paper). A document with several records (the WRAP
  repeats) counts its raw text once per record, so the ratio is per pass over the documents;
  ``unique_raw_tokens`` counts each document once (the data budget);
* ``passes``: how many times a run of ``train_tokens`` goes over the dataset;
* leakage, when a scanner is configured: every statement whose question can be read in the
  dataset's texts (raw text, thoughts, paraphrases) is matched against the evaluation problems;
  ``eval_problems_found`` must be 0, ``statements`` shows the scan saw the data.

The stage reruns when a dataset changes (its completion marker's stamp is recorded).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lingua.io import atomic_write_json, read_jsonl

if TYPE_CHECKING:
    from apps.bolt.compare import CompareDriver

SCAN = "scan.json"
Scanner = Callable[[str], tuple[int, list[str]]]
"""text -> (statements read, ids of the evaluation problems among them)."""


def synthetic_leakage(eval_dir: Path) -> Scanner:
    """The synthetic world's scanner: statements are read with the paraphraser's reader (every
    style, :func:`apps.bolt.synthetic.paraphrase.find_statements`) and matched by computation
    (the key the train/eval split hashes) against every evaluation split's problems."""
    from apps.bolt.synthetic.corpus import parse_question
    from apps.bolt.synthetic.paraphrase import find_statements

    keys: dict[str, str] = {}
    for split in ("fewshot", "dev", "test"):
        path = eval_dir / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"leakage scan: {path} is missing (prepare writes the evaluation files)")
        for rec in read_jsonl(path):
            problem = parse_question(rec["question"])
            if problem is None:
                raise ValueError(f"{path}: question of {rec['id']} does not parse: {rec['question']!r}")
            keys[problem.key] = rec["id"]

    def scan(text: str) -> tuple[int, list[str]]:
        found = find_statements(text)
        return len(found), [keys[p.key] for p in found if p.key in keys]

    return scan


def record_texts(rec: dict) -> list[str]:
    """Every text of a dataset record a model may train on: the raw text, the whole-document
    latent (paraphrases) and the chunk latents (thoughts)."""
    out = [rec[k] for k in ("text", "latent") if isinstance(rec.get(k), str)]
    out += [c["latent"] for c in rec.get("chunks") or [] if isinstance(c.get("latent"), str) and c["latent"]]
    return out


def leakage(folder: Path, scanner: Scanner) -> dict[str, Any]:
    statements, records, hits = 0, 0, set()
    for f in sorted(folder.glob("*.jsonl")):
        for rec in read_jsonl(f):
            records += 1
            for text in record_texts(rec):
                n, found = scanner(text)
                statements += n
                hits.update(found)
    return {"records": records, "statements": statements, "eval_problems_found": len(hits), "eval_ids": sorted(hits)[:20]}


def unique_raw_tokens(tokenizer_args: Any, folder: Path) -> int:
    """Raw tokens of the distinct documents behind a dataset (BOS/EOS counted): the data budget."""
    from apps.bolt.formats import raw_text
    from lingua.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_args)
    seen: set[str] = set()
    total = 0
    for f in sorted(folder.glob("*.jsonl")):
        for rec in read_jsonl(f):
            key = str(rec.get("id", len(seen)))
            if key not in seen:
                seen.add(key)
                total += len(tok.encode(raw_text(rec))) + 2
    return total


def measure(driver: "CompareDriver", tokenizer_args: Any, scanner: Scanner | None) -> dict[str, Any]:
    from apps.bolt.compare import CONDITIONS
    from apps.bolt.em import _stamp
    from apps.bolt.em_report import raw_fraction

    cfg = driver.cfg
    out: dict[str, Any] = {"train_tokens": cfg.train_tokens, "conditions": {}}
    for cond in cfg.conditions:
        folder = driver.data / driver.source(cond)
        layout = CONDITIONS[cond][0]
        share = raw_fraction(tokenizer_args, folder, layout_name=layout)
        entry = {"dataset": folder.name, "stamp": _stamp(folder), "layout": layout,
                 "packed_tokens": share["packed_tokens"], "raw_tokens": share["raw_tokens"],
                 "ratio": share["latent_to_raw_ratio"], "unique_raw_tokens": unique_raw_tokens(tokenizer_args, folder),
                 "passes": cfg.train_tokens / share["packed_tokens"]}
        if scanner is not None:
            entry["leakage"] = leakage(folder, scanner)
        out["conditions"][cond] = entry
    return out


def scan_stage(driver: "CompareDriver", tokenizer_args: Any) -> dict[str, Any]:
    """Run (or reuse) the scan; refuses data with evaluation problems in it."""
    from apps.bolt.em import _stamp

    cfg = driver.cfg
    path = driver.root / SCAN
    stamps = {c: _stamp(driver.data / driver.source(c)) for c in cfg.conditions}

    def done() -> bool:
        if not path.is_file():
            return False
        saved = json.loads(path.read_text())
        return saved.get("train_tokens") == cfg.train_tokens and saved.get("leakage_check") == cfg.leakage_check and \
            {c: v.get("stamp") for c, v in saved["conditions"].items()} == stamps

    def work() -> None:
        scanner = None
        if cfg.leakage_check:
            module, _, name = cfg.leakage_check.partition(":")
            scanner = getattr(importlib.import_module(module), name)(driver.data / "eval")
        result = {**measure(driver, tokenizer_args, scanner), "leakage_check": cfg.leakage_check}
        atomic_write_json(path, result)

    driver.em._stage("scan", done, work)
    result = json.loads(path.read_text())
    leaks = {c: v["leakage"]["eval_problems_found"] for c, v in result["conditions"].items() if v.get("leakage", {}).get("eval_problems_found")}
    if leaks:
        raise RuntimeError(f"evaluation problems found in the training data: {leaks} (see {path})")
    return result
