"""Static merges run slice by slice: the engine shared with the in-memory merge, and streamed merges of
safetensors models with bounded memory (see docs/streaming.md).

>>> from mergelab.methods.streaming import stream_merge
>>> stream_merge("ties", "base/", {"a": "ft_a/", "b": "ft_b/"}, "merged/", density=0.2)  # doctest: +SKIP
"""

from mergelab.methods.streaming.engine import SliceMerger, merge_state_dicts
from mergelab.methods.streaming.files import SafetensorsModel, ShardedWriter, parse_size, read_header
from mergelab.methods.streaming.merge import DEFAULT_SHARD_SIZE, StreamInputs, stream_merge, streamable

__all__ = [
    "DEFAULT_SHARD_SIZE", "SafetensorsModel", "ShardedWriter", "SliceMerger", "StreamInputs",
    "merge_state_dicts", "parse_size", "read_header", "stream_merge", "streamable",
]
