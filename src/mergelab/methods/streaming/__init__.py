"""Streamed static merges of safetensors models with bounded memory (see docs/streaming.md).

>>> from mergelab.methods.streaming import stream_merge
>>> stream_merge("ties", "base/", {"a": "ft_a/", "b": "ft_b/"}, "merged/", density=0.2)  # doctest: +SKIP
"""

from mergelab.methods.streaming.files import SafetensorsModel, ShardedWriter, parse_size, read_header
from mergelab.methods.streaming.merge import DEFAULT_SHARD_SIZE, Pipeline, StreamMerger, stream_merge

__all__ = [
    "DEFAULT_SHARD_SIZE", "Pipeline", "SafetensorsModel", "ShardedWriter", "StreamMerger",
    "parse_size", "read_header", "stream_merge",
]
