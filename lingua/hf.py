"""HF Llama interop: import a local ``transformers`` Llama folder as a consolidated checkpoint,
and export a consolidated checkpoint as an HF Llama folder that ``transformers`` and vLLM load
without custom code.

Rotary layout
    Our attention rotates interleaved pairs (x[2i], x[2i+1]) (Meta layout); HF's ``rotate_half``
    pairs x[i] with x[i + d/2]. The two are the same function once the rows of ``wq`` (per query
    head) and ``wk`` (per kv head) are permuted; ``wv``/``wo`` are unchanged. Forgetting the
    permutation gives silently wrong logits, so the tests compare logits against transformers.

Added tokens (``import_hf(..., add_tokens=...)``)
    New ids get embedding rows, and for untied models output rows, equal to the MEAN of the
    existing rows plus small seeded Gaussian noise (std = ``NEW_ROW_NOISE`` x the rows' std).
    The reference drew new rows from N(0, dim^-0.5) clamped to ±3σ (seed 42), whose output rows
    can give the new tokens large random logits before any training. With mean rows the new
    tokens start with about the average logit, so the imported model's distribution over the old
    vocabulary barely moves, and the noise keeps the four tokens distinguishable. Existing rows
    are never touched.

Tokenizers on export
    The exported tokenizer.json encodes WITHOUT a dummy prefix, exactly like ``lingua.tokenizer``
    (see its docstring), so transformers/vLLM tokenize prompts the way the model was trained.
    BOS/EOS/PAD are special tokens there. The tokens added on top of the base tokenizer
    (``Tokenizer.extra_special_tokens``: BoLT's four latent tokens) are exported as added tokens
    that are NOT special: each still encodes to its single id, but decoding with
    ``skip_special_tokens=True`` (the default of lm-eval's ``hf`` model and of vLLM) keeps them, so
    a completion such as ``<|START_OF_LATENT|>...<|END_OF_LATENT|> 5`` reaches a grader intact.

Generation defaults on export
    ``generation_config.json`` holds neutral defaults (greedy: ``do_sample: false``, temperature
    and top-p 1.0) and ``pad_token_id`` (PAD, else EOS); callers choose their own sampling.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lingua.consolidated import fingerprint, load_consolidated, read_extra, save_consolidated
from lingua.io import DONE_MARKER, atomic_path, atomic_write_json, atomic_write_text, is_done, mark_done
from lingua.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerArgs,
    build_tokenizer,
)
from lingua.hf_tokenizer import write_hf_tokenizer
from lingua.locks import RunLock
from lingua.transformer import RopeScaling, Transformer, TransformerArgs

NEW_ROW_NOISE = 0.02  # noise std of added rows, relative to the std of the existing rows
EXPORT_WAIT_S = 1800.0  # how long a concurrent exporter waits for the one exporting (a 1.1B export: minutes)
EXPORT_POLL_S = 2.0
GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0}  # neutral: callers choose

_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


# ----------------------------------------------------------------------------------------------
# rotary permutation and names


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection: interleaved pairs per head -> rotate_half halves per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_to_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_lingua_state_dict(hf_sd: dict[str, torch.Tensor], args: TransformerArgs) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` names/layout -> ours. Unknown keys are an error (e.g. biases)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, w in hf_sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = key if key.startswith(("model.", "lm_head")) else f"model.{key}"  # bare LlamaModel
        stem, _, leaf = name.rpartition(".")
        if stem in _TOP_MAP:
            if stem == "lm_head" and args.tie_embeddings:
                continue  # tied: the embedding is the output projection
            out[f"{_TOP_MAP[stem]}.{leaf}"] = w
            continue
        parts = stem.split(".", 3)  # model, layers, i, rest
        if len(parts) == 4 and parts[1] == "layers" and parts[3] in _LAYER_MAP:
            ours = _LAYER_MAP[parts[3]]
            if ours == "attention.wq":
                w = permute_from_hf(w, args.n_heads)
            elif ours == "attention.wk":
                w = permute_from_hf(w, args.kv_heads)
            out[f"layers.{parts[2]}.{ours}.{leaf}"] = w
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unsupported HF Llama weights (not a plain Llama?): {sorted(unknown)[:8]}")
    return out


def lingua_to_hf_state_dict(sd: dict[str, torch.Tensor], args: TransformerArgs) -> dict[str, torch.Tensor]:
    """Our names/layout -> HF ``LlamaForCausalLM`` (no ``lm_head`` when embeddings are tied)."""
    top = {v: k for k, v in _TOP_MAP.items()}
    layer = {v: k for k, v in _LAYER_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, w in sd.items():
        stem, _, leaf = key.rpartition(".")
        if stem in top:
            out[f"{top[stem]}.{leaf}"] = w
            continue
        _, i, rest = stem.split(".", 2)
        if rest == "attention.wq":
            w = permute_to_hf(w, args.n_heads)
        elif rest == "attention.wk":
            w = permute_to_hf(w, args.kv_heads)
        out[f"model.layers.{i}.{layer[rest]}.{leaf}"] = w
    return out


# ----------------------------------------------------------------------------------------------
# configs


def from_llama_config(cfg: dict, where: str = "config.json") -> TransformerArgs:
    """TransformerArgs from an HF Llama ``config.json`` dict (transformers 4 or 5 rope keys)."""
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"{where}: model_type {model_type!r} is not 'llama'")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
    rope = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    rope = {**legacy, **rope}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = RopeScaling()
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_seqlen=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (default, llama3)")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    return TransformerArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=None if head_dim in (None, dim // heads) else head_dim,
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"],
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seqlen=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def to_llama_config(args: TransformerArgs, tokenizer: Optional[Tokenizer] = None):
    """A ``transformers.LlamaConfig`` equivalent to ``args`` (fp32 weights)."""
    from transformers import LlamaConfig

    return LlamaConfig(**_llama_config_kwargs(args, tokenizer))


def _llama_config_kwargs(args: TransformerArgs, tokenizer: Optional[Tokenizer]) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    if args.rope_scaling.factor != 1.0:
        s = args.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=float(s.factor),
            low_freq_factor=float(s.low_freq_factor),
            high_freq_factor=float(s.high_freq_factor),
            original_max_position_embeddings=int(s.original_max_seqlen),
        )
    kw: dict[str, Any] = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_size,
        max_position_embeddings=args.max_seqlen,
        rms_norm_eps=args.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=args.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    if tokenizer is not None:
        kw.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=pad_token_id(tokenizer))
    return kw


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's PAD id, else EOS (what HF generation pads batches with)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


# ----------------------------------------------------------------------------------------------
# reading HF folders


def load_hf_state_dict(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a local HF folder: (sharded) safetensors preferred, else (sharded) .bin."""
    d = Path(hf_dir)
    layouts = (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    )
    for single, index in layouts:
        if (d / index).is_file():
            files = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
        elif (d / single).is_file():
            files = [single]
        else:
            continue
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            if not (d / f).is_file():
                raise FileNotFoundError(f"{d / index}: lists {f}, which is missing")
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd.update(load_file(str(d / f)))
            else:
                sd.update(torch.load(d / f, map_location="cpu", weights_only=True))
        return sd
    raise FileNotFoundError(f"{d}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def _hf_tokenizer_args(hf_dir: Path, add_tokens: Sequence[str]) -> TokenizerArgs:
    if (hf_dir / HFTokenizer.FILE).is_file():
        return TokenizerArgs("hf", str(hf_dir / HFTokenizer.FILE), list(add_tokens))
    if (hf_dir / SentencePieceTokenizer.FILE).is_file():
        return TokenizerArgs("sp", str(hf_dir / SentencePieceTokenizer.FILE), list(add_tokens))
    raise FileNotFoundError(f"{hf_dir}: no tokenizer.json or tokenizer.model")


def _init_new_rows(w: torch.Tensor, old_rows: int, new_ids: Sequence[int], gen: torch.Generator) -> None:
    """Rows ``new_ids`` := mean of rows [0, old_rows) + N(0, (NEW_ROW_NOISE * std)^2)."""
    base = w[:old_rows].double()
    mean, std = base.mean(0), base.std(0).mean()
    noise = torch.randn(len(new_ids), w.shape[1], generator=gen, dtype=torch.float64) * (NEW_ROW_NOISE * std)
    w[list(new_ids)] = (mean[None] + noise).to(w.dtype)


def import_hf(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    add_tokens: Sequence[str] = (),
    seed: int = 42,
) -> Path:
    """Local HF Llama folder -> consolidated folder (fp32), optionally with added tokens."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not an HF model folder?)")
    cfg = json.loads((hf_dir / "config.json").read_text())
    args = from_llama_config(cfg, str(hf_dir / "config.json"))
    base_tok = build_tokenizer(_hf_tokenizer_args(hf_dir, ()))
    tokenizer = build_tokenizer(_hf_tokenizer_args(hf_dir, add_tokens))
    new_ids = sorted(i for i in tokenizer.special_ids.values() if i >= base_tok.vocab_size)
    if base_tok.vocab_size > args.vocab_size:
        raise ValueError(f"{hf_dir}: tokenizer has {base_tok.vocab_size} ids but vocab_size={args.vocab_size}")

    sd = {k: v.float() for k, v in hf_to_lingua_state_dict(load_hf_state_dict(hf_dir), args).items()}
    old_vocab = args.vocab_size
    args.vocab_size = max(old_vocab, tokenizer.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    for key in ("tok_embeddings.weight", "output.weight"):
        if key not in sd:
            continue
        w = sd[key]
        if w.shape[0] != old_vocab:
            raise ValueError(f"{hf_dir}: {key} has {w.shape[0]} rows, config vocab_size={old_vocab}")
        if args.vocab_size > old_vocab:
            w = torch.cat([w, w.new_zeros(args.vocab_size - old_vocab, w.shape[1])])
        if new_ids:
            _init_new_rows(w, base_tok.vocab_size, new_ids, gen)
        sd[key] = w

    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(sd, strict=True, assign=True)
    extra = {"source": str(hf_dir.resolve()), "added_tokens": list(add_tokens), "new_ids": new_ids, "seed": seed}
    return save_consolidated(model, tokenizer, out, extra=extra)


# ----------------------------------------------------------------------------------------------
# export


def export_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    overwrite: bool = False,
    chat_template: Optional[str] = None,
) -> Path:
    """Consolidated folder -> HF Llama folder (model.safetensors, config.json,
    generation_config.json, tokenizer.json + tokenizer_config.json, README.md model card,
    COMPLETE). ``chat_template``: a Jinja chat template (text) written into
    tokenizer_config.json, for serving the export through an OpenAI-compatible chat endpoint;
    None: no template (completion endpoints only).

    Skips the work when ``out_dir`` is already complete for the same source and options. Processes
    exporting to one ``out_dir`` at once (the shards of a vLLM E-step, started together) take
    turns through a lock file beside it (``<out_dir>.lock``, waited for up to
    ``EXPORT_WAIT_S``): one exports, the others find the export complete."""
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    source = fingerprint(ckpt)
    template_hash = None if chat_template is None else hashlib.sha256(chat_template.encode()).hexdigest()[:16]
    wanted = (source, dtype, template_hash)
    if not overwrite and _exported(out, wanted):
        return out
    with RunLock.beside(out, "HF export").acquire(wait_s=EXPORT_WAIT_S, poll_s=EXPORT_POLL_S):
        if not overwrite and _exported(out, wanted):  # done by the process we waited for
            return out
        _write_export(ckpt, out, dtype, chat_template, source, template_hash)
    return out


def _exported(out: Path, wanted: tuple) -> bool:
    """``out`` is a complete export of (source fingerprint, dtype, chat template hash)."""
    if not is_done(out):
        return False
    done = json.loads((out / DONE_MARKER).read_text())
    return (done.get("source_fingerprint"), done.get("dtype"), done.get("chat_template_sha256")) == wanted


def _write_export(ckpt: Path, out: Path, dtype: str, chat_template: Optional[str], source: str,
                  template_hash: Optional[str]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_MARKER).unlink(missing_ok=True)
    model, tokenizer = load_consolidated(ckpt)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    hf_sd = lingua_to_hf_state_dict(model.state_dict(), model.args)
    hf_sd = {k: v.to(torch_dtype).contiguous() for k, v in hf_sd.items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(hf_sd, str(tmp), metadata={"format": "pt"})

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype}
    config.update(_llama_config_kwargs(model.args, tokenizer))
    # Older readers (transformers 4.x, as bundled with many vLLM builds) look for these keys.
    rope = config["rope_parameters"]
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = None if rope["rope_type"] == "default" else dict(rope)
    atomic_write_json(out / "config.json", config)
    gen = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": pad_token_id(tokenizer),
        **GENERATION_DEFAULTS,
    }
    atomic_write_json(out / "generation_config.json", gen)
    write_hf_tokenizer(tokenizer, out, chat_template=chat_template)
    extra = read_extra(ckpt)
    n_params = sum(v.numel() for v in hf_sd.values())
    atomic_write_text(out / "README.md", model_card(model.args, tokenizer, n_params, dtype, chat_template is not None, extra))
    info = {
        "source": str(ckpt.resolve()),
        "source_fingerprint": source,
        "dtype": dtype,
        "chat_template_sha256": template_hash,
        "extra": extra,
    }
    mark_done(out, info)


def model_card(
    args: TransformerArgs, tokenizer: Tokenizer, n_params: int, dtype: str, has_chat_template: bool, extra: dict
) -> str:
    """README.md of an export: what the model is, its tokens, how to load and evaluate it."""
    names = {"BOS": tokenizer.bos_id, "EOS": tokenizer.eos_id, "PAD": tokenizer.pad_id}
    rows = [f"| `{tokenizer.decode([i])}` | {i} | {role} (special) |" for role, i in names.items() if i is not None]
    rows += [
        f"| `{t}` | {tokenizer.special_ids[t]} | added, NOT special: kept by `skip_special_tokens=True` |"
        for t in tokenizer.extra_special_tokens
    ]
    latent = bool(tokenizer.extra_special_tokens)
    lines = [
        "# Exported causal LM (Llama architecture)",
        "",
        "Exported from a consolidated checkpoint of this project (`python -m setup.convert_hf export`).",
        "Plain `LlamaForCausalLM`: transformers and vLLM load it without custom code.",
        "",
        f"- parameters: {n_params:,} ({args.n_layers} layers, width {args.dim}, {args.n_heads} heads, "
        f"{args.kv_heads} kv heads), weights in {dtype}",
        f"- vocabulary: {args.vocab_size} ids, context: {args.max_seqlen} tokens",
        f"- source: `{extra.get('source', 'trained here')}`" if extra.get("source") else "- source: trained with this project",
        "",
        "## Tokens",
        "",
        "The tokenizer adds no dummy prefix (prompts tokenize as in training); BOS is prepended by",
        "`add_special_tokens=True`.",
        "",
        "| token | id | role |",
        "|---|---|---|",
        *rows,
        "",
    ]
    if latent:
        lines += [
            "The latent-thought tokens are single ids but not special tokens, so default decoding",
            "(`skip_special_tokens=True`, as lm-eval's `hf` model and vLLM do) keeps them: answer",
            "extraction after `<|END_OF_LATENT|>` sees the same text as in this project's engine.",
            "A model trained with prior thoughts answers a prompt that ends in",
            "`<|START_OF_LATENT|><|PRIOR_PREFIX|>` by thinking, closing with `<|END_OF_LATENT|>`, then",
            "answering.",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(DIR)",
        "model = AutoModelForCausalLM.from_pretrained(DIR)",
        "ids = tok(prompt, return_tensors='pt').input_ids",
        "text = tok.decode(model.generate(ids, max_new_tokens=256)[0, ids.shape[1]:], skip_special_tokens=True)",
        "```",
        "",
        "`generation_config.json` is neutral (greedy; temperature and top-p 1.0); pass your own",
        "sampling settings. Evaluate with lm-eval (`lm_eval --model hf --model_args pretrained=DIR`,",
        "needs `accelerate`), or with this project's engine on the consolidated checkpoint",
        "(`python -m apps.bolt.eval` / `bolt-lm-eval`, see docs/evaluation.md).",
        "",
        "Chat template: " + ("included (tokenizer_config.json), so OpenAI-compatible chat servers "
                             "(vLLM, `transformers serve`) can serve it." if has_chat_template else
                             "none (completion endpoints only; export with `--chat_template FILE` to add one)."),
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "export_hf",
    "from_llama_config",
    "hf_to_lingua_state_dict",
    "import_hf",
    "lingua_to_hf_state_dict",
    "load_hf_state_dict",
    "model_card",
    "pad_token_id",
    "permute_from_hf",
    "permute_to_hf",
    "to_llama_config",
    "write_hf_tokenizer",
]
