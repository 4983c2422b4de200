"""File primitives of the run store: atomic writes that leave nothing behind on failure."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import tmp_name


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a hidden temporary name next to ``path``, then rename it into place
    (``os.replace``: atomic on POSIX, a reader sees the old file or the new one). On any failure
    (a full disk, a kill signal raised as an exception) the temporary file is removed and the
    error propagates: no ``.tmp`` is left behind."""
    tmp = path.with_name(tmp_name(path.name))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def write_parquet_atomic(path: Path, table: pa.Table, **options: Any) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, **options))


def append_bytes(path: Path, data: bytes) -> None:
    """Append ``data`` with one ``O_APPEND`` write (a reader sees whole flushes; a kill can cut
    only the last line, which the reader skips with a warning)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        n = os.write(fd, data)
        if n != len(data):
            raise OSError(errno.ENOSPC, f"short write to {path.name}")
    finally:
        os.close(fd)


def write_options(schema: pa.Schema) -> dict[str, Any]:
    """zstd; dictionary encoding for the integer, boolean and layer columns (steps repeat per
    layer, layers per step), byte-stream-split for the floats (a dictionary of floats costs
    time and saves nothing; split bytes compress well when values change slowly);
    statistics (for row-group pruning) on ``step`` and ``rank`` only."""
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    lists = [f.name for f in schema if pa.types.is_list(f.type)]
    # a list of floats (``lrs``) is split on its leaf column
    split = floats + [f"{f.name}.list.element" for f in schema if pa.types.is_list(f.type)
                      and pa.types.is_floating(f.type.value_type)]
    return {"compression": "zstd",
            "use_dictionary": [f.name for f in schema if f.name not in floats + lists],
            "use_byte_stream_split": split or False,
            "write_statistics": [c for c in ("step", "rank") if c in schema.names]}


def layer_column(names: list[str], n_steps: int) -> pa.DictionaryArray:
    """The ``layer`` column of ``n_steps`` layer steps of all ``names`` (codes, not strings)."""
    codes = np.tile(np.arange(len(names), dtype=np.int32), n_steps)
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()),
                                          pa.array(list(names), pa.string()))


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars turned into Python numbers (for ``json.dumps``)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return x.item()  # numpy scalars
        except (ValueError, AttributeError):
            return str(x)
    return x
