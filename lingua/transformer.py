"""Llama-style decoder-only transformer: the one model definition for training and decoding.

RMSNorm, rotary embeddings in the Meta (interleaved-pair) layout, grouped-query attention via
``scaled_dot_product_attention``, SwiGLU feed-forward. ``Transformer.forward`` serves:

* training: ``forward(tokens)`` with a causal mask, optionally block-diagonal per document
  (``doc_ids``) for packed sequences; the mask is a dense tensor so backward works on CPU;
* incremental decoding: ``forward(tokens, positions=..., attn_mask=..., cache=KVCache, cache_pos=t)``
  writes the new keys/values into the cache at ``cache_pos`` and attends over ``[0, cache_pos+S)``.

Inference helpers: ``hidden`` + ``logits`` split the forward so a caller computes logits only
where it needs them; ``packed_weights`` runs decoding on input-major fused weight copies.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua.args import check_min
from lingua.kv_cache import KVCache


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
        check_min(self, 1, "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "multiple_of", "max_seqlen")
        if self.vocab_size == 0 or self.vocab_size < -1:
            raise ValueError(f"vocab_size must be >= 1 (or -1: from the tokenizer), got {self.vocab_size}")
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


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angles in ``rot``: x: [B, S, H, D]; rot:
    (cos, sin) pairs [B or 1, S, 1, D/2, 2].

    Eager: one complex multiply (~5x faster on CPU than separate cos/sin products). Under
    ``torch.compile`` the real-valued form, which inductor fuses into one kernel (it cannot
    generate code for complex tensors and would fall back to the eager complex kernel).
    """
    xf = (x if x.dtype == torch.float32 else x.float()).unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        x0, x1, cos, sin = xf[..., 0], xf[..., 1], rot[..., 0], rot[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:
        out = torch.view_as_real(torch.view_as_complex(xf) * torch.view_as_complex(rot)).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


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
        """positions: [B, S] or [S] integer tensor -> (cos, sin) pairs [B|1, S, 1, D/2, 2]."""
        if positions.dim() == 1:
            positions = positions[None]
        angles = positions.float()[..., None] * self.freqs
        return torch.stack((angles.cos(), angles.sin()), dim=-1)[:, :, None]


# --------------------------------------------------------------------------------------------
# layers


class _RMSNormFn(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward for eager CPU training.

    On CPU ``F.rms_norm`` is a composite of ~6 element-wise ops and autograd differentiates each
    one, so its backward passes over the [B, S, dim] activations about a dozen times; this one
    saves only the input and the per-row scale and takes ~4 passes (fwd+bwd ~2x faster, ~6% of
    an eager training step). Under ``torch.compile`` inductor fuses ``F.rms_norm`` instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd
        grad_weight = (grad * xhat).flatten(0, -2).sum(0)
        grad_xhat = grad * weight
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)), with g = grad * weight
        mean = torch.linalg.vecdot(grad_xhat, xhat).unsqueeze(-1).div_(x.shape[-1])
        return grad_xhat.sub_(xhat.mul_(mean)).mul_(rstd), grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in float32 whatever the activation dtype."""
        if x.dtype == self.weight.dtype == torch.float32:  # skips three no-op casts
            if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                return _RMSNormFn.apply(x, self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.kv_heads, args.head_size
        self.wq = nn.Linear(args.dim, self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, args.dim, bias=False)
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None  # see Transformer.packed_weights

    def pack(self) -> None:
        wqkv = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
        self.packed = (wqkv.t().contiguous(), self.wo.weight.t().contiguous())

    def forward(self, x, rot, attn_mask, cache: KVCache | None, cache_pos: int):
        bsz, seqlen, _ = x.shape
        packed = None if torch.is_grad_enabled() else self.packed
        if packed is None:
            q = apply_rope(self.wq(x).view(bsz, seqlen, self.n_heads, self.hd), rot)
            k = apply_rope(self.wk(x).view(bsz, seqlen, self.n_kv, self.hd), rot)
            v = self.wv(x).view(bsz, seqlen, self.n_kv, self.hd)
        else:  # q and k sit side by side in the fused output: rotate them in one go
            qkv = (x @ packed[0]).view(bsz, seqlen, self.n_heads + 2 * self.n_kv, self.hd)
            q, k = apply_rope(qkv[:, :, : self.n_heads + self.n_kv], rot).split([self.n_heads, self.n_kv], dim=2)
            v = qkv[:, :, self.n_heads + self.n_kv :]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if cache is not None:
            k, v = cache.update(k, v, cache_pos)
        # GQA inside the kernel: no repeated copies of the keys/values (nor their gradients). On
        # GPUs the kernel that takes a mask has no GQA mode: repeat there, as before.
        gqa = self.n_kv != self.n_heads
        if gqa and attn_mask is not None and q.device.type != "cpu":
            rep = self.n_heads // self.n_kv
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=gqa)
        else:  # an additive float32 mask (see ``additive_mask``) follows low-precision queries
            mask = attn_mask if attn_mask.dtype in (torch.bool, q.dtype) else attn_mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.wo(out) if packed is None else out @ packed[1]

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
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None  # see Transformer.packed_weights

    def pack(self) -> None:
        w13 = torch.cat([self.w1.weight, self.w3.weight])
        self.packed = (w13.t().contiguous(), self.w2.weight.t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = None if torch.is_grad_enabled() else self.packed
        if packed is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = (x @ packed[0]).chunk(2, dim=-1)
        return F.silu(gate, inplace=True).mul_(up) @ packed[1]  # no autograd here: reuse the buffer

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

    def forward(self, x, rot, attn_mask=None, cache=None, cache_pos=0):
        h = x + self.attention(self.attention_norm(x), rot, attn_mask, cache, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def doc_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal boolean mask [B, 1, S, S] from per-token document ids [B, S]."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask (True = attend) -> 0 / -inf bias. SDPA makes this same conversion for a
    boolean mask in every layer; doing it once per forward saves ``n_layers - 1`` of them."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


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
        self.packed_output: torch.Tensor | None = None  # see packed_weights

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
        causal mask; ``attn_mask`` ([B|1, 1, S, T]: bool, True = attend, or an additive float
        mask) overrides it and is required when decoding rows of different lengths from a cache.
        """
        h = self._trunk(tokens, positions, doc_ids, attn_mask, cache, cache_pos)
        if last_only:
            h = h[:, -1:]
        return self.logits(self.norm(h))

    def hidden(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        cache_pos: int = 0,
    ) -> torch.Tensor:
        """What ``forward`` feeds the output projection: final-normed states [B, S, dim].

        ``logits(hidden(...)[where])`` computes logits only where needed (scoring: the
        continuation tokens). Inference on an unsharded model: unlike ``forward``, this method
        runs no FSDP hooks.
        """
        return self.norm(self._trunk(tokens, positions, doc_ids, attn_mask, cache, cache_pos))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output projection of final-normed states [..., dim] -> [..., V]."""
        if self.packed_output is not None and not torch.is_grad_enabled():
            return h @ self.packed_output
        return self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)

    def _trunk(self, tokens, positions, doc_ids, attn_mask, cache, cache_pos) -> torch.Tensor:
        _, seqlen = tokens.shape
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + seqlen, device=tokens.device)
        if attn_mask is None and doc_ids is not None:
            attn_mask = doc_causal_mask(doc_ids)
        if attn_mask is None and cache is not None and cache_pos > 0:
            causal = torch.ones(seqlen, cache_pos + seqlen, dtype=torch.bool, device=tokens.device)
            attn_mask = causal.tril(diagonal=cache_pos)[None, None]
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = additive_mask(attn_mask)
        rot = self.rope_embeddings(positions)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, attn_mask, None if cache is None else cache[i], cache_pos)
        return h

    @contextlib.contextmanager
    def packed_weights(self) -> Iterator[None]:
        """Within this block, forwards without autograd multiply by input-major ([in, out])
        copies of the weights, with q/k/v and gate/up each concatenated into one matrix.

        Why: on CPU, MKL multiplies a few rows (decoding: one per sequence) by an input-major
        matrix ~20% faster than by the transposed view ``nn.Linear`` passes, and the fused
        matrices halve the calls. Results are the same products (equal up to float summation
        order). The copies cost one more set of projection weights while the block runs and are
        taken at entry, so weights must not change inside it. A no-op off CPU, for sharded
        (DTensor) weights, and when already active; forwards that record gradients ignore it.
        """
        params = list(self.parameters())
        if self.packed_output is not None or any(type(p) is not nn.Parameter or p.device.type != "cpu" for p in params):
            yield
            return
        units = [m for layer in self.layers for m in (layer.attention, layer.feed_forward)]
        with torch.no_grad():
            for unit in units:
                unit.pack()
            weight = self.output.weight if self.output is not None else self.tok_embeddings.weight
            self.packed_output = weight.t().contiguous()
        try:
            yield
        finally:
            for unit in units:
                unit.packed = None
            self.packed_output = None

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None, *, zero: bool = True) -> list[KVCache]:
        """One :class:`KVCache` per layer (``zero=False``: uninitialised, see there)."""
        p = self.tok_embeddings.weight
        dtype, device = dtype or p.dtype, device or p.device
        return [
            KVCache(batch, max_len, self.args.kv_heads, self.args.head_size, dtype, device, zero=zero)
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
