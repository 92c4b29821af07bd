"""The one top-level error handler (``lingua.errors``) and the messages of the entry points.

Expected failures print one ``PROG: error: ...`` line and exit 1 (configuration errors 2) with
the traceback in the run's log file; ``--debug`` / ``LINGUA_DEBUG=1`` also print it; bugs keep
their traceback; Ctrl-C is one line and exit 130. The second half runs each runtime failure of
the issue (fault 8) through the entry point's ``main``.
"""

from __future__ import annotations

import errno
import importlib
import re
from pathlib import Path

import pytest

from lingua.args import ConfigError
from lingua.errors import ExpectedError, add_redactor, entry_point
from lingua.logger import close_logger, init_logger

REPO = Path(__file__).resolve().parent.parent
DEBUG_YAML = REPO / "apps" / "bolt" / "configs" / "train_debug.yaml"


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("LINGUA_DEBUG", raising=False)


def _check_failed(value: str) -> None:
    raise ValueError(f"bad input: {value}")  # a check of this project's code: expected


@entry_point("prog")
def toy_main(argv=None):
    kind = argv[0] if argv else ""
    if kind == "log":
        init_logger(Path(argv[1]) / "run.log")
        close_logger()  # a run closes its log before the exception reaches the handler
        raise ExpectedError("the input folder is empty")
    if kind == "check":
        _check_failed("x")
    if kind == "config":
        raise ConfigError("steps: must be >= 1")
    if kind == "bug":
        return list(range(0, 10, 0))  # a ValueError from a built-in: a bug, not a check
    if kind == "key":
        raise KeyError("missing")
    if kind == "denied":
        raise PermissionError(errno.EACCES, "Permission denied", "/data/run")
    if kind == "full":
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/ckpt")
    if kind == "interrupt":
        raise KeyboardInterrupt
    if kind == "secret":
        add_redactor(lambda s: s.replace("sk-SECRET", "<redacted>"))
        raise ExpectedError("401: bad key sk-SECRET")
    return argv


def run_toy(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        toy_main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, err.strip().splitlines()


@pytest.mark.parametrize("kind, code, line", [
    ("check", 1, "prog: error: bad input: x"),
    ("config", 2, "prog: error: steps: must be >= 1"),
    ("denied", 1, "prog: error: /data/run: Permission denied"),
    ("full", 1, "prog: error: /data/run/ckpt: No space left on device"),
    ("interrupt", 130, "prog: interrupted"),
    ("secret", 1, "prog: error: 401: bad key <redacted>"),
])
def test_expected_failures_are_one_line(capsys, kind, code, line):
    assert run_toy(capsys, kind) == (code, [line])


@pytest.mark.parametrize("kind", ["bug", "key"])
def test_bugs_keep_their_traceback(capsys, kind):
    code, err = run_toy(capsys, kind)
    assert code == 1 and err[0].startswith("Traceback") and len(err) > 3
    assert not any(": error:" in line for line in err)


def test_traceback_goes_to_the_log_and_to_the_console_only_with_debug(capsys, tmp_path, monkeypatch):
    code, err = run_toy(capsys, "log", str(tmp_path))
    assert (code, err) == (1, ["prog: error: the input folder is empty"])
    log = (tmp_path / "run.log").read_text()
    assert "Traceback" in log and "ExpectedError: the input folder is empty" in log
    code, err = run_toy(capsys, "--debug", "check")  # --debug is taken off the arguments
    assert code == 1 and err[0].startswith("Traceback") and err[-1] == "prog: error: bad input: x"
    monkeypatch.setenv("LINGUA_DEBUG", "1")
    code, err = run_toy(capsys, "check")
    assert code == 1 and err[0].startswith("Traceback") and err[-1] == "prog: error: bad input: x"


def test_debug_flag_is_removed_before_the_arguments_of_a_launched_command():
    assert toy_main(["a=1", "--debug", "--", "b=2", "--debug"]) == ["a=1", "--", "b=2", "--debug"]


def _entry_modules() -> list[str]:
    """Every module with a ``__main__`` block under lingua/, apps/ and setup/."""
    found = []
    for top in ("lingua", "apps", "setup"):
        for path in sorted((REPO / top).rglob("*.py")):
            if re.search(r'^if __name__ == "__main__":', path.read_text(), re.M):
                found.append(".".join(path.relative_to(REPO).with_suffix("").parts))
    return found


def test_every_entry_point_uses_the_handler():
    modules = _entry_modules()
    assert {"apps.bolt.train", "apps.bolt.estep", "apps.bolt.gen_latents", "lingua.launch"} <= set(modules)
    own_handler = {"setup.download_hf_ckpt"}  # any failure there means "cannot download": its own one line
    unwrapped = [m for m in modules if m not in own_handler and not hasattr(importlib.import_module(m).main, "__wrapped__")]
    assert unwrapped == []


# -- fault 8 through the entry points -----------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from tests.test_trainer import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"), 40, 8)


def train_args(data_root: Path, run_dir: Path, **kw) -> list[str]:
    from tests.test_trainer import overrides

    return [f"config={DEBUG_YAML}", *overrides(data_root, run_dir, **{"steps": 2, "val.every": 0, **kw})]


def one_error(main, argv, capsys, code: int = 1) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and len(err) == 1, err[-30:]
    return err[0]


def test_mapping_override_without_a_data_section_and_a_missing_data_folder(tmp_path, capsys):
    """``data.sources={train: 1.0}`` with a YAML without ``data:`` failed with ``Value '_Replace'
    is not a supported primitive type``; a missing data folder printed a traceback."""
    from apps.bolt.train import main

    yml = tmp_path / "no_data.yaml"
    yml.write_text(f"_base_: {REPO / 'apps/bolt/configs/model/debug.yaml'}\ntokenizer:\n  name: bytes\nsteps: 2\n")
    run = tmp_path / "run"
    line = one_error(main, [f"config={yml}", "data.sources={train: 1.0}", "data.seq_len=32", f"dump_dir={run}",
                            f"data.root_dir={tmp_path / 'nodata'}"], capsys)
    assert line == f"apps.bolt.train: error: dataset folder not found: {tmp_path / 'nodata'}"
    assert "Traceback" in (run / "train.log").read_text()  # the details are in the run's log


def test_train_runtime_failures_are_one_line(corpus, tmp_path, capsys, monkeypatch):
    from apps.bolt.train import main

    (tmp_path / "afile").write_text("x")
    line = one_error(main, train_args(corpus, tmp_path / "afile"), capsys)
    assert line == f"apps.bolt.train: error: {tmp_path / 'afile'}: is a file, a folder is needed here"
    line = one_error(main, train_args(corpus, tmp_path / "r1", num_tokens=10), capsys, code=2)
    assert line == "apps.bolt.train: error: num_tokens=10 is less than one step of 4x32 tokens"
    line = one_error(main, train_args(corpus, tmp_path / "r2", **{"data.sources": {"nosuch": 1.0}}), capsys)
    assert line == f"apps.bolt.train: error: source 'nosuch': folder not found: {corpus / 'nosuch'}"
    # A read-only folder (simulated: the tests may run as root, who may write anywhere).
    read_only = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.is_relative_to(read_only):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    line = one_error(main, train_args(corpus, read_only / "run"), capsys)
    assert line == f"apps.bolt.train: error: {read_only / 'run'}: Permission denied"


@pytest.mark.parametrize("module, argv, code, message", [
    ("apps.bolt.estep", ["ckpt={t}/nock", "src={t}", "out={t}/o"], 1, "consolidated checkpoint folder not found: {t}/nock"),
    ("apps.bolt.estep", ["ckpt={t}/nock", "src={t}", "out={t}/o", "batch_chunks=0"], 2,
     "invalid config: batch_chunks must be >= 1, got 0"),
    ("apps.bolt.estep", ["ckpt={t}/nock", "src={t}", "out={t}/o", "posterior.max_context_tokens=0"], 2,
     "invalid config section posterior: max_context_tokens must be >= 1, got 0"),
    ("apps.bolt.generate", ["ckpt={t}/nock", "prompts={t}/p.txt"], 1, "consolidated checkpoint folder not found: {t}/nock"),
    ("apps.bolt.eval", ["ckpt={t}/nock"], 1, "checkpoint not found: {t}/nock"),
    ("apps.bolt.eval", ["ckpt={t}/nock", "max_batch_tokens=0"], 2, "invalid config: max_batch_tokens must be >= 1, got 0"),
    ("apps.bolt.gen_latents", ["src={t}/nosrc", "out={t}/o"], 1, "source folder not found: {t}/nosrc"),
    ("apps.bolt.gen_latents", ["src={t}/nosrc", "out={t}/o", "max_tokens=0"], 2, "invalid config: max_tokens must be >= 1, got 0"),
    ("apps.bolt.prepare", ["out_dir={t}/afile", "source.kind=synthetic", "source.num_docs=5"], 1,
     "{t}/afile: is a file, a folder is needed here"),
])
def test_stage_failures_are_one_line(tmp_path, capsys, module, argv, code, message):
    (tmp_path / "afile").write_text("x")
    mod = importlib.import_module(module)
    line = one_error(mod.main, [a.format(t=tmp_path) for a in argv], capsys, code=code)
    prog = "prepare" if module == "apps.bolt.prepare" else module
    assert line == f"{prog}: error: {message.format(t=tmp_path)}"


def test_model_sizes_must_be_positive():
    from apps.bolt.train import BoltTrainArgs
    from lingua.args import load_config

    for key in ("model.n_heads", "model.dim", "model.n_layers", "model.multiple_of"):
        with pytest.raises(ConfigError, match=f"{key.split('.')[1]} must be >= 1, got 0"):
            load_config(BoltTrainArgs, DEBUG_YAML, [f"{key}=0"])
