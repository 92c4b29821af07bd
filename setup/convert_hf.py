"""Convert between local HF Llama folders and our consolidated checkpoints.

    python -m setup.convert_hf import --hf-dir DIR --out CKPT [--add-latent-tokens] [--seed 42]
    python -m setup.convert_hf export --ckpt CKPT --out DIR [--dtype float32|bfloat16] [--overwrite]

``import`` reads config.json, safetensors/.bin weights and tokenizer files, converts names and the
q/k rotary layout, and (with ``--add-latent-tokens``) adds the four BoLT latent tokens, resizing
embeddings and output (new rows: mean of the old rows + small seeded noise; see lingua/hf.py).
``export`` writes a folder that transformers and vLLM load without custom code.
The conversion logic lives in ``lingua/hf.py``; the latent token strings come from the app
(``apps.bolt.formats.SPECIAL_TOKENS``), because the core knows nothing of latents.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lingua.errors import entry_point


def latent_tokens() -> tuple[str, ...]:
    from apps.bolt.formats import SPECIAL_TOKENS

    return tuple(SPECIAL_TOKENS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m setup.convert_hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF Llama folder -> consolidated checkpoint")
    imp.add_argument("--hf-dir", required=True, help="local HF folder (config.json, weights, tokenizer)")
    imp.add_argument("--out", required=True, help="consolidated checkpoint folder to write")
    imp.add_argument("--add-latent-tokens", action="store_true", help="add the 4 latent tokens and resize")
    imp.add_argument("--seed", type=int, default=42, help="seed of the noise on new embedding rows")
    exp = sub.add_parser("export", help="consolidated checkpoint -> HF Llama folder")
    exp.add_argument("--ckpt", required=True, help="consolidated checkpoint folder")
    exp.add_argument("--out", required=True, help="HF folder to write")
    exp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    exp.add_argument("--overwrite", action="store_true", help="rewrite even if already exported")
    return p


def run(args: argparse.Namespace) -> str:
    """Do the conversion; returns the output folder."""
    from lingua.hf import export_hf, import_hf

    if args.command == "import":
        add = latent_tokens() if args.add_latent_tokens else ()
        return str(import_hf(args.hf_dir, args.out, add_tokens=add, seed=args.seed))
    return str(export_hf(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite))


@entry_point("convert_hf")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    print(f"convert_hf {args.command}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
