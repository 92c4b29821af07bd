"""Teacher latents: ``python -m apps.bolt.gen_latents method=M backend=B src=DIR out=DIR [key=value ...]``.

Methods (prompts in ``apps/bolt/configs/prompts/<method>.yaml``): ``latent_thoughts`` (per chunk
of each document: the reference's chunking, sentence units 8/1/20, seed 42, prefix = the previous
chunk), ``wrap_baseline`` and ``wrap_cot`` (whole documents, with repeats). Backends: ``oracle``
(the synthetic world's true latents), ``openai_batch``, ``openai_chat`` or any registered teacher.

Work is split into shards: ``shard=i num_shards=N`` processes one contiguous slice of the
documents (``bin/gen_latents.sh launch ... shards=N`` submits all of them), then ``merge=true``
checks that every shard is complete and writes the dataset. Without ``shard`` all shards run
here one after the other and the merge follows. Folder layout::

    out/<source file name>.jsonl     the latent dataset (one output file per source file)
    out/lineage.json                 provenance, counts, tokens, estimated cost
    out/config.yaml, out/COMPLETE    resolved config; marker written last
    out/_work/cache.sqlite           response cache of the API backends (shared by shards)
    out/_work/shard_IIIII_of_NNNNN/  records, index, report, log, batch ledger, COMPLETE

Reruns are idempotent: complete shards are skipped, and an interrupted shard asks its teacher
only for what the cache does not hold (an open OpenAI batch is polled, never paid twice).
API keys come from the environment or ``.env`` and are never written anywhere (see
``docs/teachers.md``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from apps.bolt.chunking import ChunkArgs
from apps.bolt.teachers import dataset as ds
from apps.bolt.teachers.api import ApiArgs, PriceArgs, Redactor, RedactingFilter, resolve_api_key
from apps.bolt.teachers.base import build_teacher, check_responses
from apps.bolt.teachers.openai_batch import BatchArgs
from apps.bolt.teachers.openai_chat import ChatArgs
from apps.bolt.teachers.prompts import METHODS, SYSTEM_ROLES, PromptSpec, Sampling
from apps.bolt.teachers.shards import merge_shards, write_shard_records
from lingua.args import check_min, cli_config, dump_config, to_dict
from lingua.errors import add_redactor, entry_point
from lingua.io import atomic_write_json, file_listing, is_done, mark_done
from lingua.locks import RunLock
from lingua.sample_store import make_key

logger = logging.getLogger("apps.bolt.gen_latents")
API_BACKENDS = ("openai_batch", "openai_chat")
WORK = "_work"


@dataclass
class GenLatentsArgs:
    method: str = "latent_thoughts"
    """``latent_thoughts`` | ``wrap_baseline`` | ``wrap_cot``."""
    backend: str = "oracle"
    """``oracle`` | ``openai_batch`` | ``openai_chat`` | any name given to ``register_teacher``."""
    src: str = ""
    """Source dataset folder (``*.jsonl`` files, read in sorted order)."""
    out: str = ""
    """Output dataset folder."""
    prompt_file: str = ""
    """Prompt config; empty: ``apps/bolt/configs/prompts/<method>.yaml``."""
    model: Optional[str] = None
    """Teacher model; None: the method's default (the reference's gpt-4o-mini-2024-07-18)."""
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    num_repeats: Optional[int] = None
    """Generations per unit; None: the method's default (1, WRAP-Orig 5, WRAP-CoT 4)."""
    system_role: str = "auto"
    """``auto`` (system message for GPT models, else prepended to the user message, as in the
    reference), ``system`` or ``user``."""
    seed: int = 42
    """Seeds the WRAP template choice and the order of repeated passes."""
    text_key: str = "text"
    chunk: ChunkArgs = field(default_factory=ChunkArgs)
    """Chunking of ``latent_thoughts`` (reference defaults)."""
    store_prefix: bool = False
    """Also store each chunk's prefix (the reference does not: it is the previous suffix)."""
    shard: Optional[int] = None
    num_shards: int = 1
    merge: bool = False
    """Only merge finished shards into the dataset."""
    limit: int = 0
    """Debug: at most this many documents per shard (0: all)."""
    max_failures: float = 0.0
    """Share of a shard's requests that may fail for good; their latent is "" with an ``error``
    field. Above it the shard fails (successes stay cached; a rerun resends only the failures)."""
    cache_path: str = ""
    """Response cache of the API backends; empty: ``out/_work/cache.sqlite``. May contain
    ``{shard}`` (one file per shard, for file systems without SQLite WAL support)."""
    api: ApiArgs = field(default_factory=ApiArgs)
    batch: BatchArgs = field(default_factory=BatchArgs)
    chat: ChatArgs = field(default_factory=ChatArgs)
    prices: PriceArgs = field(default_factory=PriceArgs)
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for non-API teachers."""
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.src or not self.out:
            raise ValueError("src=DIR and out=DIR are required")
        if Path(self.src).resolve() == Path(self.out).resolve():
            raise ValueError("out must differ from src")
        if self.num_shards < 1 or (self.shard is not None and not 0 <= self.shard < self.num_shards):
            raise ValueError(f"need num_shards >= 1 and 0 <= shard < num_shards, got shard={self.shard} num_shards={self.num_shards}")
        if self.merge and self.shard is not None:
            raise ValueError("merge=true merges all shards; do not pass shard")
        if self.system_role not in SYSTEM_ROLES:
            raise ValueError(f"system_role must be one of {SYSTEM_ROLES}")
        if not 0.0 <= self.max_failures <= 1.0 or self.limit < 0:
            raise ValueError("need 0 <= max_failures <= 1 and limit >= 0")
        check_min(self, 1, "num_repeats", "max_tokens")

    def prompt(self) -> PromptSpec:
        return PromptSpec.load(self.prompt_file) if self.prompt_file else PromptSpec.for_method(self.method)

    def sampling(self, spec: PromptSpec) -> Sampling:
        d = spec.defaults
        return Sampling(
            model=self.model if self.model is not None else d.model,
            max_tokens=self.max_tokens if self.max_tokens is not None else d.max_tokens,
            temperature=self.temperature if self.temperature is not None else d.temperature,
        )

    def repeats(self, spec: PromptSpec) -> int:
        return self.num_repeats if self.num_repeats is not None else spec.defaults.num_repeats


@dataclass
class Job:
    """Everything derived once from the config."""

    cfg: GenLatentsArgs
    spec: PromptSpec
    sampling: Sampling
    num_repeats: int
    files: list[Path]
    out: Path
    fingerprint: str

    def shard_dir(self, shard: int) -> Path:
        return self.out / WORK / f"shard_{shard:05d}_of_{self.cfg.num_shards:05d}"

    @property
    def provenance(self) -> dict:
        api = self.cfg.backend in API_BACKENDS
        return {
            "method": self.cfg.method,
            "backend": self.cfg.backend,
            "model": self.sampling.model if api else self.cfg.backend,
            "prompt": self.spec.ident if api else None,
        }


def make_job(cfg: GenLatentsArgs) -> Job:
    spec = cfg.prompt()
    sampling = cfg.sampling(spec)
    files = ds.list_source_files(cfg.src)
    determining = {
        "method": cfg.method, "backend": cfg.backend, "prompt_sha256": spec.sha256, "sampling": asdict(sampling),
        "num_repeats": cfg.repeats(spec), "system_role": cfg.system_role, "seed": cfg.seed, "text_key": cfg.text_key,
        "chunk": asdict(cfg.chunk), "store_prefix": cfg.store_prefix, "num_shards": cfg.num_shards, "limit": cfg.limit,
        "teacher_kwargs": dict(cfg.teacher_kwargs), "src": file_listing(files, cfg.src, mtime=False),
    }
    return Job(cfg, spec, sampling, cfg.repeats(spec), files, Path(cfg.out), make_key(**determining))


# -- logging ----------------------------------------------------------------------------------
def _redactor(cfg: GenLatentsArgs) -> Redactor:
    """Scrubs the API key from logs; without a key (a merge needs none) only key-shaped text."""
    if cfg.backend not in API_BACKENDS:
        return Redactor()
    try:
        return Redactor(resolve_api_key(cfg.api))
    except (RuntimeError, FileNotFoundError):
        return Redactor()


class _LogTo:
    """Route this module's and the teachers' logs to stderr and a file, redacted, for one run.
    They do not also go up to the root logger: its console handler (``cli_config``'s) would print
    every line a second time, unredacted."""

    def __init__(self, path: Path | None, redactor: Redactor):
        self.handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handlers.append(logging.FileHandler(path, encoding="utf-8"))
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        for h in self.handlers:
            h.setFormatter(fmt)
            h.addFilter(RedactingFilter(redactor))
        self.redactor = redactor
        self.logger = logging.getLogger("apps.bolt")
        self._level, self._propagate = self.logger.level, self.logger.propagate

    def __enter__(self) -> "_LogTo":
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        for h in self.handlers:
            self.logger.addHandler(h)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, Exception) and len(self.handlers) > 1:
            # The redacted traceback goes to the log file only; the console gets the entry point's one line.
            text = self.redactor("gen_latents failed\n" + "".join(traceback.format_exception(exc)))
            self.handlers[1].handle(self.logger.makeRecord(logger.name, logging.ERROR, __file__, 0, text, None, None))
        for h in self.handlers:
            self.logger.removeHandler(h)
            h.close()
        self.logger.setLevel(self._level)
        self.logger.propagate = self._propagate


# -- one shard --------------------------------------------------------------------------------
def _teacher(job: Job, shard: int):
    cfg = job.cfg
    if cfg.backend not in API_BACKENDS:
        return build_teacher(cfg.backend, method=cfg.method, src=cfg.src, seed=cfg.seed, **cfg.teacher_kwargs)
    cache = cfg.cache_path.format(shard=shard) if cfg.cache_path else str(job.out / WORK / "cache.sqlite")
    kwargs = dict(
        prompt=job.spec, sampling=job.sampling, api=cfg.api, prices=cfg.prices, cache_path=cache,
        work_dir=job.shard_dir(shard), seed=cfg.seed, system_role=cfg.system_role, progress=cfg.progress,
    )
    if cfg.backend == "openai_batch":
        kwargs["batch"] = cfg.batch
    else:
        kwargs["chat"] = cfg.chat
    return build_teacher(cfg.backend, **kwargs)


def run_shard(job: Job, shard: int) -> dict:
    """Generate one shard's records (skipped when already complete); returns its report."""
    cfg, folder = job.cfg, job.shard_dir(shard)
    if is_done(folder):
        info = json.loads((folder / "COMPLETE").read_text())
        if info.get("fingerprint") != job.fingerprint:
            raise RuntimeError(f"{folder} was made with different settings; use another out= folder or delete it")
        logger.info("shard %d/%d already complete, skipped", shard, cfg.num_shards)
        return info["report"]
    folder.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, folder / "config.yaml")
    counts = ds.count_documents(job.files)
    start, stop = ds.shard_range(sum(counts), shard, cfg.num_shards)
    if cfg.limit:
        stop = min(stop, start + cfg.limit)
    docs = list(ds.read_documents(job.files, start, stop, cfg.text_key))
    ids = [ds.doc_id(d, job.files) for d in docs]
    plan = ds.plan_requests(docs, ids, chunked=job.spec.chunked, chunk_args=cfg.chunk,
                            num_repeats=job.num_repeats, text_key=cfg.text_key)
    logger.info("shard %d/%d: documents %d..%d (%d), %d requests", shard, cfg.num_shards, start, stop, len(docs), len(plan.requests))
    t0 = time.monotonic()
    teacher = _teacher(job, shard)
    try:
        responses = teacher.complete(plan.requests)
    finally:
        if hasattr(teacher, "close"):
            teacher.close()
    check_responses(plan.requests, responses, cfg.backend)
    failed = [r for r in responses if not r.ok]
    if len(failed) > cfg.max_failures * len(responses):
        raise RuntimeError(
            f"shard {shard}: {len(failed)} of {len(responses)} requests failed (first: {failed[0].error}); "
            f"max_failures={cfg.max_failures}. Rerun to resend only the failed ones."
        )
    records = ds.build_records(docs, plan, responses, chunked=job.spec.chunked,
                               provenance=job.provenance, store_prefix=cfg.store_prefix)
    report = write_shard_records(folder, records, job.num_repeats)
    report.update(
        text_chars=sum(len(d.record[cfg.text_key]) for d in docs),
        documents=len(docs), requests=len(plan.requests), failed=len(failed), seconds=round(time.monotonic() - t0, 3),
        teacher=getattr(teacher, "last_report", None) or _local_teacher_report(cfg.backend, responses),
    )
    atomic_write_json(folder / "report.json", report)
    mark_done(folder, {"fingerprint": job.fingerprint, "report": report})
    logger.info("shard %d/%d done: %s", shard, cfg.num_shards, _summary(report))
    return report


def _local_teacher_report(backend: str, responses) -> dict:
    """Counts for teachers without their own report (in-process ones cost nothing). Integer
    usage entries are summed, so a teacher's own counters (the oracle's) reach the lineage."""
    usage_totals: Counter = Counter()
    for r in responses:
        usage_totals.update({k: v for k, v in r.usage.items() if isinstance(v, int)})
    return {
        "backend": backend,
        "requests": len(responses),
        "sent": len(responses),
        "succeeded": sum(r.ok for r in responses),
        "failed": sum(not r.ok for r in responses),
        "truncated": sum(r.finish_reason == "length" for r in responses),
        "input_tokens": sum(int(r.usage.get("input_tokens", 0)) for r in responses),
        "output_tokens": sum(int(r.usage.get("output_tokens", 0)) for r in responses),
        "estimated_cost_usd": 0.0,
        "usage_totals": dict(usage_totals),
    }


def _summary(report: dict) -> str:
    t = report.get("teacher", {})
    return (
        f"{report.get('documents', 0)} docs, {report.get('latents', 0)} latents, {report.get('failed', 0)} failed, "
        f"cache hits {t.get('cache_hits', 0)}, in/out tokens {t.get('input_tokens', 0)}/{t.get('output_tokens', 0)}, "
        f"est. cost ${t.get('estimated_cost_usd', 0.0):.4f}"
    )


# -- merge ------------------------------------------------------------------------------------
def merge(job: Job) -> dict:
    """Check that every shard is complete and made with these settings, then write the dataset,
    the lineage file and the completion marker."""
    cfg = job.cfg
    dirs = [job.shard_dir(i) for i in range(cfg.num_shards)]
    missing = [i for i, d in enumerate(dirs) if not is_done(d)]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise RuntimeError(f"merge refused: {len(missing)} of {cfg.num_shards} shards incomplete ({shown}); "
                           f"run them with shard=i num_shards={cfg.num_shards}")
    reports = []
    for d in dirs:
        info = json.loads((d / "COMPLETE").read_text())
        if info.get("fingerprint") != job.fingerprint:
            raise RuntimeError(f"merge refused: {d} was made with different settings")
        reports.append(info["report"])
    written = merge_shards(dirs, [p.name for p in job.files], job.out, job.num_repeats, cfg.seed)
    lineage = _lineage(job, reports, written)
    atomic_write_json(job.out / "lineage.json", lineage)
    dump_config(cfg, job.out / "config.yaml")
    mark_done(job.out, {"fingerprint": job.fingerprint, "records": sum(written.values())})
    logger.info("merged %d shard(s) into %s: %d records", cfg.num_shards, job.out, sum(written.values()))
    return lineage


def _lineage(job: Job, reports: list[dict], written: dict) -> dict:
    cfg = job.cfg
    teacher_keys = ("requests", "cache_hits", "sent", "succeeded", "failed", "truncated", "retried",
                    "input_tokens", "output_tokens", "cached_input_tokens", "cached_output_tokens", "estimated_cost_usd")
    totals = {k: sum(r.get("teacher", {}).get(k, 0) for r in reports) for k in teacher_keys}
    usage: Counter = Counter()
    for r in reports:
        usage.update(r.get("teacher", {}).get("usage_totals", {}))
    if usage:
        totals["usage_totals"] = dict(usage)
    counts = {k: sum(r.get(k, 0) for r in reports) for k in ("documents", "requests", "failed", "latents", "latent_chars", "text_chars", "truncated")}
    return {
        "dataset": str(job.out),
        "source": {"folder": str(Path(cfg.src).resolve()), "files": file_listing(job.files, cfg.src, mtime=False)},
        "outputs": written,
        "method": cfg.method,
        "backend": cfg.backend,
        "prompt": {"id": job.spec.ident, "file": job.spec.path, "sha256": job.spec.sha256} if cfg.backend in API_BACKENDS else None,
        "sampling": asdict(job.sampling) if cfg.backend in API_BACKENDS else None,
        "num_repeats": job.num_repeats,
        "chunking": asdict(cfg.chunk) if job.spec.chunked else None,
        "seed": cfg.seed,
        "num_shards": cfg.num_shards,
        "fingerprint": job.fingerprint,
        "counts": counts,
        "latent_to_text_char_ratio": round(counts["latent_chars"] / max(1, counts["text_chars"] * job.num_repeats), 4),
        "teacher_totals": totals,
        "config": to_dict(cfg),
        "created_unix": int(time.time()),
    }


# -- entry point ------------------------------------------------------------------------------
def run(cfg: GenLatentsArgs) -> dict:
    """Run one shard, all shards plus the merge, or only the merge; returns a summary dict."""
    job = make_job(cfg)
    redactor = _redactor(cfg)
    name = "merge" if cfg.merge else "run" if cfg.shard is None else f"shard_{cfg.shard:05d}_of_{cfg.num_shards:05d}"
    log_file = job.out / WORK / f"{name}.log"
    with _LogTo(log_file, redactor):
        print(dump_config(cfg), file=sys.stderr)
        if is_done(job.out):
            if json.loads((job.out / "COMPLETE").read_text()).get("fingerprint") != job.fingerprint:
                raise RuntimeError(f"{job.out} holds a dataset made with different settings; choose another out=")
            logger.info("%s is already complete; nothing to do", job.out)
            return {"status": "complete", "lineage": json.loads((job.out / "lineage.json").read_text())}
        if cfg.merge:
            with _lock(job):
                return {"status": "merged", "lineage": merge(job)}
        shards = [cfg.shard] if cfg.shard is not None else list(range(cfg.num_shards))
        reports = []
        for i in shards:
            with _lock(job, i):
                reports.append(run_shard(job, i))
        if cfg.shard is not None:
            return {"status": "shard_done", "reports": reports}
        with _lock(job):
            return {"status": "merged", "lineage": merge(job)}


def _lock(job: Job, shard: int | None = None) -> RunLock:
    """The lock of one shard (``out/_work/shard_i_of_N.lock``: the shards of one run may run side
    by side, two processes writing the same shard may not) or of the merge (``out/.lock``)."""
    if shard is None:
        return RunLock(job.out, "gen_latents merge")
    return RunLock.beside(job.shard_dir(shard), f"gen_latents shard {shard}/{job.cfg.num_shards}")


@entry_point("apps.bolt.gen_latents")
def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(GenLatentsArgs, argv, "apps.bolt.gen_latents")
    add_redactor(_redactor(cfg))  # the error handler's message and traceback name no API key
    result = run(cfg)
    if "lineage" in result:
        lin = result["lineage"]
        print(json.dumps({"status": result["status"], "counts": lin["counts"], "teacher_totals": lin["teacher_totals"]}, indent=2))
    else:
        print(json.dumps({"status": result["status"], "reports": [_summary(r) for r in result["reports"]]}, indent=2))


if __name__ == "__main__":
    main()
