"""Gradient monitoring: per-step and per-layer statistics, detectors, a device flight
recorder, the append-only run store and sinks. See ``monitor.py`` for what is recorded and
``store.py`` for the run store's layout."""

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

__all__ = [
    "ACTIONS", "AnomalyError", "CSVSink", "Detector", "Growth", "LayerMap", "LossSpike",
    "MLflowSink", "Monitor", "NeptuneSink", "NonFinite", "Run", "Sink", "Spike",
    "StepDetector", "TensorBoardSink", "Vanishing", "WandbSink", "default_detectors",
    "layer_of", "load_run",
]
