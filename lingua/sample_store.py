"""A crash-safe, append-mostly store of samples keyed by (request key, sample index).

Used wherever expensive samples are drawn (E-step posterior samples, teacher API responses):
the key is a hash of everything that determines the distribution (model fingerprint, full
prompt, sampling parameters); the index is the sample number under that key. Raising the number
of samples later only draws the missing indices; a killed run loses at most its uncommitted
batch and never duplicates a sample (``(key, idx)`` is the primary key).

SQLite in WAL mode with a busy timeout, so several processes (shards) can share one file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Sequence

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    key   TEXT    NOT NULL,
    idx   INTEGER NOT NULL,
    value TEXT    NOT NULL,
    created REAL  NOT NULL,
    PRIMARY KEY (key, idx)
) WITHOUT ROWID;
"""


def make_key(**parts) -> str:
    """Stable hash of the parts that determine a sample's distribution."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class SampleStore:
    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        self._conn.executescript(_SCHEMA)

    # reads --------------------------------------------------------------------------------
    def get(self, key: str) -> list[dict]:
        return self.get_many([key]).get(key, [])

    def get_many(self, keys: Sequence[str], chunk: int = 500) -> dict[str, list[dict]]:
        """Samples per key, ordered by index (only the contiguous run 0..n-1 is returned, so a
        hole left by an interrupted write is refilled rather than skipped)."""
        out: dict[str, list[dict]] = {}
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), chunk):
            part = uniq[i : i + chunk]
            marks = ",".join("?" * len(part))
            rows = self._conn.execute(
                f"SELECT key, idx, value FROM samples WHERE key IN ({marks}) ORDER BY key, idx", part
            ).fetchall()
            for key, idx, value in rows:
                lst = out.setdefault(key, [])
                if idx == len(lst):
                    lst.append(json.loads(value))
        return out

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    # writes -------------------------------------------------------------------------------
    def put_many(self, items: Iterable[tuple[str, int, dict]]) -> int:
        """Insert samples in one transaction; an existing (key, idx) is kept (first write wins)."""
        rows = [(k, int(i), json.dumps(v, ensure_ascii=False), time.time()) for k, i, v in items]
        if not rows:
            return 0
        for attempt in range(20):
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                cur = self._conn.executemany(
                    "INSERT OR IGNORE INTO samples (key, idx, value, created) VALUES (?, ?, ?, ?)", rows
                )
                self._conn.execute("COMMIT")
                return cur.rowcount
            except sqlite3.OperationalError as e:  # pragma: no cover - contention path
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if "locked" not in str(e) or attempt == 19:
                    raise
                time.sleep(min(2.0, 0.05 * 2**attempt))
        return 0  # pragma: no cover

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "SampleStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
