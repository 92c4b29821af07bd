"""One tokenizer interface over four backends: raw bytes, SentencePiece, HF ``tokenizer.json``
and tiktoken BPE files (always read from a local path; nothing is downloaded).

Special tokens
    Every backend keeps a ``special_ids`` map (BOS/EOS/PAD strings, the backend's own special
    tokens, plus the extra ``TokenizerArgs.special_tokens``, e.g. the four latent tokens).
    ``encode`` first splits the text on those strings, encodes the plain segments with the
    backend and splices the single special ids in between; ``decode`` does the inverse, so
    ``decode(encode(s)) == s`` for any text the backend can represent (all text for bytes,
    byte-level BPE, byte-fallback SentencePiece and byte-complete tiktoken files; SentencePiece-
    style vocabularies cannot represent U+2581 "▁", their whitespace marker, which decodes to a
    space). Extra special tokens that the backend does not know get ids after its vocabulary, in
    the order given, so they are stable across save/load.

No dummy prefix (deliberate, matching the reference's training tokenizer)
    Llama-style SentencePiece tokenizers prepend a space ("dummy prefix") to every string they
    encode and strip it again when decoding. The reference trains with the slow tokenizer loaded
    with ``legacy=False, add_prefix_space=False`` (no dummy prefix), while its inference paths
    (vLLM, the finetune ``AutoTokenizer``) used the fast tokenizer, which adds one: the first word
    of a document and of the text after a special token is then tokenized differently at
    inference than in training (the original BoLT code's tokenization). Here every plain segment is encoded
    WITHOUT a dummy prefix, in every backend and every code path (SentencePiece: the model's
    ``add_dummy_prefix`` is switched off; HF: ``Prepend`` normalizers, Metaspace prepend schemes,
    ByteLevel ``add_prefix_space`` and the matching decoder ``Strip`` are removed at load time),
    so training, scoring and generation agree and the round trip is exact. The files written by
    ``save`` are left in their original form, so ``transformers`` loads them as usual.
"""

from __future__ import annotations

import base64
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from lingua.io import atomic_write_bytes, atomic_write_json, atomic_write_text

KINDS = ("bytes", "sp", "hf", "tiktoken")

# Split pattern of Llama 3 / cl100k, used to pre-split text for tiktoken BPE files.
TIKTOKEN_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class TokenizerArgs:
    """Which tokenizer to build. ``path`` is a file or a folder holding the backend's files."""

    name: str = "bytes"  # bytes | sp | hf | tiktoken
    path: Optional[str] = None
    special_tokens: list[str] = field(default_factory=list)  # extra single-id tokens, in id order

    def validate(self) -> None:
        if self.name not in KINDS:
            raise ValueError(f"tokenizer.name must be one of {'|'.join(KINDS)}, got {self.name!r}")
        if self.name != "bytes" and not self.path:
            raise ValueError(f"tokenizer.name={self.name!r} needs tokenizer.path")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"tokenizer.special_tokens has duplicates: {self.special_tokens}")
        if any(not s for s in self.special_tokens):
            raise ValueError("tokenizer.special_tokens may not contain an empty string")


class Tokenizer(ABC):
    """Shared special-token splitting and splicing; backends encode/decode plain text only."""

    kind: str
    bos_id: int
    eos_id: int
    pad_id: Optional[int]

    def __init__(self, special_ids: dict[str, int], extra: Sequence[str]):
        self.special_ids: dict[str, int] = dict(special_ids)
        self.extra_special_tokens: list[str] = list(extra)
        self._id_to_special = {i: s for s, i in self.special_ids.items()}
        # Longest first, so a special token that contains another one wins.
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    # --- backend hooks ------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def _encode_plain(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode_plain(self, ids: list[int]) -> str: ...

    @abstractmethod
    def save(self, out_dir: str | Path) -> TokenizerArgs:
        """Copy the tokenizer's files into ``out_dir``; return args that rebuild it from there."""

    # --- public API ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        pos = 0
        if self._split is not None:
            for m in self._split.finditer(text):
                if m.start() > pos:
                    ids += self._encode_plain(text[pos : m.start()])
                ids.append(self.special_ids[m.group()])
                pos = m.end()
        if pos < len(text):
            ids += self._encode_plain(text[pos:])
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            special = self._id_to_special.get(i)
            if special is None:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_plain(run))
                run = []
            parts.append(special)
        if run:
            parts.append(self._decode_plain(run))
        return "".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, specials={len(self.special_ids)})"


def _assign_extra(special_ids: dict[str, int], extra: Sequence[str], known: dict[str, int], next_id: int) -> int:
    """Give each extra token the id the backend already has for it, else the next free id."""
    for tok in extra:
        if tok in special_ids:
            continue
        if tok in known:
            special_ids[tok] = known[tok]
        else:
            special_ids[tok] = next_id
            next_id += 1
    return next_id


def _resolve_file(path: str | Path, names: Sequence[str], kind: str) -> Path:
    p = Path(path)
    if p.is_dir():
        for n in names:
            if (p / n).is_file():
                return p / n
        raise FileNotFoundError(f"{kind} tokenizer: no {' or '.join(names)} in folder {p}")
    if not p.is_file():
        raise FileNotFoundError(f"{kind} tokenizer file not found: {p}")
    return p


# ----------------------------------------------------------------------------------------------
# bytes


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, then BOS 256, EOS 257, then the extra special tokens."""

    kind = "bytes"
    BOS, EOS = "<|bos|>", "<|eos|>"

    def __init__(self, extra: Sequence[str] = ()):
        self.bos_id, self.eos_id, self.pad_id = 256, 257, None
        specials = {self.BOS: 256, self.EOS: 257}
        self._n = _assign_extra(specials, extra, {}, 258)
        super().__init__(specials, extra)

    @property
    def vocab_size(self) -> int:
        return self._n

    def _encode_plain(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode_plain(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, out_dir: str | Path) -> TokenizerArgs:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return TokenizerArgs("bytes", None, list(self.extra_special_tokens))


# ----------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file, encoded without the dummy prefix (see module docstring)."""

    kind = "sp"
    FILE = "tokenizer.model"

    def __init__(self, path: str | Path, extra: Sequence[str] = ()):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb2

        self.path = _resolve_file(path, [self.FILE], "sp")
        proto = pb2.ModelProto()
        try:
            proto.ParseFromString(self.path.read_bytes())
        except Exception as e:  # protobuf raises its own DecodeError
            raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from e
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._n_sp = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.path}: the SentencePiece model has no BOS or EOS piece (bos_id/eos_id = -1)")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        user_defined = pb2.ModelProto.SentencePiece.USER_DEFINED
        specials = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        specials.update({p.piece: i for i, p in enumerate(proto.pieces) if p.type == user_defined})
        known = {p.piece: i for i, p in enumerate(proto.pieces)}
        self._n = _assign_extra(specials, extra, known, self._n_sp)
        super().__init__(specials, extra)

    @property
    def vocab_size(self) -> int:
        return self._n

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_plain(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def save(self, out_dir: str | Path) -> TokenizerArgs:
        dst = Path(out_dir) / self.FILE
        atomic_write_bytes(dst, self.path.read_bytes())
        return TokenizerArgs("sp", str(dst), list(self.extra_special_tokens))


# ----------------------------------------------------------------------------------------------
# HF tokenizer.json


def _token_str(v: Any) -> Optional[str]:
    """tokenizer_config.json stores tokens as strings or as AddedToken dicts."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def strip_dummy_prefix(spec: dict) -> dict:
    """Remove every way a tokenizer.json adds a leading space, and the decoder step undoing it."""
    changed = False

    def walk_pre(node: Optional[dict]) -> Optional[dict]:
        nonlocal changed
        if not node:
            return node
        if node.get("type") == "Sequence":
            key = "pretokenizers" if "pretokenizers" in node else "normalizers"
            node[key] = [n for n in (walk_pre(c) for c in node[key]) if n is not None]
            return node
        if node.get("type") == "Prepend":
            changed = True
            return None
        if node.get("type") == "Metaspace":
            if node.get("prepend_scheme", "never") != "never" or node.get("add_prefix_space"):
                changed = True
            node["prepend_scheme"] = "never"
            node.pop("add_prefix_space", None)
        if node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
            changed = True
            node["add_prefix_space"] = False
        return node

    spec["normalizer"] = walk_pre(spec.get("normalizer"))
    spec["pre_tokenizer"] = walk_pre(spec.get("pre_tokenizer"))
    dec = spec.get("decoder")
    if dec and changed:
        if dec.get("type") == "Sequence":
            dec["decoders"] = [
                d for d in dec["decoders"] if not (d.get("type") == "Strip" and d.get("start", 0) > 0)
            ]
            for d in dec["decoders"]:
                if d.get("type") == "Metaspace":
                    d["prepend_scheme"] = "never"
        elif dec.get("type") == "Metaspace":
            dec["prepend_scheme"] = "never"
    return spec


class HFTokenizer(Tokenizer):
    """An HF ``tokenizer.json`` (+ optional ``tokenizer_config.json`` naming BOS/EOS/PAD)."""

    kind = "hf"
    FILE, CONFIG = "tokenizer.json", "tokenizer_config.json"
    _BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "<|endoftext|>")
    _EOS_GUESSES = ("</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|endoftext|>")

    def __init__(self, path: str | Path, extra: Sequence[str] = ()):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTok

        self.path = _resolve_file(path, [self.FILE], "hf")
        try:
            original = HFTok.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a plain Exception on malformed files
            raise ValueError(f"{self.path}: cannot load tokenizer.json ({e})") from e
        self.config = self._read_config(self.path.parent / self.CONFIG)
        new = [t for t in extra if original.token_to_id(t) is None]
        original.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        self._original = original  # saved as is, so transformers sees the usual tokenizer
        self.tok = HFTok.from_str(json.dumps(strip_dummy_prefix(json.loads(original.to_str()))))

        specials = {t.content: i for i, t in original.get_added_tokens_decoder().items() if t.special}
        specials.update({t: original.token_to_id(t) for t in extra})
        bos = self._named("bos_token", self._BOS_GUESSES, original)
        eos = self._named("eos_token", self._EOS_GUESSES, original)
        if bos is None or eos is None:
            raise ValueError(
                f"{self.path}: cannot tell the BOS/EOS tokens; name them in {self.CONFIG} (bos_token, eos_token)"
            )
        pad = self._named("pad_token", (), original)
        self.bos_id, self.eos_id = bos[1], eos[1]
        self.pad_id = pad[1] if pad else None
        for s, i in filter(None, (bos, eos, pad)):
            specials[s] = i
        super().__init__(specials, extra)

    @staticmethod
    def _read_config(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e

    def _named(self, key: str, guesses: Sequence[str], tok) -> Optional[tuple[str, int]]:
        name = _token_str(self.config.get(key))
        candidates = [name] if name else list(guesses)
        for c in candidates:
            i = tok.token_to_id(c)
            if i is not None:
                return c, i
        if name:
            raise ValueError(f"{self.path.parent / self.CONFIG}: {key} {name!r} is not in the vocabulary")
        return None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _encode_plain(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode_plain(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def original_json(self) -> str:
        """tokenizer.json text as the file has it (dummy prefix intact) plus the added tokens."""
        return self._original.to_str(pretty=True)

    def save(self, out_dir: str | Path) -> TokenizerArgs:
        out = Path(out_dir)
        atomic_write_text(out / self.FILE, self.original_json())
        atomic_write_json(out / self.CONFIG, self.transformers_config())
        return TokenizerArgs("hf", str(out / self.FILE), list(self.extra_special_tokens))

    def transformers_config(self) -> dict:
        """tokenizer_config.json for ``AutoTokenizer``: the original one, with the added special
        tokens listed and the per-id table dropped (it is rebuilt from tokenizer.json)."""
        cfg = {k: v for k, v in self.config.items() if k not in ("added_tokens_decoder",)}
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg["bos_token"] = self._id_to_special[self.bos_id]
        cfg["eos_token"] = self._id_to_special[self.eos_id]
        if self.pad_id is not None:
            cfg["pad_token"] = self._id_to_special[self.pad_id]
        listed = [_token_str(t) for t in cfg.get("additional_special_tokens", []) or []]
        cfg["additional_special_tokens"] = listed + [t for t in self.extra_special_tokens if t not in listed]
        cfg.pop("extra_special_tokens", None)
        return cfg


# ----------------------------------------------------------------------------------------------
# tiktoken


def read_tiktoken_bpe(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one ``<base64 token> <rank>`` per line."""
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    for lineno, line in enumerate(path.read_text(encoding="ascii", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected '<base64 token> <rank>'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            if rank < 0:
                raise ValueError("negative rank")
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: malformed tiktoken line {line[:60]!r} ({e})") from e
        if token in ranks or rank in seen:
            raise ValueError(f"{path}:{lineno}: duplicate token or rank {rank}")
        ranks[token] = rank
        seen.add(rank)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: not byte-complete, {len(missing)} single bytes have no rank (e.g. {missing[0]})")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A local tiktoken BPE file; BOS/EOS follow the ranks (as in Llama 3), then the extras."""

    kind = "tiktoken"
    FILE = "tokenizer.tiktoken"
    BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

    def __init__(self, path: str | Path, extra: Sequence[str] = ()):
        try:
            import tiktoken
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the tiktoken backend needs `pip install tiktoken`") from e
        self.path = _resolve_file(path, [self.FILE, "tokenizer.model"], "tiktoken")
        self.ranks = ranks = read_tiktoken_bpe(self.path)
        n = max(ranks.values()) + 1
        self.enc = tiktoken.Encoding(
            name=self.path.stem, pat_str=TIKTOKEN_PAT, mergeable_ranks=ranks, special_tokens={}
        )
        self.bos_id, self.eos_id, self.pad_id = n, n + 1, None
        specials = {self.BOS: n, self.EOS: n + 1}
        self._n = _assign_extra(specials, extra, {}, n + 2)
        super().__init__(specials, extra)

    @property
    def vocab_size(self) -> int:
        return self._n

    def _encode_plain(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def _decode_plain(self, ids: list[int]) -> str:
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, out_dir: str | Path) -> TokenizerArgs:
        dst = Path(out_dir) / self.FILE
        atomic_write_bytes(dst, self.path.read_bytes())
        return TokenizerArgs("tiktoken", str(dst), list(self.extra_special_tokens))


# ----------------------------------------------------------------------------------------------
# factory (training lives in lingua.tokenizer_train)


def build_tokenizer(args: TokenizerArgs) -> Tokenizer:
    args.validate()
    if args.name == "bytes":
        return ByteTokenizer(args.special_tokens)
    cls = {"sp": SentencePieceTokenizer, "hf": HFTokenizer, "tiktoken": TiktokenTokenizer}[args.name]
    return cls(args.path, args.special_tokens)  # type: ignore[arg-type]


def train_tokenizer(*args: Any, **kwargs: Any) -> TokenizerArgs:
    """Train a small BPE tokenizer with reserved special tokens; see :mod:`lingua.tokenizer_train`."""
    from lingua.tokenizer_train import train_tokenizer as _train

    return _train(*args, **kwargs)


__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerArgs",
    "build_tokenizer",
    "read_tiktoken_bpe",
    "strip_dummy_prefix",
    "train_tokenizer",
]
