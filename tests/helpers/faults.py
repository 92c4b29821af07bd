"""The subprocess side of tests/test_faults.py: run a stage's ``main`` with faults planted.

    python -m tests.helpers.faults STAGE [--pause] [--enospc DIR] [--list DIR] -- ARGS...

``STAGE`` is ``train``, ``estep``, ``gen_latents`` or ``prepare`` (``apps.bolt.<STAGE>.main``).

* ``--pause``: at a point in the middle of the work (while the stage holds its lock), print
  ``@@paused`` and sleep until killed: training before the final consolidated folder's marker,
  the E-step after its first batch of chunks, gen_latents in its teacher, prepare while staging.
* ``--enospc DIR``: a full disk without a small file system: ``os.fsync`` of any file under
  ``DIR`` fails with ``ENOSPC`` (where NFS reports it, and what every atomic writer and DCP call).
* ``--list DIR``: when ``main`` ends, print ``@@listing`` and a JSON list of the files under
  ``DIR`` (a tmpfs vanishes with the process, so the test reads what was left from here).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

from apps.bolt.teachers import LatentResponse, register_teacher

PAUSE_ENV = "FAULT_PAUSE"


def pause() -> None:
    """When asked to (``FAULT_PAUSE`` set), say so and wait to be killed."""
    if os.environ.get(PAUSE_ENV):
        print("@@paused", flush=True)
        time.sleep(600)


class PausingTeacher:
    """A deterministic in-process teacher (its latent names the request) that pauses first."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def complete(self, requests):
        pause()
        return [LatentResponse(f"thought {r.doc_id}/{r.chunk_idx}/{r.repeat}", "stop", {"output_tokens": 3})
                for r in requests]


register_teacher("pausing_echo", PausingTeacher)


def corpus(num_docs: int, seed: int = 0):
    """A generator source for prepare that pauses half way through."""
    for i in range(num_docs):
        if i == num_docs // 2:
            pause()
        yield {"id": f"d{seed}-{i}", "text": f"Doc {i}. " + "word " * ((i * 7 + seed) % 23)}


def _plant_pause(stage: str) -> None:
    if stage == "train":
        import lingua.consolidated as consolidated

        real = consolidated.mark_done

        def mark_done(folder, info=None):
            pause()
            real(folder, info)

        consolidated.mark_done = mark_done
    elif stage == "estep":
        from apps.bolt import posterior

        real_run = posterior.PosteriorSampler.run

        def run(self, chunks):
            out = real_run(self, chunks)
            pause()
            return out

        posterior.PosteriorSampler.run = run


def _plant_enospc(folder: Path) -> None:
    real = os.fsync
    root = str(folder.resolve())

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        except OSError:
            path = ""
        if path.startswith(root):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    os.fsync = fsync


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def main(argv: list[str]) -> int:
    cut = argv.index("--")
    opts, args = argv[:cut], argv[cut + 1:]
    stage = opts[0]
    if "--pause" in opts:
        os.environ[PAUSE_ENV] = "1"
        _plant_pause(stage)
    if "--enospc" in opts:
        _plant_enospc(Path(opts[opts.index("--enospc") + 1]))
    listed = Path(opts[opts.index("--list") + 1]) if "--list" in opts else None
    import importlib

    code = 0
    try:
        importlib.import_module(f"apps.bolt.{stage}").main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        if listed is not None:
            print("@@listing " + json.dumps(_listing(listed)), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
