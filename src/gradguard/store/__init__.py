"""The run store: one folder per run, per-rank files, readable while written, compacted.

``schema`` owns the format (columns, file names, shard pattern); ``writer`` writes a rank's
files under a run-folder policy (``mode="new" | "resume" | "overwrite"``, a lock); ``reader``
reads them back tolerantly (``load_run``); ``compact`` merges small shards. See
``docs/monitoring.md``, section Run store. This package does not import torch.
"""

from __future__ import annotations

from ._io import layer_column
from .compact import MAX_ROWS
from .errors import RunLockedError, RunNotFoundError, RunStoreWarning, StoreError
from .reader import Run, find_runs, is_run, load_run, nan_or, read_run
from .schema import (
    EVENT_FIELDS,
    LAYER_COLUMNS,
    LAYER_STATS,
    LAYER_TYPE,
    LAYERS_SCHEMA,
    STEP_COLUMNS,
    STEP_VALUES,
    STEPS_SCHEMA,
    WINDOW_SCHEMA,
)
from .writer import MODES, RunWriter, compact_run

__all__ = [
    "EVENT_FIELDS", "LAYERS_SCHEMA", "LAYER_COLUMNS", "LAYER_STATS", "LAYER_TYPE", "MAX_ROWS",
    "MODES", "STEPS_SCHEMA", "STEP_COLUMNS", "STEP_VALUES", "WINDOW_SCHEMA", "Run",
    "RunLockedError", "RunNotFoundError", "RunStoreWarning", "RunWriter", "StoreError",
    "compact_run", "find_runs", "is_run", "layer_column", "load_run", "nan_or", "read_run",
]
