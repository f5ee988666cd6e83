"""Pack a split's documents into one flat token array, stored as fixed-length blocks in an Arrow file.

Layout: ``SEP doc0 SEP doc1 ...`` (the separator *before* each document, so a model always sees
where a document starts), cut into blocks of ``block_size`` tokens; the last block is padded with
the separator and the true length kept in the file's metadata. The file is an Arrow IPC stream with
one record batch and the ``datasets`` schema ``{"input_ids": Sequence(Value(uintX), length=block)}``,
so ``datasets.Dataset.from_file`` opens it as a dataset of blocks, and ``read_tokens`` memory-maps it
and returns the flat token array without copying. Block length never limits a model's context: the
trainer samples windows anywhere in the flat array.

Writing stays bounded in memory: documents are appended to a raw temp file as they come; ``finish``
maps that file and hands it to Arrow in one batch (file-backed pages, not heap), then deletes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

META_KEY = b"lifelong_peer"


class PackWriter:
    """Accumulates one (slice, split)'s documents; ``finish()`` writes ``path`` (Arrow) and returns counts."""

    def __init__(self, path: Path, dtype: np.dtype, separator: int, block_size: int):
        self.path, self.dtype, self.separator, self.block_size = Path(path), np.dtype(dtype), separator, block_size
        self.raw = self.path.with_suffix(".raw")
        self.pending: list[np.ndarray] = []
        self.buffered = 0
        self.documents = self.bytes = self.tokens = 0

    def add(self, tokens: np.ndarray, nbytes: int) -> None:
        """Append one document's (T,) tokens; ``nbytes`` is its text's UTF-8 size (for bits per byte)."""
        self.pending.append(np.array([self.separator], dtype=self.dtype))
        self.pending.append(tokens.astype(self.dtype, copy=False))
        self.buffered += tokens.nbytes
        self.documents += 1
        self.bytes += nbytes
        self.tokens += len(tokens) + 1

    def flush(self) -> None:
        if self.pending:
            with open(self.raw, "ab") as f:
                for a in self.pending:
                    f.write(a.tobytes())
            self.pending, self.buffered = [], 0

    def finish(self) -> dict:
        self.flush()
        n, block = self.tokens, self.block_size
        blocks = -(-n // block)
        if n:
            with open(self.raw, "ab") as f:  # pad the last block
                f.write(np.full(blocks * block - n, self.separator, dtype=self.dtype).tobytes())
            flat = np.memmap(self.raw, dtype=self.dtype, mode="r")
        else:
            flat = np.zeros(0, dtype=self.dtype)
        values = pa.array(flat, type=pa.from_numpy_dtype(self.dtype))
        column = pa.FixedSizeListArray.from_arrays(values, block)
        meta = {"tokens": n, "bytes": self.bytes, "documents": self.documents, "separator": self.separator}
        schema = _schema(self.dtype, block).with_metadata(
            {**(_schema(self.dtype, block).metadata or {}), META_KEY: json.dumps(meta).encode()}
        )
        with pa.OSFile(str(self.path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(pa.record_batch([column], schema=schema))
        del flat, values, column
        self.raw.unlink(missing_ok=True)
        return meta


def _schema(dtype: np.dtype, block: int) -> pa.Schema:
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value(np.dtype(dtype).name), length=block)})
    return features.arrow_schema


def read_tokens(path: str | Path) -> np.ndarray:
    """The flat (N,) token array of a packed file, memory-mapped (read-only, no copy)."""
    # no `with`: the returned array's buffers keep the mapping alive after this function returns
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    meta = json.loads(table.schema.metadata[META_KEY])
    column = table.column("input_ids")
    if column.num_chunks == 1:
        flat = column.chunk(0).flatten().to_numpy(zero_copy_only=True)
    else:  # not written by PackWriter, but still readable
        flat = np.concatenate([c.flatten().to_numpy() for c in column.chunks]) if column.num_chunks else np.zeros(0)
    return flat[: meta["tokens"]]
