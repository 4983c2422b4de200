"""Gradient monitoring: per-step and per-layer statistics, detectors, a device flight
recorder, the append-only run store and sinks. See ``monitor.py`` for what is recorded and
``store.py`` for the run store's layout.

Names load on first use: ``load_run`` (pyarrow, pandas) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["ACTIONS", "AnomalyError", "Detector", "Growth", "LossSpike", "NonFinite",
                     "Spike", "StepDetector", "Vanishing", "default_detectors"], "detectors"),
    "LayerMap": "layers",
    "layer_of": "layers",
    "Monitor": "monitor",
    **dict.fromkeys(["CSVSink", "MLflowSink", "NeptuneSink", "Sink", "TensorBoardSink",
                     "WandbSink"], "sinks"),
    "Run": "store",
    "load_run": "store",
}

__all__ = [
    "ACTIONS", "AnomalyError", "CSVSink", "Detector", "Growth", "LayerMap", "LossSpike",
    "MLflowSink", "Monitor", "NeptuneSink", "NonFinite", "Run", "Sink", "Spike",
    "StepDetector", "TensorBoardSink", "Vanishing", "WandbSink", "default_detectors",
    "layer_of", "load_run",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .detectors import (
        ACTIONS,
        AnomalyError,
        Detector,
        Growth,
        LossSpike,
        NonFinite,
        Spike,
        StepDetector,
        Vanishing,
        default_detectors,
    )
    from .layers import LayerMap, layer_of
    from .monitor import Monitor
    from .sinks import CSVSink, MLflowSink, NeptuneSink, Sink, TensorBoardSink, WandbSink
    from .store import Run, load_run
