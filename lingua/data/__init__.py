"""Training data pipeline: jsonl sources -> mixed, formatted, tokenized, packed, shuffled batches.

Public API (contract in ``docs/architecture.md``):

* :class:`DataArgs`, :func:`build_data_iterator` -> iterator of ``(batch, state)``;
* the formatter hook: :func:`register_format`, :func:`get_format`, :class:`BadRecord`;
* :func:`steps_for_token_budget`, :func:`data_metrics`;
* errors: :class:`DataError`, :class:`DataStateMismatch`.

Modules: ``readers`` (shards, rank shares, epochs, bad input), ``mixing`` (weighted source
choice), ``formatting`` (the hook), ``packing`` (tokenize and pack), ``prefetch`` (shuffle
buffer, background thread), ``pipeline`` (assembly and state).
"""

from lingua.data.args import DataArgs
from lingua.data.formatting import BadRecord, Formatter, get_format, register_format, registered_formats
from lingua.data.packing import steps_for_token_budget
from lingua.data.pipeline import DataIterator, DataStateMismatch, build_data_iterator, data_metrics
from lingua.data.readers import DataError

__all__ = [
    "BadRecord",
    "DataArgs",
    "DataError",
    "DataIterator",
    "DataStateMismatch",
    "Formatter",
    "build_data_iterator",
    "data_metrics",
    "get_format",
    "register_format",
    "registered_formats",
    "steps_for_token_budget",
]
