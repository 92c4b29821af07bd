"""Download an HF Llama checkpoint (default TinyLlama/TinyLlama_v1.1) and import it as a
consolidated checkpoint, optionally with the four latent tokens added (the cluster path).

    python -m setup.download_hf_ckpt --out CKPT [--model TinyLlama/TinyLlama_v1.1]
        [--hf-dir DIR] [--revision REV] [--add-latent-tokens] [--seed 42]

Without network (or with HF_HUB_OFFLINE=1 and nothing cached) it prints one line saying so and
exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

# Files an HF Llama import needs; weights are chosen below (safetensors preferred over .bin).
_META = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
         "special_tokens_map.json"]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m setup.download_hf_ckpt", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="TinyLlama/TinyLlama_v1.1", help="hub repo id")
    p.add_argument("--out", required=True, help="consolidated checkpoint folder to write")
    p.add_argument("--hf-dir", default=None, help="where to keep the HF files (default: OUT/../<name>-hf)")
    p.add_argument("--revision", default=None)
    p.add_argument("--add-latent-tokens", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    return p


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """Fail fast (instead of the hub client's minute of retries) when the hub is unreachable."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    with socket.create_connection((url.hostname, port), timeout=timeout):
        pass


def download(model: str, hf_dir: Path, revision: str | None) -> Path:
    """Fetch config, tokenizer and weights (safetensors if the repo has them) into ``hf_dir``;
    with HF_HUB_OFFLINE set, only what the local hub cache already holds."""
    from huggingface_hub import HfApi, constants, snapshot_download

    safetensors = ["*.safetensors", "*.safetensors.index.json"]
    bins = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    if constants.HF_HUB_OFFLINE:
        weights = safetensors + bins
    else:
        _check_reachable(constants.ENDPOINT)
        files = HfApi().list_repo_files(model, revision=revision)
        weights = safetensors if any(f.endswith(".safetensors") for f in files) else bins
    path = snapshot_download(model, revision=revision, local_dir=str(hf_dir), allow_patterns=_META + weights)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    hf_dir = Path(args.hf_dir) if args.hf_dir else out.parent / f"{args.model.replace('/', '--')}-hf"
    try:
        download(args.model, hf_dir, args.revision)
    except Exception as e:  # offline, DNS, auth, missing repo: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"download_hf_ckpt: error: cannot download {args.model} from the Hugging Face Hub "
            f"(no network, HF_HUB_OFFLINE set, or no access): {type(e).__name__}: {reason[:200]}",
            file=sys.stderr,
        )
        return 2
    from setup.convert_hf import main as convert

    argv2 = ["import", "--hf-dir", str(hf_dir), "--out", str(out), "--seed", str(args.seed)]
    return convert(argv2 + (["--add-latent-tokens"] if args.add_latent_tokens else []))


if __name__ == "__main__":
    sys.exit(main())
