"""Drift detectors: pure two-sample checks on arrays or tensors, each returning a DriftResult."""

from __future__ import annotations

from continual.drift.categorical import LabelShiftDetector, PredictionShiftDetector
from continual.drift.ks import KSDetector
from continual.drift.mmd import MMDDetector
from continual.drift.result import DriftResult

__all__ = ["DriftResult", "KSDetector", "LabelShiftDetector", "MMDDetector", "PredictionShiftDetector"]
