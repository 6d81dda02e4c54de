"""One parquet table: a column per image column, a fixed-size list column per tap."""

from __future__ import annotations

from pathlib import Path

from . import Table

TARGET = "file"


def write(table: Table, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {name: pa.array(values.tolist(), type=pa.int8() if name == "status" else pa.string())
            for name, values in table.columns.items()}
    for tap, vectors in table.taps.items():
        cols[tap] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    pq.write_table(pa.table(cols).replace_schema_metadata({"featcache_fingerprint": table.fingerprint}), out)
