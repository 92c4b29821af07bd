"""Tokenizers: exact round trips, single-id special tokens, stable ids across save/load, every
backend (bytes, SentencePiece, HF tokenizer.json, tiktoken), no dummy prefix, clear errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lingua.args import ConfigError, from_dict
from lingua.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerArgs,
    build_tokenizer,
    read_tiktoken_bpe,
    train_tokenizer,
)

LATENT = ["<|START_OF_LATENT|>", "<|END_OF_LATENT|>", "<|PRIOR_PREFIX|>", "<|POSTERIOR_PREFIX|>"]
CORPUS = [
    "Hello world, this is a test of 1234 numbers.\n  Leading spaces and\ttabs.",
    "héllo wörld 日本語 😀 the quick brown fox jumps over the lazy dog.",
    "Question: what is 12 + 30?\nAnswer: 42.\n\n",
] * 40
TRICKY = [
    "",
    " ",
    "   ",
    "  leading spaces",
    "\nleading newline",
    "\n\n\n",
    "a  b   c\t\td",
    "trailing spaces   ",
    "héllo 日本語 😀 e\u0301 \u200b",
    "x<|START_OF_LATENT|>y",
    "<|START_OF_LATENT|><|END_OF_LATENT|>",
    " <|PRIOR_PREFIX|> z ",
    "\n<|POSTERIOR_PREFIX|>\n",
    "text<|END_OF_LATENT|>",
    "<|START_OF_LATENT|",  # a near miss stays plain text
    "1234567 89.5",
    "\r\n windows \r\n",
]


def _tiny_tiktoken_file(path: Path) -> Path:
    """256 single bytes + merges 'he', 'll', 'hell', 'hello', ' w': a byte-complete BPE file."""
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def tokenizers(tok_dir):
    """One tokenizer per backend, each with the four latent tokens."""
    tik = _tiny_tiktoken_file(tok_dir / "tiny.tiktoken")
    return {
        "bytes": build_tokenizer(TokenizerArgs("bytes", None, LATENT)),
        "sp": build_tokenizer(train_tokenizer(CORPUS, tok_dir / "sp", "sp", 400, LATENT)),
        "hf": build_tokenizer(train_tokenizer(CORPUS, tok_dir / "hf", "hf", 400, LATENT)),
        "tiktoken": build_tokenizer(TokenizerArgs("tiktoken", str(tik), LATENT)),
    }


KINDS = ["bytes", "sp", "hf", "tiktoken"]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_tricky_strings(tokenizers, kind):
    tok = tokenizers[kind]
    for s in TRICKY:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, (kind, s, ids)
        assert all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("kind", KINDS)
def test_latent_tokens_are_single_ids_next_to_text(tokenizers, kind):
    tok = tokenizers[kind]
    ids = {t: tok.special_ids[t] for t in LATENT}
    assert len(set(ids.values())) == 4
    for t, i in ids.items():
        assert tok.encode(t) == [i]
        assert tok.decode([i]) == t
        enc = tok.encode(f"ab{t}cd")
        assert enc.count(i) == 1
        k = enc.index(i)
        assert tok.decode(enc[:k]) == "ab" and tok.decode(enc[k + 1 :]) == "cd"
    # plain text never produces a special id
    plain = tok.encode("".join(TRICKY[:9]))
    assert not set(plain) & set(tok.special_ids.values())


@pytest.mark.parametrize("kind", KINDS)
def test_bos_eos_flags(tokenizers, kind):
    tok = tokenizers[kind]
    body = tok.encode("hello world")
    assert tok.encode("hello world", add_bos=True) == [tok.bos_id] + body
    assert tok.encode("hello world", add_eos=True) == body + [tok.eos_id]
    assert tok.encode("hello world", True, True) == [tok.bos_id] + body + [tok.eos_id]
    assert tok.bos_id != tok.eos_id
    assert tok.pad_id is None


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_keeps_ids(tokenizers, kind, tmp_path):
    tok = tokenizers[kind]
    args = tok.save(tmp_path / "saved")
    if args.path is not None:
        assert Path(args.path).parent == tmp_path / "saved"
    again = build_tokenizer(args)
    assert again.special_ids == tok.special_ids
    assert again.vocab_size == tok.vocab_size
    assert (again.bos_id, again.eos_id) == (tok.bos_id, tok.eos_id)
    for s in TRICKY:
        assert again.encode(s) == tok.encode(s)


def test_bytes_layout():
    tok = build_tokenizer(TokenizerArgs("bytes", None, LATENT))
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 262)
    assert [tok.special_ids[t] for t in LATENT] == [258, 259, 260, 261]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([262])


def test_tiktoken_uses_merges_and_ids_follow_ranks(tokenizers):
    tok = tokenizers["tiktoken"]
    assert tok.encode("hello") == [259]
    assert tok.encode("hello world") == [259, 260] + list(b"orld")
    assert (tok.bos_id, tok.eos_id) == (261, 262)
    assert [tok.special_ids[t] for t in LATENT] == [263, 264, 265, 266]
    assert tok.vocab_size == 267


def test_trained_specials_are_reserved_at_the_front(tokenizers):
    sp, hf = tokenizers["sp"], tokenizers["hf"]
    assert [sp.special_ids[t] for t in LATENT] == [3, 4, 5, 6]  # after <unk>, <s>, </s>
    assert [hf.special_ids[t] for t in LATENT] == [2, 3, 4, 5]  # after <s>, </s>
    assert sp.vocab_size == 400


def test_train_is_deterministic(tmp_path):
    for kind, name in (("sp", "tokenizer.model"), ("hf", "tokenizer.json")):
        a = train_tokenizer(CORPUS, tmp_path / f"{kind}1", kind, 400, LATENT)
        b = train_tokenizer(CORPUS, tmp_path / f"{kind}2", kind, 400, LATENT)
        assert Path(a.path).name == name
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
    with pytest.raises(ValueError, match="kind must be"):
        train_tokenizer(CORPUS, tmp_path / "x", "wordpiece", 300)


def test_extra_specials_appended_to_existing_vocab(tok_dir, tmp_path):
    """Adding the latent tokens to tokenizers that lack them: ids right after the vocab, in order."""
    sp_args = train_tokenizer(CORPUS, tmp_path / "sp", "sp", 400)
    hf_args = train_tokenizer(CORPUS, tmp_path / "hf", "hf", 300)
    for args in (sp_args, hf_args):
        base = build_tokenizer(args)
        added = build_tokenizer(TokenizerArgs(args.name, args.path, LATENT))
        assert [added.special_ids[t] for t in LATENT] == list(range(base.vocab_size, base.vocab_size + 4))
        assert added.vocab_size == base.vocab_size + 4
        s = "the fox<|START_OF_LATENT|> 42<|END_OF_LATENT|>"
        assert added.decode(added.encode(s)) == s
        assert added.encode("the fox") == base.encode("the fox")
        reloaded = build_tokenizer(added.save(tmp_path / f"saved_{args.name}"))
        assert reloaded.special_ids == added.special_ids


_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581")
_TEXT = st.lists(st.one_of(st.text(_CHARS), st.sampled_from(LATENT)), max_size=5).map("".join)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_property(tokenizers, kind):
    """Any unicode text with specials spliced in round-trips. (SentencePiece cannot represent
    U+2581, its own whitespace marker, so that one character is excluded.)"""
    tok = tokenizers[kind]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_TEXT)
    def check(s):
        assert tok.decode(tok.encode(s)) == s

    check()


# --- Llama-style files: dummy prefix handling and transformers interop --------------------------


@pytest.fixture(scope="module")
def llama_style(tok_dir):
    """A Llama-style SentencePiece model (dummy prefix on) and the tokenizer.json transformers
    converts it to, plus the older tokenizer.json layout (Prepend normalizer) TinyLlama ships."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = tok_dir / "llama"
    d.mkdir()
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    fast = AutoTokenizer.from_pretrained(str(d))
    (d / "fast").mkdir()
    fast.backend_tokenizer.save(str(d / "fast" / "tokenizer.json"))
    spec = json.loads((d / "fast" / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["prepend_scheme"] == "first"  # transformers adds a dummy prefix
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    (d / "legacy").mkdir()
    (d / "legacy" / "tokenizer.json").write_text(json.dumps(spec))
    return d


def test_llama_style_files_encode_without_dummy_prefix(llama_style):
    sp = build_tokenizer(TokenizerArgs("sp", str(llama_style / "tokenizer.model"), LATENT))
    fast = build_tokenizer(TokenizerArgs("hf", str(llama_style / "fast"), LATENT))
    legacy = build_tokenizer(TokenizerArgs("hf", str(llama_style / "legacy" / "tokenizer.json"), LATENT))
    import sentencepiece as spm

    raw = spm.SentencePieceProcessor(model_file=str(llama_style / "tokenizer.model"))
    assert raw.id_to_piece(raw.encode("world")[0]).startswith("▁")  # the file adds a dummy prefix ...
    for tok in (sp, fast, legacy):
        assert tok.encode(" world") == raw.encode("world")  # ... our loaders do not
        assert tok.encode("world") != raw.encode("world")
        assert (tok.bos_id, tok.eos_id) == (1, 2)
        for s in TRICKY:
            assert tok.decode(tok.encode(s)) == s
    for s in TRICKY + ["the quick brown fox<|PRIOR_PREFIX|>jumps"]:
        assert sp.encode(s) == fast.encode(s) == legacy.encode(s), s


def test_saved_hf_tokenizer_loads_in_transformers(tokenizers, llama_style, tmp_path):
    from transformers import AutoTokenizer

    for tok in (tokenizers["hf"], build_tokenizer(TokenizerArgs("hf", str(llama_style / "fast"), LATENT))):
        out = tmp_path / f"t{tok.vocab_size}"
        tok.save(out)
        hf = AutoTokenizer.from_pretrained(str(out))
        assert len(hf) == tok.vocab_size
        for t in LATENT:
            assert hf.convert_tokens_to_ids(t) == tok.special_ids[t]
            assert hf.encode(t, add_special_tokens=False) == [tok.special_ids[t]]
        assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sp", "hf", "tiktoken"])
def test_missing_file_is_a_clear_error(kind, tmp_path):
    missing = tmp_path / "nope" / "tokenizer.file"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_tokenizer(TokenizerArgs(kind, str(missing)))
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        build_tokenizer(TokenizerArgs(kind, str(tmp_path)))  # an empty folder


def test_bad_files_and_args(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("aGk= 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2: malformed"):
        read_tiktoken_bpe(bad)
    bad.write_text("aGk= 0\n")
    with pytest.raises(ValueError, match="not byte-complete"):
        read_tiktoken_bpe(bad)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff\x00garbage")
    with pytest.raises(ValueError, match="junk.model"):
        SentencePieceTokenizer(junk)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        HFTokenizer(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer.name must be one of"):
        from_dict(TokenizerArgs, {"name": "wordpiece", "path": "x"})
    with pytest.raises(ConfigError, match="needs tokenizer.path"):
        from_dict(TokenizerArgs, {"name": "sp"})
    with pytest.raises(ConfigError, match="duplicates"):
        from_dict(TokenizerArgs, {"special_tokens": ["<a>", "<a>"]})
