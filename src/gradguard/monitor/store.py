"""Former home of the run store; it lives in :mod:`gradguard.store` now (one owner of the
format). These names are re-exported so that existing imports keep working."""

from __future__ import annotations

import os  # noqa: F401  (tests patch store.os.replace: the os module the writer uses)

import pyarrow.parquet as pq  # noqa: F401  (tests patch store.pq.write_table)

from ..store import (  # noqa: F401
    EVENT_FIELDS,
    LAYER_TYPE,
    LAYERS_SCHEMA,
    STEPS_SCHEMA,
    WINDOW_SCHEMA,
    Run,
    RunLockedError,
    RunNotFoundError,
    RunStoreWarning,
    RunWriter,
    StoreError,
    layer_column,
    load_run,
    nan_or,
)
