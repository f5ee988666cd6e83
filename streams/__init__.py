"""Streams of dated text: ingestion, time slicing, tokenisation (installed as ``lifelong_peer.streams``)."""
