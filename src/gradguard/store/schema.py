"""The run-store format, defined once: columns, file names, shard pattern.

Every writer (``RunWriter``, the synthetic runs of the report and the tests) and every reader
(``load_run``, the report, ``gradguard inspect``) takes the format from here.

Layout of a run folder (``rank`` is the writer's rank, ``seq`` its flush counter)::

    meta.json                                   rank 0: name, layers, parameters, config, ...
    steps-r{rank}-{seq:06d}.parquet             one flush of step rows (STEPS_SCHEMA)
    layers-r{rank}-{seq:06d}.parquet            one flush of layer rows (LAYERS_SCHEMA)
    steps-r{rank}-{lo:06d}-{hi:06d}.parquet     a compacted shard: flushes lo..hi merged
    layers-r{rank}-{lo:06d}-{hi:06d}.parquet
    events-r{rank}.jsonl                        one JSON object per event (EVENT_FIELDS)
    events.jsonl                                events of earlier versions (all ranks; read only)
    window-r{rank}-step{step:08d}.parquet       a flight-recorder dump (WINDOW_SCHEMA)
    resume-r{rank}.jsonl                        resume marks: rows written before a mark with a
                                                step after it are superseded
    writer-r{rank}.lock                         held while a writer of that rank is open

Learning rates: ``lr`` (float64) is the learning rate of the first param group of the first
optimizer stepped, the one to plot. ``lrs`` (list of float64) holds every param group's
learning rate, in order (the groups of every optimizer stepped in that step, as the Guard
passes them), only when the step had more than one; it is null when there was a single
learning rate (then ``lr`` is the whole story) or when the writer did not know them. A list
column keeps the schema fixed whatever the number of groups; ``Run.learning_rates()`` spreads
it into one column per group (``lr0``, ``lr1``, ...). Shards written before ``lrs`` existed
read it as null.
"""

from __future__ import annotations

import re

import pyarrow as pa

STEPS_SCHEMA = pa.schema([
    ("step", pa.int64()), ("time", pa.float64()), ("loss", pa.float64()), ("lr", pa.float64()),
    ("lrs", pa.list_(pa.float64())), ("total_norm", pa.float64()), ("total_norm_after", pa.float64()),
    ("clip_coef", pa.float64()), ("threshold", pa.float64()), ("clipped", pa.bool_()),
    ("skipped", pa.bool_()), ("nonfinite", pa.bool_()), ("loss_scale", pa.float64()),
    ("rank", pa.int32()),
])
#: ``layer`` is dictionary-encoded (int32 codes into the layer names; read back as a pandas
#: categorical); the statistics are float32, as computed on the device.
LAYER_TYPE = pa.dictionary(pa.int32(), pa.string())
LAYERS_SCHEMA = pa.schema([
    ("step", pa.int64()), ("layer", LAYER_TYPE), ("grad_norm", pa.float32()),
    ("grad_max_abs", pa.float32()), ("nonfinite_count", pa.int64()),
    ("param_norm", pa.float32()), ("update_ratio", pa.float32()), ("rank", pa.int32()),
])
WINDOW_SCHEMA = pa.schema([("step", pa.int64()), ("layer", pa.string()),
                           ("grad_norm", pa.float64())])
SCHEMAS = {"steps": STEPS_SCHEMA, "layers": LAYERS_SCHEMA}
KINDS = tuple(SCHEMAS)

#: Column names of the two shard kinds, in stored order.
STEP_COLUMNS: tuple[str, ...] = tuple(STEPS_SCHEMA.names)
LAYER_COLUMNS: tuple[str, ...] = tuple(LAYERS_SCHEMA.names)
#: The per-step values a recorder fills (STEP_COLUMNS without step, time and rank).
STEP_VALUES: tuple[str, ...] = tuple(c for c in STEP_COLUMNS if c not in ("step", "time", "rank"))
#: The per-layer statistics (LAYER_COLUMNS without step, layer and rank).
LAYER_STATS: tuple[str, ...] = tuple(c for c in LAYER_COLUMNS if c not in ("step", "layer", "rank"))
EVENT_FIELDS = ("step", "rule", "value", "baseline", "action", "top_layers",
                "first_nonfinite_layer", "window", "message", "time", "rank")

#: Values a shard of an earlier version lacks are read as these (absent floats are NaN):
#: ``nonfinite_count`` -1 means "not measured", as the Monitor writes it.
FILL = {"clipped": False, "skipped": False, "nonfinite": False, "nonfinite_count": -1}

META = "meta.json"
LEGACY_EVENTS = "events.jsonl"
SHARD_RE = re.compile(r"^(steps|layers)-r(\d+)-(\d+)(?:-(\d+))?\.parquet$")
EVENTS_RE = re.compile(r"^events-r(\d+)\.jsonl$")
WINDOW_RE = re.compile(r"^window-r(\d+)-step(\d+)\.parquet$")
RESUME_RE = re.compile(r"^resume-r(\d+)\.jsonl$")
LOCK_RE = re.compile(r"^writer-r(\d+)\.lock$")
#: Superseded flight-recorder dumps are moved here on resume (kept, out of the run).
SUPERSEDED_DIR = "superseded"


def shard_name(kind: str, rank: int, lo: int, hi: int | None = None) -> str:
    """``steps-r0-000012.parquet`` for one flush, ``steps-r0-000000-000099.parquet`` for the
    compacted flushes 0..99."""
    if hi is None or hi == lo:
        return f"{kind}-r{rank}-{lo:06d}.parquet"
    return f"{kind}-r{rank}-{lo:06d}-{hi:06d}.parquet"


def events_name(rank: int) -> str:
    return f"events-r{rank}.jsonl"


def window_name(rank: int, step: int) -> str:
    return f"window-r{rank}-step{int(step):08d}.parquet"


def resume_name(rank: int) -> str:
    return f"resume-r{rank}.jsonl"


def lock_name(rank: int) -> str:
    return f"writer-r{rank}.lock"


def tmp_name(name: str) -> str:
    """The hidden name a file is written under before it is renamed into place."""
    return f".{name}.tmp"


def file_rank(name: str) -> int | None:
    """The rank a run-store file belongs to (None for meta.json, events.jsonl, others)."""
    for rx in (SHARD_RE, EVENTS_RE, WINDOW_RE, RESUME_RE, LOCK_RE):
        m = rx.match(name)
        if m:
            return int(m.group(2) if rx is SHARD_RE else m.group(1))
    return None


def is_store_file(name: str) -> bool:
    """A file the run store writes (data, marks, lock, or one of their temporary names)."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-4]
    return name in (META, LEGACY_EVENTS) or file_rank(name) is not None
