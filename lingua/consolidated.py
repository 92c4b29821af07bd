"""Single-folder checkpoints for inference and for initialising training.

Layout of a consolidated folder::

    consolidated.pt        model state dict (our key names, full tensors, on CPU)
    params.json            TransformerArgs
    tokenizer/             the tokenizer's files + tokenizer_args.json (path relative to tokenizer/)
    extra.json             optional caller metadata (step, source checkpoint, ...)
    COMPLETE               written last; a folder without it is treated as unusable

Every file is written atomically, and an existing ``COMPLETE`` is removed before anything is
rewritten, so a crash mid-save can never leave a folder that looks complete but mixes versions.
``fingerprint`` is a content hash of the weights and params, cached in a sidecar keyed by the
files' sizes and mtimes, so callers (e.g. caches of generated samples) can cheaply key on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from lingua.args import from_dict, to_dict
from lingua.io import DONE_MARKER, atomic_open, atomic_write_json, file_listing, is_done, mark_done
from lingua.tokenizer import Tokenizer, TokenizerArgs, build_tokenizer
from lingua.transformer import Transformer, TransformerArgs

WEIGHTS = "consolidated.pt"
PARAMS = "params.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_ARGS = "tokenizer_args.json"
EXTRA = "extra.json"
FINGERPRINT_CACHE = ".fingerprint.json"
_CHUNK = 1 << 24


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`lingua.io.atomic_open` (streamed: no full in-memory copy)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full, contiguous CPU tensors under our key names (drops a torch.compile prefix)."""
    out = {}
    for k, v in state_dict.items():
        out[k.removeprefix("_orig_mod.")] = v.detach().to("cpu").contiguous()
    return out


def save_consolidated(
    model: Transformer,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    extra: Optional[dict] = None,
    *,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write ``model`` (or ``state_dict``, e.g. gathered from FSDP, with ``model.args``) and
    ``tokenizer`` as a consolidated folder; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_MARKER).unlink(missing_ok=True)
    args: TransformerArgs = model.args
    sd = _clean_state_dict(model.state_dict() if state_dict is None else state_dict)
    emb = sd.get("tok_embeddings.weight")
    if emb is None or emb.shape[0] != args.vocab_size:
        raise ValueError(f"state dict does not match params: tok_embeddings rows vs vocab_size={args.vocab_size}")
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {args.vocab_size} rows")

    _atomic_torch_save(sd, out / WEIGHTS)
    atomic_write_json(out / PARAMS, to_dict(args))
    save_tokenizer(tokenizer, out / TOKENIZER_DIR)
    if extra is not None:
        atomic_write_json(out / EXTRA, extra)
    n_params = sum(v.numel() for v in sd.values())
    mark_done(out, {"fingerprint": fingerprint(out, _allow_incomplete=True), "n_params": n_params})
    return out


def _require_complete(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"consolidated checkpoint folder not found: {folder}")
    if not is_done(folder):
        raise FileNotFoundError(f"{folder}: incomplete consolidated checkpoint (no {DONE_MARKER} marker)")
    for name in (WEIGHTS, PARAMS, f"{TOKENIZER_DIR}/{TOKENIZER_ARGS}"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: consolidated checkpoint lacks {name}")


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a usable consolidated checkpoint (marker and every file present)."""
    try:
        _require_complete(Path(folder))
    except FileNotFoundError:
        return False
    return True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def load_params(folder: str | os.PathLike) -> TransformerArgs:
    path = Path(folder) / PARAMS
    return from_dict(TransformerArgs, _read_json(path), str(path))


def save_tokenizer(tokenizer: Tokenizer, tok_dir: str | os.PathLike) -> None:
    """Write ``tokenizer`` as a consolidated folder's ``tokenizer/``: its files and its args with
    the path relative to ``tok_dir`` (the training run folder keeps a copy in the same layout)."""
    tok_dir = Path(tok_dir)
    tok_args = tokenizer.save(tok_dir)
    rel = None if tok_args.path is None else os.path.relpath(tok_args.path, tok_dir)
    atomic_write_json(tok_dir / TOKENIZER_ARGS, to_dict(TokenizerArgs(tok_args.name, rel, tok_args.special_tokens)))


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a consolidated folder (its path resolved against ``tokenizer/``)."""
    tok_dir = Path(folder) / TOKENIZER_DIR
    path = tok_dir / TOKENIZER_ARGS
    args = from_dict(TokenizerArgs, _read_json(path), str(path))
    if args.path is not None:
        args.path = str(tok_dir / args.path)
    return build_tokenizer(args)


def load_consolidated(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """Rebuild the model (eval mode, on ``device``) and its tokenizer from a complete folder."""
    folder = Path(folder)
    _require_complete(folder)
    args = load_params(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"{folder}: tokenizer has {tokenizer.vocab_size} ids, model vocab_size={args.vocab_size}")
    sd = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / WEIGHTS}: weights do not match {PARAMS}: {e}") from e
    model.rope_embeddings.reset_parameters()  # non-persistent buffer: recompute after to_empty
    return model.eval(), tokenizer


def read_extra(folder: str | os.PathLike) -> dict:
    path = Path(folder) / EXTRA
    return _read_json(path) if path.is_file() else {}


def fingerprint(folder: str | os.PathLike, *, _allow_incomplete: bool = False) -> str:
    """sha256 (hex) of params.json and consolidated.pt bytes; cached by size+mtime in a sidecar."""
    folder = Path(folder)
    if not _allow_incomplete:
        _require_complete(folder)
    files = [folder / PARAMS, folder / WEIGHTS]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{folder}: consolidated checkpoint lacks {f.name}")
    key = file_listing(files, folder)
    cache = folder / FINGERPRINT_CACHE
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached["sha256"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a damaged sidecar is recomputed below
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        atomic_write_json(cache, {"key": key, "sha256": digest})
    except OSError:
        pass  # read-only folder: the hash is still correct, just not cached
    return digest


__all__ = [
    "fingerprint",
    "load_consolidated",
    "load_params",
    "load_tokenizer",
    "save_tokenizer",
    "read_extra",
    "save_consolidated",
]
