"""Response cache of the API teachers, on top of :class:`lingua.sample_store.SampleStore`.

Keys come from :class:`apps.bolt.teachers.prompts.RequestBuilder` (model, full messages,
sampling params, repeat index), so the repeat index is part of the key and every response sits
at sample index 0. Only successful responses are stored: failures are retried on the next run.

The store is SQLite in WAL mode with a busy timeout, so several shard processes on one machine
may share one file. WAL needs shared memory: on a network file system give each shard its own
file (``cache_path`` with ``{shard}`` in it, see ``apps.bolt.gen_latents``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from apps.bolt.teachers.base import LatentResponse
from lingua.sample_store import SampleStore


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._store = SampleStore(self.path)

    def get_many(self, keys: Sequence[str]) -> dict[str, LatentResponse]:
        found = self._store.get_many(keys)
        return {
            key: LatentResponse(latent=v["latent"], finish_reason=v["finish_reason"], usage=dict(v["usage"]))
            for key, values in found.items()
            for v in values[:1]
        }

    def put_many(self, items: Iterable[tuple[str, LatentResponse]]) -> int:
        """Store successful responses (first write wins); returns how many rows were new."""
        rows = [
            (key, 0, {"latent": r.latent, "finish_reason": r.finish_reason, "usage": r.usage})
            for key, r in items
            if r.ok
        ]
        return self._store.put_many(rows)

    def __len__(self) -> int:
        return self._store.count()

    def close(self) -> None:
        self._store.close()
