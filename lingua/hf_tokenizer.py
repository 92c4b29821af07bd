"""Tokenizer files for transformers: ``tokenizer.json`` and ``tokenizer_config.json`` that
``AutoTokenizer`` loads as a fast tokenizer encoding exactly like ours (bytes, tiktoken,
SentencePiece or HF tokenizers). Used by :func:`lingua.hf.export_hf`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from lingua.io import atomic_write_json, atomic_write_text
from lingua.tokenizer import (
    TIKTOKEN_PAT,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    strip_dummy_prefix,
)

def write_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, chat_template: Optional[str] = None) -> None:
    """tokenizer.json (+ tokenizer_config.json) that ``AutoTokenizer`` loads as a generic fast
    tokenizer encoding exactly like ``tokenizer`` (same ids, no dummy prefix, BOS prepended when
    ``add_special_tokens=True``). The tokenizer's extra tokens (latent tokens) are added tokens
    that are not special, so ``decode(..., skip_special_tokens=True)`` keeps them."""
    from tokenizers import AddedToken, processors

    hf_tok = _to_hf_tokenizer_object(tokenizer)
    # Every special of ours is a special added token there, with the same id.
    by_id = sorted(tokenizer.special_ids.items(), key=lambda kv: kv[1])
    for s, i in by_id:
        if hf_tok.token_to_id(s) is None and hf_tok.get_vocab_size(with_added_tokens=True) != i:
            raise ValueError(f"cannot place special token {s!r} at id {i} in the exported tokenizer")
        hf_tok.add_special_tokens([AddedToken(s, special=True, normalized=False)])
        if hf_tok.token_to_id(s) != i:
            raise ValueError(f"exported tokenizer maps {s!r} to {hf_tok.token_to_id(s)}, ours to {i}")
    bos = tokenizer.decode([tokenizer.bos_id])
    hf_tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
    )
    spec = strip_dummy_prefix(json.loads(hf_tok.to_str()))
    plain = set(tokenizer.extra_special_tokens)
    for entry in spec.get("added_tokens") or []:
        if entry.get("content") in plain:
            entry["special"] = False
    out = Path(out_dir)
    atomic_write_text(out / "tokenizer.json", json.dumps(spec, ensure_ascii=False, indent=2))
    named = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    cfg.update({k: tokenizer.decode([i]) for k, i in named.items() if i is not None})
    cfg["model_max_length"] = 1 << 30
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    atomic_write_json(out / "tokenizer_config.json", cfg)
    for stale in ("tokenizer.model", "special_tokens_map.json"):  # never leave a disagreeing copy
        (out / stale).unlink(missing_ok=True)


def _to_hf_tokenizer_object(tokenizer: Tokenizer):
    """The backend tokenizer as a ``tokenizers.Tokenizer`` (specials are added by the caller)."""
    from tokenizers import Tokenizer as HFTok

    if isinstance(tokenizer, HFTokenizer):
        return HFTok.from_str(tokenizer.original_json())
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_level_tokenizer({bytes([b]): b for b in range(256)}, pattern=None)
    if isinstance(tokenizer, TiktokenTokenizer):
        return _byte_level_tokenizer(tokenizer.ranks, pattern=TIKTOKEN_PAT)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return _sentencepiece_to_hf(tokenizer)
    raise TypeError(f"cannot export a {type(tokenizer).__name__} to transformers")


def _byte_level_tokenizer(ranks: dict[bytes, int], pattern: Optional[str]):
    """Byte-level BPE reproducing rank-based BPE (tiktoken); ``ignore_merges`` maps a pre-split
    piece that is itself in the vocabulary straight to its id, as tiktoken does."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import BPE

    b2u = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {s(t): r for t, r in ranks.items()}
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank, so every split
    # of a token into two known parts is a merge with that token's priority.
    merges = []
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        for k in range(1, len(tok)):
            if tok[:k] in ranks and tok[k:] in ranks:
                merges.append((s(tok[:k]), s(tok[k:])))
    hf = HFTok(BPE(vocab=vocab, merges=merges, ignore_merges=True))
    split = [pre_tokenizers.Split(Regex(pattern), behavior="isolated")] if pattern else []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence(split + [byte_level])
    hf.decoder = decoders.ByteLevel()
    return hf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _sentencepiece_to_hf(tokenizer: SentencePieceTokenizer):
    """SentencePiece BPE model -> tokenizers BPE via transformers' converter, dummy prefix off."""
    from tokenizers import Tokenizer as HFTok
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="sp2hf.") as tmp:
        shutil.copyfile(tokenizer.path, Path(tmp) / "tokenizer.model")
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False, "legacy": False}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(cfg))
        fast = AutoTokenizer.from_pretrained(tmp)
        return HFTok.from_str(fast.backend_tokenizer.to_str())
