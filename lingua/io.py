"""Small file helpers shared by every stage: the one atomic writer, completion markers, the one
reader of JSONL documents and the listing that fingerprints a stage's input files.

Writing
    :func:`atomic_path` is the only temp-file-then-rename writer: a temp file beside the target,
    fsynced, given the mode a plain ``open`` would give it (``0o666 & ~umask``; ``mkstemp`` makes
    0600) and renamed over the target on success, deleted on failure. :func:`atomic_open` and the
    ``atomic_write_*`` helpers are built on it; :func:`atomic_dir` does the same for a folder.

Reading documents
    :func:`read_docs` yields the documents of a ``*.jsonl`` file or folder (files in sorted name
    order, then line order). A bad line (invalid UTF-8, malformed JSON, not an object, no string
    text field, optionally blank text) raises :class:`BadRecord` naming ``file:line`` under
    ``strict``; otherwise it is skipped, counted by reason in a :class:`Skipped` and logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

DONE_MARKER = "COMPLETE"
logger = logging.getLogger("lingua.io")
_UMASK_LOCK = threading.Lock()


# ------------------------------------------------------------------------------ permissions


def current_umask() -> int:
    """The process umask: read from ``/proc/self/status`` where Linux offers it (no side effect,
    safe with threads), else set and restored at once under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir()`` gives a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


# ---------------------------------------------------------------------------------- writing


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for any writer (``torch.save``, safetensors, ...).

    When the block succeeds the temp file is fsynced, given the umask's mode and renamed over
    ``path``; when it fails (or is interrupted) the temp file is deleted and ``path`` is left as
    it was. The folder of ``path`` is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` for writing through :func:`atomic_path`: readers see the old file or
    the complete new one, never a part."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a new file; mode must start with 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


@contextmanager
def atomic_dir(
    final: str | os.PathLike,
    *,
    tmp: str | os.PathLike | None = None,
    clear: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Fill a folder under a temporary name beside ``final``, then rename it into place.

    Yields an empty folder with the umask's mode: a fresh ``.<name>.XXXX.tmp``, or ``tmp`` when
    the caller owns a fixed name (a killed run's leftovers there are removed first). When the
    block succeeds, an existing ``final`` is handed to ``clear``, which removes it and returns
    True, returns False to keep it (the new folder is dropped: e.g. a concurrent build of the same
    content won), or raises; without ``clear`` an existing ``final`` is an error. When the block
    fails the temporary folder is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(work, dir_mode())  # mkdtemp makes 0700
    else:
        work = Path(tmp)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    try:
        yield work
        if final.exists() and not _clear(final, clear):
            return
        try:
            os.replace(work, final)
        except OSError:  # another writer published ``final`` between the check and the rename
            if final.exists() and clear is not None and not clear(final):
                return
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _clear(final: Path, clear: Callable[[Path], bool] | None) -> bool:
    if clear is None:
        raise FileExistsError(f"{final} already exists; move it away first")
    return clear(final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Atomically write records as JSON lines; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike, strict: bool = True) -> Iterator[dict]:
    """Yield records; a malformed line raises (strict) naming ``file:line``, else is skipped."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if strict:
                    raise ValueError(f"{path}:{lineno}: malformed JSON line: {e}") from e


def mark_done(folder: str | os.PathLike, info: dict | None = None) -> None:
    """Write the completion marker of ``folder``; always the last write of a stage."""
    atomic_write_json(Path(folder) / DONE_MARKER, info or {})


def is_done(folder: str | os.PathLike) -> bool:
    return (Path(folder) / DONE_MARKER).is_file()


# ------------------------------------------------------------------------ reading documents


class BadRecord(ValueError):
    """A bad line met by :func:`read_docs` under ``strict``; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Doc:
    """One document of a JSONL source and where it stands."""

    file_idx: int
    """Index of its file in the sorted listing."""
    path: Path
    line: int
    """1-based line number in its file."""
    record: dict

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Skipped:
    """Bad lines met while reading, counted by reason; the first few named by ``file:line``."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, where: str, reason: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {reason}")
            logger.warning("%s: %s; line skipped", where, reason)

    def as_dict(self) -> dict:
        return {"total": self.total, "reasons": dict(sorted(self.counts.items())), "examples": list(self.examples)}

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items())) or "none"


def jsonl_files(src: str | os.PathLike) -> list[Path]:
    """``src`` itself when it is a file, else the ``*.jsonl`` files of the folder ``src`` in sorted
    name order; a clear error when there are none."""
    p = Path(src)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.glob("*.jsonl") if f.is_file()) if p.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in {p}" + ("" if p.is_dir() else " (no such folder)"))
    return files


def jsonl_lines(files: Sequence[Path], start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Path, int, bytes]]:
    """``(file index, file, 1-based line, raw bytes)`` of the non-blank lines of ``files``, numbered
    globally from 0 in file order; only those numbered in ``[start, stop)``."""
    index = 0
    for file_idx, path in enumerate(files):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if stop is not None and index >= stop:
                    return
                if index >= start:
                    yield file_idx, path, lineno, raw
                index += 1


def text_problem(record: Any, text_key: str, nonblank: bool = True) -> str:
    """Why ``record`` is not a document (``""`` when it is one)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    text = record.get(text_key)
    if not isinstance(text, str):
        return f"no string field {text_key!r}"
    if nonblank and not text.strip():
        return "blank text"
    return ""


def parse_doc(raw: bytes, text_key: str, nonblank: bool = True) -> tuple[Any, str]:
    """``(record, "")`` for a good JSONL line, ``(record or None, reason)`` for a bad one."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "invalid UTF-8"
    except json.JSONDecodeError:
        return None, "malformed JSON"
    return record, text_problem(record, text_key, nonblank)


def read_docs(
    src: str | os.PathLike | Sequence[Path],
    text_key: str = "text",
    *,
    limit: int | None = None,
    start: int = 0,
    stop: int | None = None,
    strict: bool = False,
    nonblank: bool = False,
    skipped: Skipped | None = None,
) -> Iterator[Doc]:
    """The documents of a JSONL file or folder (or of the given files), in global order.

    ``limit``: at most that many documents (None or 0: all; negative: an error). ``start`` and
    ``stop`` select by position among the non-blank lines, good or bad (contiguous shards whose
    bounds do not depend on the content). A bad line raises :class:`BadRecord` under ``strict``;
    else it is counted in ``skipped`` (the first few logged by ``file:line``) and a summary is
    logged when reading ends."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 (0 or None: all documents), got {limit}")
    files = jsonl_files(src) if isinstance(src, (str, os.PathLike)) else list(src)
    skipped = skipped if skipped is not None else Skipped()
    before, n = skipped.total, 0
    try:
        for file_idx, path, lineno, raw in jsonl_lines(files, start, stop):
            record, reason = parse_doc(raw, text_key, nonblank)
            if reason:
                if strict:
                    raise BadRecord(f"{path}:{lineno}: {reason}")
                skipped.add(f"{path}:{lineno}", reason)
                continue
            yield Doc(file_idx, path, lineno, record)
            n += 1
            if limit and n >= limit:
                return
    finally:
        if skipped.total > before:
            logger.warning("skipped %d bad line(s) of %s (%s)", skipped.total - before,
                           files[0].parent if len(files) > 1 else files[0], skipped.summary())


# --------------------------------------------------------------------------- input listing


def file_listing(files: Iterable[Path], root: str | os.PathLike | None = None, *, mtime: bool = True) -> list[list]:
    """``[name, size]`` (plus ``mtime_ns`` unless ``mtime=False``) per file: what a stage records
    of its input files so that a changed input is noticed (appended or removed lines change the
    size, an edit in place the mtime). ``name`` is relative to ``root`` when given."""
    out = []
    for f in files:
        st = Path(f).stat()
        name = str(Path(f).relative_to(root)) if root is not None else str(f)
        out.append([name, st.st_size, st.st_mtime_ns] if mtime else [name, st.st_size])
    return out


def listing_changes(old: Sequence[Sequence], new: Sequence[Sequence]) -> list[str]:
    """What differs between two :func:`file_listing` results, one phrase per file."""
    a, b = {e[0]: list(e[1:]) for e in old}, {e[0]: list(e[1:]) for e in new}
    changes = [f"{name} removed" for name in a if name not in b]
    changes += [f"{name} added" for name in b if name not in a]
    for name in a.keys() & b.keys():
        if a[name][0] != b[name][0]:
            changes.append(f"{name} changed size ({a[name][0]} -> {b[name][0]} bytes)")
        elif a[name] != b[name]:
            changes.append(f"{name} modified (same size, new modification time)")
    return sorted(changes)
