"""Convert between local HF Llama folders and our consolidated checkpoints.

    python -m setup.convert_hf import --hf-dir DIR --out CKPT [--add-latent-tokens] [--seed 42]
    python -m setup.convert_hf export --ckpt CKPT --out DIR [--dtype float32|bfloat16] [--overwrite]
                                      [--chat_template FILE|none]

``import`` reads config.json, safetensors/.bin weights and tokenizer files, converts names and the
q/k rotary layout, and (with ``--add-latent-tokens``) adds the four BoLT latent tokens, resizing
embeddings and output (new rows: mean of the old rows + small seeded noise; see lingua/hf.py).
``export`` writes a folder that transformers and vLLM load without custom code: the latent tokens
are non-special added tokens (they survive ``skip_special_tokens=True``), generation defaults are
neutral (greedy), a README.md model card describes the model. ``--chat_template FILE`` stores that
Jinja template in tokenizer_config.json so an OpenAI-compatible server (vLLM, ``transformers
serve``) can serve the export on its chat endpoint (e.g. as a teacher); ``none`` (default): none.
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
    exp.add_argument(
        "--chat_template", "--chat-template", default="none",
        help="Jinja chat template file stored in tokenizer_config.json (for chat servers); none: no template",
    )
    return p


def run(args: argparse.Namespace) -> str:
    """Do the conversion; returns the output folder."""
    from lingua.hf import export_hf, import_hf

    if args.command == "import":
        add = latent_tokens() if args.add_latent_tokens else ()
        return str(import_hf(args.hf_dir, args.out, add_tokens=add, seed=args.seed))
    return str(export_hf(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite,
                         chat_template=read_chat_template(args.chat_template)))


def read_chat_template(value: str) -> str | None:
    """``none`` -> None; otherwise the text of the template file (a missing file is an error)."""
    from pathlib import Path

    from lingua.errors import ExpectedError

    if value.strip().lower() in ("", "none"):
        return None
    path = Path(value)
    if not path.is_file():
        raise ExpectedError(f"--chat_template {value}: no such file (give a Jinja template file or 'none')")
    return path.read_text(encoding="utf-8")


@entry_point("convert_hf")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    print(f"convert_hf {args.command}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
