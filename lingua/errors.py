"""One top-level error handler for every entry point (``@entry_point("apps.bolt.train")`` on ``main``).

An *expected* failure -- something the user can fix: a configuration error, a missing or
unwritable file or folder, a full disk, a held lock, a check of the input that failed -- prints one
line ``PROG: error: MESSAGE`` on stderr and exits 1 (a configuration error: 2). Its full traceback
goes to the log files the run opened (:func:`lingua.logger.run_log_files`), and to the console too
with ``--debug`` on the command line or ``LINGUA_DEBUG=1`` in the environment. Anything else is a
bug: its traceback is printed (and logged) and the exit status is 1. Ctrl-C prints one line and
exits 130.

Expected means one of:

* an :class:`ExpectedError` (subclass it for failures the user must act on, e.g. a held lock)
  or a :class:`lingua.args.ConfigError`;
* an ``OSError`` about a path the user gave: not found, not a folder, a file where a folder is
  needed, no permission, read-only file system, no space left, over quota, name too long;
* a ``ValueError``, ``RuntimeError`` or ``OSError`` raised by an explicit ``raise`` statement in
  this project's own code -- the checks of the input, which already say what is wrong. The same
  types raised inside a library or by a built-in (``range() arg 3 must not be zero``) are bugs
  or missing checks, so they keep their traceback.
"""

from __future__ import annotations

import datetime
import errno
import functools
import linecache
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from lingua.args import ConfigError

F = TypeVar("F", bound=Callable)

DEBUG_FLAG = "--debug"
DEBUG_ENV = "LINGUA_DEBUG"
EXIT_ERROR, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130

_PROJECT = Path(__file__).resolve().parent.parent
_USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM,
                errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ENOTEMPTY}
_redactors: list[Callable[[str], str]] = []


class ExpectedError(RuntimeError):
    """A failure the user must act on (bad input, unreachable server, a run folder held by
    another process); entry points print its message as one ``error:`` line, no traceback."""


def add_redactor(redact: Callable[[str], str]) -> None:
    """Scrub secrets (an API key) from what the handler prints and logs, until this entry point returns."""
    _redactors.append(redact)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` among the entry point's own arguments, or ``LINGUA_DEBUG`` set to a true value."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return DEBUG_FLAG in _own_args(argv or [])


def _own_args(argv: Sequence[str]) -> list[str]:
    """The arguments before ``--`` (what follows belongs to a command the entry point launches)."""
    argv = list(argv)
    return argv[: argv.index("--")] if "--" in argv else argv


def _strip_debug(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return [a for a in argv[:cut] if a != DEBUG_FLAG] + argv[cut:]


def _raised_by_a_check(e: BaseException) -> bool:
    """True when ``e`` comes from a ``raise`` statement in this project's own code."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        inside = Path(filename).resolve().is_relative_to(_PROJECT) and "site-packages" not in filename
    except (OSError, ValueError):
        return False
    return inside and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def is_expected(e: BaseException) -> bool:
    if isinstance(e, (ExpectedError, ConfigError)):
        return True
    if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
        return True
    return isinstance(e, (ValueError, RuntimeError, OSError)) and _raised_by_a_check(e)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; an ``OSError`` as ``PATH: reason``."""
    if isinstance(e, FileExistsError) and e.filename is not None and Path(e.filename).is_file():
        text = f"{e.filename}: is a file, a folder is needed here"
    elif isinstance(e, OSError) and e.strerror and e.filename is not None:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        text = f"{where}: {e.strerror}"
    else:
        text = str(e).strip() or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _redact(text: str) -> str:
    for r in _redactors:
        text = r(text)
    return text


def _log_traceback(prog: str, text: str, log_files: Sequence[Path]) -> None:
    """Append the traceback to the run's log files (they may be closed by now: open them again)."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    for path in dict.fromkeys(log_files):
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{stamp} E {prog}: failed\n{text}")
        except OSError:  # the log's folder is the problem (read-only, full): stderr has the line
            pass


def handle(prog: str, e: BaseException, *, debug: bool, log_files: Sequence[Path] = ()) -> int:
    """Report ``e`` as described in the module docstring; returns the exit status."""
    if isinstance(e, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    tb = _redact("".join(traceback.format_exception(e)))
    _log_traceback(prog, tb, log_files)
    expected = is_expected(e)
    if debug or not expected:
        print(tb, file=sys.stderr, end="", flush=True)
    if expected:
        print(f"{prog}: error: {_redact(one_line(e))}", file=sys.stderr, flush=True)
        return EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_ERROR
    return EXIT_ERROR


def entry_point(prog: str) -> Callable[[F], F]:
    """Decorate an entry point's ``main(argv=None)``: ``--debug`` is taken off the arguments
    (before any ``--``) and every exception is reported by :func:`handle`, then ``SystemExit``."""
    from lingua.logger import run_log_files

    def wrap(main: F) -> F:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None, *args, **kwargs):
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(argv)
            logs_before, redactors_before = len(run_log_files()), len(_redactors)
            try:
                return main(_strip_debug(argv), *args, **kwargs)
            except SystemExit:
                raise
            except BaseException as e:  # noqa: BLE001 - the one place that reports failures
                code = handle(prog, e, debug=debug, log_files=run_log_files()[logs_before:])
                raise SystemExit(code) from None
            finally:
                del _redactors[redactors_before:]

        return run  # type: ignore[return-value]

    return wrap


__all__ = ["ExpectedError", "add_redactor", "debug_requested", "entry_point", "handle", "is_expected", "one_line"]
