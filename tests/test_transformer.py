"""The model: KV-cache decoding equals the full forward, document masking equals separate
forwards (and trains on CPU), GQA equals repeated KV heads, FLOPs vs parameters, presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lingua.args import load_config
from lingua.transformer import Transformer, TransformerArgs, build_model, doc_causal_mask, flops_per_token

PRESETS = Path(__file__).resolve().parents[1] / "apps" / "bolt" / "configs" / "model"
ATOL = 1e-5


def _args(**kw) -> TransformerArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seqlen=128, seed=3)
    return TransformerArgs(**{**base, **kw})


def _tokens(b: int, s: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(_args()).eval()


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(model):
    x = _tokens(2, 24)
    full = model(x)
    cache = model.new_cache(batch=2, max_len=32)
    parts = [model(x[:, :10], cache=cache, cache_pos=0), model(x[:, 10:16], cache=cache, cache_pos=10)]
    parts += [model(x[:, t : t + 1], cache=cache, cache_pos=t) for t in range(16, 24)]  # one token at a time
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=ATOL)
    last = model(x[:, :16], last_only=True)
    assert last.shape == (2, 1, 256) and torch.allclose(last[:, 0], full[:, 15], atol=ATOL)


@torch.no_grad()
def test_kv_cache_fan_out_rows(model):
    """A prompt prefilled once and fanned out to 3 samples continues like 3 separate runs."""
    x = _tokens(1, 12)
    cache = model.new_cache(batch=1, max_len=16)
    model(x[:, :8], cache=cache, cache_pos=0)
    for layer_cache in cache:
        layer_cache.select(torch.tensor([0, 0, 0]))
    nxt = _tokens(3, 1, seed=5)
    out = model(nxt, cache=cache, cache_pos=8)
    for i in range(3):
        ref = model(torch.cat([x[:, :8], nxt[i : i + 1]], dim=1))[:, -1]
        assert torch.allclose(out[i], ref, atol=ATOL)


@torch.no_grad()
def test_doc_mask_equals_separate_forwards(model):
    lengths = [5, 9, 6]
    docs = [_tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    restart = torch.cat([torch.arange(n) for n in lengths])[None]
    separate = torch.cat([model(d) for d in docs], dim=1)
    assert torch.allclose(model(packed, doc_ids=doc_ids, positions=restart), separate, atol=ATOL)
    # RoPE is relative, so even without restarting positions the result is the same
    assert torch.allclose(model(packed, doc_ids=doc_ids), separate, atol=1e-4)
    # and without the mask, later documents do see earlier ones
    assert not torch.allclose(model(packed)[:, 5:], separate[:, 5:], atol=1e-3)
    mask = doc_causal_mask(doc_ids)
    assert mask.shape == (1, 1, 20, 20) and mask[0, 0].sum().item() == sum(n * (n + 1) // 2 for n in lengths)


def test_backward_with_doc_mask_on_cpu():
    m = build_model(_args())
    x = _tokens(2, 16)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    emb = {}

    def keep(_mod, _inp, out):
        out.retain_grad()
        emb["h"] = out

    m.tok_embeddings.register_forward_hook(keep)
    logits = m(x, doc_ids=doc_ids)
    logits[0, 6:].logsumexp(-1).sum().backward()  # a loss on document 1 of row 0 only
    grad = emb["h"].grad
    assert grad[0, :6].abs().max().item() == 0.0  # document 0 cannot influence document 1
    assert grad[0, 6:].abs().min().item() > 0.0
    assert grad[1].abs().max().item() == 0.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@torch.no_grad()
def test_gqa_equals_repeated_kv_heads():
    gqa = build_model(_args(n_heads=4, n_kv_heads=2)).eval()
    mha = build_model(_args(n_heads=4, n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    hd = 16
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = sd[key].view(2, hd, 64).repeat_interleave(2, dim=0).reshape(4 * hd, 64)
    mha.load_state_dict(sd)
    x = _tokens(2, 20)
    assert torch.allclose(gqa(x), mha(x), atol=ATOL)
    cache = gqa.new_cache(2, 20)
    assert cache[0].k.shape == (2, 2, 20, 16)  # the cache holds only the kv heads


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_vs_parameter_count(tie):
    args = _args(vocab_size=300, tie_embeddings=tie)
    m = build_model(args, device="meta", init=False)
    norms = sum(p.numel() for n, p in m.named_parameters() if "norm" in n)
    # Weights that multiply activations: everything but the norms and the embedding lookup; a
    # tied table is counted once, as the output projection.
    n_matmul = m.num_params() - norms - (0 if tie else args.vocab_size * args.dim)
    assert flops_per_token(args, 0) == 6 * n_matmul
    s = 64
    assert flops_per_token(args, s) == 6 * n_matmul + 12 * args.n_layers * args.n_heads * args.head_size * s


def _load_preset(name: str, tmp_path: Path) -> TransformerArgs:
    """A preset used the way training configs use it: as the `_base_` of another YAML."""

    @dataclass
    class Wrapper:
        model: TransformerArgs = field(default_factory=TransformerArgs)

    cfg = tmp_path / f"uses_{name}.yaml"
    cfg.write_text(f"_base_: {PRESETS / name}\n")
    return load_config(Wrapper, cfg).model


@pytest.mark.parametrize("name", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_every_preset_loads_and_builds_on_meta(name, tmp_path):
    args = _load_preset(name, tmp_path)
    if args.vocab_size <= 0:
        args.vocab_size = 262  # taken from the tokenizer at build time (bytes + 4 latent tokens)
    m = build_model(args, device="meta", init=False)
    assert m.tok_embeddings.weight.is_meta and m.num_params() > 0
    assert flops_per_token(args, args.max_seqlen) > 6 * (m.num_params() - args.vocab_size * args.dim)


def test_preset_sizes(tmp_path):
    assert set(p.stem for p in PRESETS.glob("*.yaml")) >= {"debug", "tiny", "tinyllama_1b", "llama3_1b"}
    tl = _load_preset("tinyllama_1b.yaml", tmp_path)
    shape = (tl.dim, tl.n_layers, tl.n_heads, tl.kv_heads, tl.ffn_hidden, tl.vocab_size)
    assert shape == (2048, 22, 32, 4, 5632, 32004)
    assert not tl.tie_embeddings and tl.max_seqlen == 2048 and tl.norm_eps == 1e-5 and tl.rope_theta == 10000.0
    n = build_model(tl, device="meta", init=False).num_params()
    assert n == 1_100_064_768  # TinyLlama's 1,100,048,384 + 2 x 4 new rows of 2048
    assert 1.05 < flops_per_token(tl, 2048) / (6 * n) < 1.15  # ~6N plus ~10% attention at 2048
    l3 = _load_preset("llama3_1b.yaml", tmp_path)
    assert l3.tie_embeddings and l3.rope_scaling.factor == 32.0 and l3.rope_theta == 500000.0
    assert build_model(l3, device="meta", init=False).num_params() == 1_235_814_400  # Llama-3.2-1B
    debug = _load_preset("debug.yaml", tmp_path)
    assert (debug.dim, debug.n_layers, debug.n_heads, debug.kv_heads) == (64, 2, 4, 2)


@torch.no_grad()
def test_init_is_seeded_and_depth_scaled():
    a, b = build_model(_args()), build_model(_args())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_model(_args(seed=4))
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)
    # current_depth: the second layer's output projection is initialised smaller than the first's
    std = [layer.attention.wo.weight.std().item() for layer in a.layers]
    assert std[1] < std[0] * 0.85
