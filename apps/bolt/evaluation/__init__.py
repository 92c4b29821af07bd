"""Evaluation of BoLT models: few-shot CoT tasks through lm-evaluation-harness (raw and latent
variants), validation NLL and ELBO during training. Entry point: ``python -m apps.bolt.eval``;
overview in docs/evaluation.md. Submodules import lm-eval and torch lazily where they can, so
``options`` and ``in_training`` configs load cheaply."""
