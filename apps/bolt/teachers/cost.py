"""Back-of-the-envelope cost of a teacher run: ``python -m apps.bolt.teachers.cost [key=value ...]``.

Estimates input and output tokens from the raw-token count of a corpus and prices them, e.g.
the reference's ~240M-token warmstart corpus with GPT-4o-mini Batch prices::

    python -m apps.bolt.teachers.cost method=latent_thoughts raw_tokens=240e6

Model of the request stream (all knobs are config fields, documented below):

* ``latent_thoughts``: one request per chunk, ``raw_tokens / tokens_per_chunk`` chunks; each
  prompt holds the instructions, the prefix (the previous chunk) and the suffix, so about
  ``instruction + 2 * tokens_per_chunk`` tokens; output = ``output_ratio * raw_tokens``.
* WRAP methods: one request per document and repeat; each prompt holds the instructions and
  the document; output = ``num_repeats * output_ratio * raw_tokens``.

Instruction tokens are measured on the prompt file as characters / ``chars_per_token``.
Actual counts of a finished run are in its ``lineage.json`` (``teacher_totals``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from apps.bolt.teachers.api import PriceArgs
from apps.bolt.teachers.prompts import PromptSpec
from lingua.args import parse_args
from lingua.errors import entry_point

# Output tokens per raw token, from the reference's plotting ratios (the original BoLT code's notebooks):
# latent data is 3.3x the raw tokens in all, so the latents add 2.3x; a WRAP-Orig paraphrase is
# 0.48x and a WRAP-CoT paraphrase 0.70x the raw document.
OUTPUT_RATIO = {"latent_thoughts": 2.3, "wrap_baseline": 0.4808, "wrap_cot": 0.7008}


@dataclass
class CostArgs:
    method: str = "latent_thoughts"
    raw_tokens: float = 240e6
    """Raw tokens of the corpus (the reference warmstart: ~240M)."""
    tokens_per_chunk: float = 200.0
    """Mean chunk (suffix) length: 8 sentences of ~25 tokens under the reference chunking."""
    tokens_per_doc: float = 1434.0
    """Mean document length (FineMath-4+ warmstart split: ~480M tokens over 334,640 documents)."""
    output_ratio: Optional[float] = None
    """Output tokens per raw token and repeat; None: the reference ratio of the method."""
    num_repeats: Optional[int] = None
    """None: the method's default."""
    chars_per_token: float = 4.0
    prices: PriceArgs = field(default_factory=PriceArgs)
    sync_price_factor: float = 2.0
    """Live (non-batch) calls cost this many times the batch price."""


def instruction_tokens(spec: PromptSpec, chars_per_token: float) -> float:
    """Tokens of the fixed prompt text (system + mean template, placeholders removed)."""
    templates = [re.sub(r"\{\w+\}", "", t) for t in spec.templates]
    chars = len(spec.system or "") + sum(map(len, templates)) / len(templates)
    if spec.chunked:
        chars += len(spec.empty_prefix) / 2  # only first chunks carry the placeholder text
    return chars / chars_per_token


def estimate(args: CostArgs) -> dict:
    spec = PromptSpec.for_method(args.method)
    repeats = args.num_repeats if args.num_repeats is not None else spec.defaults.num_repeats
    ratio = args.output_ratio if args.output_ratio is not None else OUTPUT_RATIO[args.method]
    instr = instruction_tokens(spec, args.chars_per_token)
    if spec.chunked:
        requests = args.raw_tokens / args.tokens_per_chunk * repeats
        input_tokens = requests * (instr + 2 * args.tokens_per_chunk)
    else:
        requests = args.raw_tokens / args.tokens_per_doc * repeats
        input_tokens = requests * instr + args.raw_tokens * repeats
    output_tokens = ratio * args.raw_tokens * repeats
    batch_cost = args.prices.cost(int(input_tokens), int(output_tokens))
    return {
        "method": args.method,
        "model": spec.defaults.model,
        "raw_tokens": args.raw_tokens,
        "num_repeats": repeats,
        "requests": round(requests),
        "instruction_tokens_per_request": round(instr, 1),
        "input_tokens": round(input_tokens),
        "output_tokens": round(output_tokens),
        "batch_cost_usd": round(batch_cost, 2),
        "sync_cost_usd": round(batch_cost * args.sync_price_factor, 2),
        "prices_usd_per_mtok": {"input": args.prices.input_per_mtok, "output": args.prices.output_per_mtok},
    }


@entry_point("apps.bolt.teachers.cost")
def main(argv: list[str] | None = None) -> None:
    print(json.dumps(estimate(parse_args(CostArgs, argv)), indent=2))


if __name__ == "__main__":
    main()
