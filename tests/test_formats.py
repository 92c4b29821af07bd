"""Latent layouts: exact strings and token ids, RNG draw order, raw mixing and fallback, loss
spans, E-step prompt, joint-scoring text and eval prompts."""

import numpy as np
import pytest

from apps.bolt.formats import (
    EOL,
    GSM8K_STYLE,
    MATH_STYLE,
    POST,
    PRIOR,
    SOL,
    SPECIAL_TOKENS,
    LayoutError,
    estep_prompt,
    joint_text,
    make_layout,
    split_latent_generation,
)
from lingua.args import ConfigError
from lingua.data import BadRecord, DataArgs, build_data_iterator, get_format, registered_formats
from lingua.io import write_jsonl
from lingua.tokenizer import TokenizerArgs, build_tokenizer, train_tokenizer

RECORD = {
    "id": "doc-7",
    "text": "A1. B2.",
    "chunks": [{"suffix": "A1.", "latent": "t1"}, {"suffix": " B2.", "latent": "t2"}],
    "num_chunks": 2,
}
# default_rng(8).random(2) = [0.37.., 0.95..]: chunk 1 prior, chunk 2 posterior.
COIN_SEED = 8


def fmt(name, record=RECORD, seed=COIN_SEED, **options):
    return make_layout(name, **options)(record, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def byte_tok():
    return build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    texts = [f"Question: what is {i} + {i + 3}? A{i}. B{i}. The answer is {2 * i + 3}." for i in range(300)]
    args = train_tokenizer(texts, tmp_path_factory.mktemp("sp"), kind="sp", vocab_size=300, special_tokens=SPECIAL_TOKENS)
    return build_tokenizer(args)


def ids(b: str) -> list[int]:
    return list(b.encode())


S, E, P, Q = 258, 259, 260, 261  # byte tokenizer: 0-255 bytes, 256 BOS, 257 EOS, then the latent tokens


def test_special_tokens_exact():
    assert SPECIAL_TOKENS == ("<|START_OF_LATENT|>", "<|END_OF_LATENT|>", "<|PRIOR_PREFIX|>", "<|POSTERIOR_PREFIX|>")
    assert (SOL, EOL, PRIOR, POST) == SPECIAL_TOKENS


EXPECTED = {
    "raw": "A1. B2.",
    "prior": f"{SOL}t1{EOL}A1.{SOL}t2{EOL} B2.",
    "posterior": f"A1.{SOL}t1{EOL} B2.{SOL}t2{EOL}",
    "random": f"{SOL}{PRIOR}t1{EOL}A1.{SOL}{EOL} B2.{SOL}{POST}t2{EOL}",
    "pure": "t1\n\nt2",
}
EXPECTED_IDS = {
    "raw": ids("A1. B2."),
    "prior": [S, *ids("t1"), E, *ids("A1."), S, *ids("t2"), E, *ids(" B2.")],
    "posterior": [*ids("A1."), S, *ids("t1"), E, *ids(" B2."), S, *ids("t2"), E],
    "random": [S, P, *ids("t1"), E, *ids("A1."), S, E, *ids(" B2."), S, Q, *ids("t2"), E],
    "pure": ids("t1\n\nt2"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_layout_exact_string_and_tokens(name, byte_tok, sp_tok):
    text = fmt(name)
    assert text == EXPECTED[name]
    assert byte_tok.encode(text) == EXPECTED_IDS[name]
    # A trained tokenizer keeps each latent token as one id and round-trips exactly.
    sp_ids = sp_tok.encode(text)
    assert sp_tok.decode(sp_ids) == text
    specials = [i for i in sp_ids if i in set(sp_tok.special_ids[t] for t in SPECIAL_TOKENS)]
    assert len(specials) == sum(text.count(t) for t in SPECIAL_TOKENS)


def test_random_layout_coin_per_chunk():
    seen = set()
    for seed in range(20):
        text = fmt("random", seed=seed)
        coins = np.random.default_rng(seed).random(2) < 0.5
        first = f"{SOL}{PRIOR}t1{EOL}A1." if coins[0] else f"{SOL}{EOL}A1.{SOL}{POST}t1{EOL}"
        second = f"{SOL}{PRIOR}t2{EOL} B2." if coins[1] else f"{SOL}{EOL} B2.{SOL}{POST}t2{EOL}"
        assert text == first + second
        seen.add(tuple(coins))
    assert len(seen) == 4


def _draws_used(name, record=RECORD, **options):
    """How many uniform draws formatting consumed (compare with a twin generator)."""
    rng = np.random.default_rng(0)
    make_layout(name, **options)(record, rng)
    after = rng.random()
    twin = np.random.default_rng(0).random(10)
    return int(np.flatnonzero(twin == after)[0])


def test_rng_draw_order():
    assert _draws_used("random") == 2  # one coin per chunk
    assert _draws_used("random", mix_in_raw_ratio=0.5) == 3  # mix draw first, then the coins
    assert _draws_used("prior", mix_in_raw_ratio=0.5) == 1
    assert _draws_used("raw", mix_in_raw_ratio=0.5) == 0  # raw never draws
    assert _draws_used("prior") == 0
    # Mixed to raw: the mix draw only (twin: first draw < 0.99 -> raw, no coins).
    assert _draws_used("random", mix_in_raw_ratio=0.99) == 1
    no_chunks = {"id": 1, "text": "x"}
    assert _draws_used("random", record=no_chunks, fall_back_to_raw=True) == 0


def test_mix_in_raw_ratio():
    assert fmt("random", mix_in_raw_ratio=1.0) == "A1. B2."
    f = make_layout("prior", mix_in_raw_ratio=0.3)
    rng = np.random.default_rng(1)
    raw = sum(f(RECORD, rng) == "A1. B2." for _ in range(4000))
    assert 0.27 < raw / 4000 < 0.33
    # The mix decision is exactly "first draw < ratio".
    for seed in range(30):
        expect_raw = np.random.default_rng(seed).random() < 0.3
        assert (fmt("random", seed=seed, mix_in_raw_ratio=0.3) == "A1. B2.") == expect_raw


@pytest.mark.parametrize("name", ["prior", "posterior", "random", "pure"])
@pytest.mark.parametrize(
    "record",
    [
        {"id": "no-chunks", "text": "plain"},
        {"id": "empty", "text": "plain", "chunks": []},
        {"id": "no-latent", "text": "plain", "chunks": [{"suffix": "plain"}]},
    ],
)
def test_fallback_or_clear_error(name, record):
    assert fmt(name, record=record, fall_back_to_raw=True) == "plain"
    with pytest.raises(LayoutError, match=f"record '{record['id']}'.*fall_back_to_raw"):
        fmt(name, record=record)


def test_raw_and_pure_fields():
    assert fmt("raw", record={"content": "old style"}, text_key="content") == "old style"
    with pytest.raises(LayoutError, match="no string field 'text'"):
        fmt("raw", record={"id": 3})
    wrap = {"text": "orig", "latent": "paraphrase"}
    assert fmt("pure", record=wrap) == "paraphrase"
    assert fmt("pure", pure_separator="<|eos|><|bos|>") == "t1<|eos|><|bos|>t2"


def test_latent_loss_spans(byte_tok):
    spans = fmt("random", latent_loss=False)
    assert spans == [
        (f"{SOL}{PRIOR}t1{EOL}", False),
        ("A1.", True),
        (f"{SOL}{EOL}", False),
        (" B2.", True),
        (f"{SOL}{POST}t2{EOL}", False),
    ]
    assert "".join(t for t, _ in spans) == fmt("random")
    # Span borders sit on special tokens: span-wise tokenization equals whole-text tokenization.
    assert [i for t, _ in spans for i in byte_tok.encode(t)] == byte_tok.encode(fmt("random"))
    assert fmt("posterior", latent_loss=False) == [
        ("A1.", True), (f"{SOL}t1{EOL}", False), (" B2.", True), (f"{SOL}t2{EOL}", False)
    ]
    assert fmt("raw", latent_loss=False) == [("A1. B2.", True)]
    # Neighbouring text spans merge; empty latents leave only the markers.
    rec = {"text": "ab", "chunks": [{"suffix": "a", "latent": ""}, {"suffix": "b", "latent": ""}]}
    assert fmt("prior", record=rec, latent_loss=False) == [(SOL + EOL, False), ("a", True), (SOL + EOL, False), ("b", True)]


def test_layout_args_validation():
    with pytest.raises(ConfigError, match="layout name"):
        make_layout("prior_only")
    with pytest.raises(ConfigError, match="mix_in_raw_ratio"):
        make_layout("random", mix_in_raw_ratio=1.5)
    with pytest.raises(ConfigError, match="pure"):
        make_layout("pure", latent_loss=False)
    with pytest.raises(ConfigError, match="unknown config key 'mix_ratio'"):
        make_layout("random", mix_ratio=0.1)


# ------------------------------------------------------------------------------ E-step strings


def test_estep_prompt_exact(byte_tok):
    assert estep_prompt("Before.", " After.") == f"Before.{SOL}{EOL} After.{SOL}{POST}"
    assert estep_prompt("", "First.") == f"First.{SOL}{POST}"
    assert byte_tok.encode(estep_prompt("", "Hi")) == [*ids("Hi"), S, Q]
    assert byte_tok.encode(estep_prompt("a", "b")) == [*ids("a"), S, E, *ids("b"), S, Q]


def test_joint_text_split_counts_opening_sol(byte_tok):
    jt = joint_text("Before.", "because", " After.")
    assert jt.text == f"Before.{SOL}{PRIOR}because{EOL} After."
    assert jt.context == "Before." and jt.scored.startswith(SOL)
    scored = byte_tok.encode(jt.scored)
    assert scored[0] == S  # log p(SOL | prefix) is part of the joint score
    assert byte_tok.encode(jt.context) + scored == byte_tok.encode(jt.text)
    first = joint_text("", "z", "X")
    assert first.split == 0 and first.scored == f"{SOL}{PRIOR}z{EOL}X"


# ------------------------------------------------------------------------------- eval prompts


def test_eval_prompts_gsm8k_style():
    shots = [("1+2?", "1+2=3.", "The final answer is 3.")]
    raw = GSM8K_STYLE.prompt("2+2?", shots)
    assert raw == "Question: 1+2?\n\nFinal Answer: 1+2=3. The final answer is 3.\n\nQuestion: 2+2?\n\nFinal Answer:"
    lat = GSM8K_STYLE.prompt("2+2?", shots, latent=True)
    assert lat == (
        f"Question: 1+2?\n\nFinal Answer:{SOL}{PRIOR}1+2=3.{EOL} The final answer is 3.\n\n"
        f"Question: 2+2?\n\nFinal Answer:{SOL}{PRIOR}"
    )
    assert GSM8K_STYLE.target("The final answer is 4.") == " The final answer is 4."
    assert GSM8K_STYLE.stop_strings() == ["Question:", EOL]
    assert GSM8K_STYLE.stop_strings(latent=True) == ["Question:", SOL]
    assert GSM8K_STYLE.banned_strings() == list(SPECIAL_TOKENS) and GSM8K_STYLE.banned_strings(True) == []


def test_eval_prompts_math_style(byte_tok):
    assert MATH_STYLE.query("x?") == "Problem:\nx?\n\nSolution:"
    q = MATH_STYLE.query("x?", latent=True)
    assert q == f"Problem:\nx?\n{SOL}{PRIOR}"
    assert byte_tok.encode(q)[-2:] == [S, P]
    assert MATH_STYLE.stop_strings(latent=True) == ["Problem:", SOL]


def test_split_latent_generation():
    assert split_latent_generation(f"2+2=4.{EOL} The final answer is 4.") == ("2+2=4.", " The final answer is 4.")
    assert split_latent_generation("no thought closed") == (None, "no thought closed")


# ------------------------------------------------------------------------ core pipeline hook


def test_layouts_registered_with_core():
    assert {"raw", "prior", "posterior", "random", "pure"} <= set(registered_formats())
    assert get_format("prior")(RECORD, np.random.default_rng(0)) == EXPECTED["prior"]
    assert issubclass(LayoutError, BadRecord)  # the pipeline counts and skips, never crashes


def test_pipeline_loss_mask_excludes_latents(tmp_path, byte_tok):
    """Through the real data pipeline: with latent_loss off, exactly the document-text target
    tokens count in the loss; BOS/EOS are the core's business."""
    write_jsonl(tmp_path / "src" / "part.00.jsonl", [RECORD])
    n = len(EXPECTED_IDS["random"]) + 2  # BOS + doc + EOS fits one window
    args = DataArgs(root_dir=str(tmp_path), sources={"src": 1.0}, batch_size=1, seq_len=n - 1, seed=0,
                    shuffle_buffer=0, prefetch=False)
    fn = make_layout("random", latent_loss=False)
    batch, _ = next(build_data_iterator(args, byte_tok, rank=0, world_size=1, format_fn=fn))
    target = batch["target"][0].tolist()
    counted = [t for t, m in zip(target, batch["loss_mask"][0].tolist()) if m]
    # The formatter stream (seed + 2, rank, world) = (2, 0, 1) draws prior, then posterior here.
    assert target == [*EXPECTED_IDS["random"], byte_tok.eos_id]
    assert [t for t in counted if t != byte_tok.eos_id] == ids("A1.") + ids(" B2.")
    # The same layout through data.format with default options counts everything.
    args.format = "random"
    batch, _ = next(build_data_iterator(args, byte_tok, rank=0, world_size=1))
    assert bool(batch["loss_mask"].all())
