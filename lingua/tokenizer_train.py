"""Training small BPE tokenizers (SentencePiece or HF ``tokenizers``) with the latent tokens
reserved as single ids; used by the embedded synthetic world and by tests. Loading and encoding
live in :mod:`lingua.tokenizer`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from lingua.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lingua.tokenizer import HFTokenizer, SentencePieceTokenizer, TokenizerArgs


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    kind: str = "sp",
    vocab_size: int = 512,
    special_tokens: Sequence[str] = (),
) -> TokenizerArgs:
    """Train a small BPE tokenizer on ``texts`` with ``special_tokens`` reserved as single ids.

    ``sp``: SentencePiece BPE with identity normalization, no whitespace collapsing, no dummy
    prefix, byte fallback and split digits (exact round trips). ``hf``: byte-level BPE with
    single-digit pre-splitting. Both put ``<unk>``/``<s>``/``</s>`` (sp) or ``<s>``/``</s>`` (hf)
    first, then the special tokens. Deterministic for the same input.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "sp":
        return _train_sp(list(texts), out, vocab_size, list(special_tokens))
    if kind == "hf":
        return _train_hf(list(texts), out, vocab_size, list(special_tokens))
    raise ValueError(f"train_tokenizer: kind must be 'sp' or 'hf', got {kind!r}")


def _train_sp(texts: list[str], out: Path, vocab_size: int, specials: list[str]) -> TokenizerArgs:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb2

    with tempfile.TemporaryDirectory(prefix="sptrain.") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(t for t in texts if t), encoding="utf-8")
        try:
            _sp_train(spm, corpus, Path(tmp) / "m", vocab_size, specials)
        except RuntimeError as e:  # e.g. vocab_size below 256 byte pieces + distinct characters
            raise ValueError(f"train_tokenizer(kind='sp', vocab_size={vocab_size}): {e}") from e
        # The trainer records its temp input/output paths in the file; drop them so the same
        # corpus always gives the same bytes.
        proto = pb2.ModelProto()
        proto.ParseFromString((Path(tmp) / "m.model").read_bytes())
        del proto.trainer_spec.input[:]
        proto.trainer_spec.model_prefix = ""
        atomic_write_bytes(out / SentencePieceTokenizer.FILE, proto.SerializeToString())
    return TokenizerArgs("sp", str(out / SentencePieceTokenizer.FILE), specials)


def _sp_train(spm, corpus: Path, prefix: Path, vocab_size: int, specials: list[str]) -> None:
    """SentencePiece settings for exact round trips (cpu-feasibility.md §6)."""
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        user_defined_symbols=specials,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        max_sentence_length=1 << 16,
        hard_vocab_limit=False,
        minloglevel=2,
    )


def _train_hf(texts: list[str], out: Path, vocab_size: int, specials: list[str]) -> TokenizerArgs:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tok = HFTok(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # BOS on transformers' side (AutoTokenizer/vLLM add_special_tokens=True), as in training data.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    atomic_write_text(out / HFTokenizer.FILE, tok.to_str(pretty=True))
    atomic_write_json(
        out / HFTokenizer.CONFIG,
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "additional_special_tokens": specials,
            "clean_up_tokenization_spaces": False,
        },
    )
    return TokenizerArgs("hf", str(out / HFTokenizer.FILE), specials)


__all__ = ["train_tokenizer"]
