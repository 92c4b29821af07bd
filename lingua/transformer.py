"""Llama-style decoder-only transformer: the one model definition for training and decoding.

RMSNorm, rotary embeddings in the Meta (interleaved-pair) layout, grouped-query attention via
``scaled_dot_product_attention``, SwiGLU feed-forward. ``Transformer.forward`` serves:

* training: ``forward(tokens)`` with a causal mask, optionally block-diagonal per document
  (``doc_ids``) for packed sequences; the mask is a dense boolean tensor so backward works on CPU;
* incremental decoding: ``forward(tokens, positions=..., attn_mask=..., cache=KVCache, cache_pos=t)``
  writes the new keys/values into the cache at ``cache_pos`` and attends over ``[0, cache_pos+S)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RopeScaling:
    """Llama-3 style frequency scaling (disabled when ``factor`` is 1)."""

    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seqlen: int = 8192


@dataclass
class TransformerArgs:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no GQA)
    head_dim: Optional[int] = None  # None: dim // n_heads
    vocab_size: int = -1  # -1: taken from the tokenizer at build time
    hidden_dim: Optional[int] = None  # explicit FFN width; otherwise the multiplier rule below
    ffn_dim_multiplier: Optional[float] = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seqlen: int = 1024
    tie_embeddings: bool = False
    init_std_factor: str = "current_depth"  # disabled | global_depth | current_depth
    init_base_std: Optional[float] = None  # None: dim ** -0.5
    seed: int = 42

    def validate(self) -> None:
        if self.dim % self.n_heads and self.head_dim is None:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
        if self.init_std_factor not in ("disabled", "global_depth", "current_depth"):
            raise ValueError(f"init_std_factor must be disabled|global_depth|current_depth, got {self.init_std_factor!r}")
        if (self.head_dim or self.dim // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    # derived values -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# --------------------------------------------------------------------------------------------
# rotary embeddings


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None and scaling.factor != 1.0:
        low_wavelen = scaling.original_max_seqlen / scaling.low_freq_factor
        high_wavelen = scaling.original_max_seqlen / scaling.high_freq_factor
        wavelen = 2 * math.pi / freqs
        smooth = (scaling.original_max_seqlen / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        freqs = torch.where(mid, (1 - smooth) * freqs / scaling.factor + smooth * freqs, scaled)
    return freqs.float()


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as complex numbers: x: [B, S, H, D]; freqs_cis:
    complex [B or 1, S, 1, D/2]. One complex multiply is ~5x faster on CPU than the real-valued
    form with separate cos/sin products."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)


class RotaryEmbedding(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.register_buffer("freqs", torch.empty(args.head_size // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.freqs.device.type != "meta":
            self.freqs.copy_(rope_frequencies(self.args.head_size, self.args.rope_theta, self.args.rope_scaling))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [B, S] or [S] integer tensor -> complex rotations [B|1, S, 1, D/2]."""
        if positions.dim() == 1:
            positions = positions[None]
        angles = positions.float()[..., None] * self.freqs
        return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


# --------------------------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: [B, n_kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = k.shape[2]
        self.k[:, :, pos : pos + s] = k
        self.v[:, :, pos : pos + s] = v
        return self.k[:, :, : pos + s], self.v[:, :, : pos + s]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) batch rows, e.g. to fan a shared prompt out to n samples."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.kv_heads, args.head_size
        self.wq = nn.Linear(args.dim, self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, args.dim, bias=False)

    def forward(self, x, freqs_cis, attn_mask, cache: KVCache | None, cache_pos: int):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.hd)
        k = self.wk(x).view(bsz, seqlen, self.n_kv, self.hd)
        v = self.wv(x).view(bsz, seqlen, self.n_kv, self.hd)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if cache is not None:
            k, v = cache.update(k, v, cache_pos)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def reset_parameters(self, in_std: float, out_std: float) -> None:
        for w in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(w.weight, std=in_std, a=-3 * in_std, b=3 * in_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def reset_parameters(self, in_std: float, out_std: float) -> None:
        for w in (self.w1, self.w3):
            nn.init.trunc_normal_(w.weight, std=in_std, a=-3 * in_std, b=3 * in_std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


class TransformerBlock(nn.Module):
    def __init__(self, args: TransformerArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis, attn_mask=None, cache=None, cache_pos=0):
        h = x + self.attention(self.attention_norm(x), freqs_cis, attn_mask, cache, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def doc_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal boolean mask [B, 1, S, S] from per-token document ids [B, S]."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


class Transformer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("TransformerArgs.vocab_size must be resolved (>0) before building the model")
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.rope_embeddings = RotaryEmbedding(args)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)

    # ---------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        cache_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V] (or [B, 1, V] with ``last_only``).

        ``positions`` default to ``cache_pos + arange(S)``. ``doc_ids`` builds a per-document
        causal mask; ``attn_mask`` (bool, [B|1, 1, S, T], True = attend) overrides it and is
        required when decoding rows of different lengths from a cache.
        """
        _, seqlen = tokens.shape
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + seqlen, device=tokens.device)
        if attn_mask is None and doc_ids is not None:
            attn_mask = doc_causal_mask(doc_ids)
        if attn_mask is None and cache is not None and cache_pos > 0:
            causal = torch.ones(seqlen, cache_pos + seqlen, dtype=torch.bool, device=tokens.device)
            attn_mask = causal.tril(diagonal=cache_pos)[None, None]
        freqs_cis = self.rope_embeddings(positions)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs_cis, attn_mask, None if cache is None else cache[i], cache_pos)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        return self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        p = self.tok_embeddings.weight
        return [
            KVCache(batch, max_len, self.args.kv_heads, self.args.head_size, dtype or p.dtype, device or p.device)
            for _ in self.layers
        ]

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Truncated-normal init; output projections scaled by depth (``init_std_factor``)."""
        a = self.args
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(a.seed if seed is None else seed)
        try:
            base = a.init_base_std or a.dim**-0.5
            self.rope_embeddings.reset_parameters()
            nn.init.trunc_normal_(self.tok_embeddings.weight, std=base, a=-3 * base, b=3 * base)
            for layer in self.layers:
                factor = {
                    "disabled": 1.0,
                    "global_depth": (2 * a.n_layers) ** 0.5,
                    "current_depth": (2 * (layer.layer_id + 1)) ** 0.5,
                }[a.init_std_factor]
                layer.attention.reset_parameters(base, base / factor)
                layer.feed_forward.reset_parameters(base, (a.ffn_hidden**-0.5) / factor)
                layer.attention_norm.reset_parameters()
                layer.ffn_norm.reset_parameters()
            self.norm.reset_parameters()
            if self.output is not None:
                nn.init.trunc_normal_(self.output.weight, std=base, a=-3 * base, b=3 * base)
        finally:
            torch.random.set_rng_state(gen_state)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n


def flops_per_token(args: TransformerArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N_matmul + 12 * L * H * Dh * S.

    N_matmul counts the weight matrices that multiply activations (attention, FFN, output
    projection; not the embedding lookup). The second term is causal-agnostic attention
    score/value work, as in the PaLM appendix.
    """
    d, L, hd = args.dim, args.n_layers, args.head_size
    attn = d * hd * (args.n_heads * 2 + args.kv_heads * 2)
    ffn = 3 * d * args.ffn_hidden
    n_matmul = L * (attn + ffn) + d * args.vocab_size
    return 6.0 * n_matmul + 12.0 * L * args.n_heads * hd * seq_len


def build_model(args: TransformerArgs, device: str | torch.device = "cpu", init: bool = True) -> Transformer:
    """Allocate directly on ``device`` (``"meta"`` allocates nothing: shapes and counts only)."""
    with torch.device(device):
        model = Transformer(args)
    if init:
        model.init_weights()
    return model
