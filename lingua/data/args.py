"""Configuration of the training data pipeline (the ``data`` section of a training config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lingua.args import check_min

LONG_DOC_POLICIES = ("truncate", "skip")


@dataclass
class DataArgs:
    """Where the documents come from and how they become ``[batch_size, seq_len]`` batches.

    Only value ranges are checked in :meth:`validate` (it runs whenever a config is loaded);
    that ``root_dir`` and ``sources`` point at real data is checked when the iterator is built.
    """

    root_dir: str = ""
    """Dataset root; every source is a subfolder of it."""
    sources: dict[str, float] = field(default_factory=dict)
    """Subfolder name -> mixing weight. Each subfolder holds ``*.jsonl`` shards, read in sorted
    order. Weights are normalised; a weight of 0 switches a source off."""
    batch_size: int = 8
    """Windows per batch on each rank (the per-device micro batch)."""
    seq_len: int = 2048
    """Tokens per training sequence; windows hold ``seq_len + 1`` tokens (inputs and shifted targets)."""
    seed: int = 42
    """Root of every data RNG stream (source choice, shuffle, formatter, epoch order)."""
    add_bos: bool = True
    """Prepend the tokenizer's BOS id to every document."""
    add_eos: bool = True
    """Append the tokenizer's EOS id to every document."""
    format: str = "text"
    """Name of a registered document formatter (``lingua.data.register_format``)."""
    text_key: str = "text"
    """Record field that must hold the document text (a non-empty string)."""
    doc_mask: bool = False
    """Emit ``doc_ids`` so the model can mask attention across packed documents."""
    shuffle_buffer: int = 64
    """Windows are shuffled within blocks of this many batches; 0 keeps stream order."""
    prefetch: bool = True
    """Produce batches in a background thread."""
    prefetch_depth: int = 8
    """Batches the background thread may run ahead of the consumer."""
    reshuffle_each_epoch: bool = True
    """Read every epoch after the first in a fresh seeded order (the reference loops the files
    unchanged). The first epoch always reads the files in order, as they are usually globally
    shuffled when the dataset is prepared."""
    strict: bool = False
    """Make bad input (malformed JSON, invalid UTF-8, missing or empty text) fatal instead of
    a counted, logged skip."""
    max_doc_chars: int = 0
    """Longest formatted document in characters; 0 means no limit. See ``long_doc_policy``."""
    long_doc_policy: str = "truncate"
    """What to do with a document over ``max_doc_chars``: ``truncate`` or ``skip`` (both counted)."""

    def validate(self) -> None:
        check_min(self, 1, "batch_size", "seq_len", "prefetch_depth", prefix="data.")
        check_min(self, 0, "seed", "shuffle_buffer", "max_doc_chars", prefix="data.")
        if self.long_doc_policy not in LONG_DOC_POLICIES:
            raise ValueError(f"data.long_doc_policy must be one of {LONG_DOC_POLICIES}, got {self.long_doc_policy!r}")
        for name, weight in self.sources.items():
            if not weight >= 0:
                raise ValueError(f"data.sources.{name}: weight must be >= 0, got {weight}")
        if self.sources and sum(self.sources.values()) <= 0:
            raise ValueError("data.sources: at least one weight must be positive")
        if not self.text_key:
            raise ValueError("data.text_key must not be empty")
