"""Streams of dated text: ingestion, time slicing, tokenisation (installed as ``lifelong_peer.streams``).

The trainer's entry points: ``open_stream(workspace, name) -> Stream`` (slices in time order, each
with ``tokens(split)`` and ``num_bytes(split)``); ``ingest`` / ``ingest_default`` build streams.
"""

from .default import ingest_default
from .store import IngestOptions, Stream, StreamSlice, ingest, list_streams, open_stream

__all__ = ["IngestOptions", "Stream", "StreamSlice", "ingest", "ingest_default", "list_streams", "open_stream"]
