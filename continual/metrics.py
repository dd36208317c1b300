"""Every Prometheus metric, defined once, against an injectable registry.

Metrics mirror state that lives elsewhere (the store, the service, the live
model); nothing reads them back to decide anything.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "continual"
STATES = ("starting", "idle", "checking", "training", "gating", "promoting", "stopping", "degraded")
# Bounded reasons for rejected feedback; anything else is counted as "other".
REJECT_REASONS = ("validation", "conflict", "too_large", "content_type", "malformed", "auth", "unavailable", "other")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Serving transforms whose text counts are tracked: the live model's and the few it replaced.
_TEXT_TRANSFORMS_KEPT = 3
_TRAINING_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# Label delays: seconds (a hook right after the answer) to weeks (a customer's complaint).
_DELAY_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 86_400, 3 * 86_400, 7 * 86_400, 30 * 86_400)
LOG_DROP_REASONS = ("queue_full", "store_error")
# "*_plain": without counting predictions far from the holdout at chance (see continual/drift/estimate.py).
ESTIMATORS = ("atc", "confidence", "atc_plain", "confidence_plain")

__all__ = ["CONTENT_TYPE_LATEST", "STATES", "Metrics"]


class Metrics:
    """The service's metrics. Tests pass a fresh ``CollectorRegistry()``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        # ingest
        self.feedback_samples = Counter(f"{PREFIX}_feedback_samples", "Feedback samples stored", registry=r)
        self.feedback_duplicates = Counter(
            f"{PREFIX}_feedback_duplicates", "Feedback samples skipped as duplicates of stored ids", registry=r
        )
        self.feedback_rejected = Counter(
            f"{PREFIX}_feedback_rejected", "Feedback samples rejected", ["reason"], registry=r
        )
        self.http_request_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "HTTP request latency",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.samples_pending = Gauge(
            f"{PREFIX}_samples_pending", "Samples newer than the champion's data cutoff", registry=r
        )

        # drift
        self.drift_score = Gauge(
            f"{PREFIX}_drift_score", "Drift effect size of the last check", ["detector"], registry=r
        )
        self.drift_p_value = Gauge(
            f"{PREFIX}_drift_p_value", "Drift p-value of the last check", ["detector"], registry=r
        )
        self.drift_detected = Gauge(
            f"{PREFIX}_drift_detected", "1 if the last check reported drift", ["detector"], registry=r
        )
        self.drift_checks = Counter(f"{PREFIX}_drift_checks", "Drift checks run", registry=r)
        # Text inputs: the tokenizer's view of the last check's windows (window: reference | current).
        self.drift_text_unknown = Gauge(
            f"{PREFIX}_drift_text_unknown_token_ratio",
            "Share of [UNK] tokens in the last drift check's window (text)",
            ["window"],
            registry=r,
        )
        self.drift_text_tokens = Gauge(
            f"{PREFIX}_drift_text_tokens_mean",
            "Mean tokens per text in the last drift check's window (text)",
            ["window"],
            registry=r,
        )
        self.last_drift_check = Gauge(
            f"{PREFIX}_last_drift_check_timestamp_seconds", "When the last drift check ran", registry=r
        )

        # training and gate
        self.training_runs = Counter(f"{PREFIX}_training_runs", "Training runs started", registry=r)
        self.training_failures = Counter(f"{PREFIX}_training_failures", "Training runs that failed", registry=r)
        self.training_duration = Histogram(
            f"{PREFIX}_training_duration_seconds", "Training run duration", buckets=_TRAINING_BUCKETS, registry=r
        )
        self.last_training_success = Gauge(
            f"{PREFIX}_last_training_success_timestamp_seconds", "When a training run last succeeded", registry=r
        )
        self.training_failures_in_a_row = Gauge(
            f"{PREFIX}_training_failures_consecutive",
            "Training runs failed since the last one that succeeded (the next automatic run backs off)",
            registry=r,
        )
        self.promotions = Counter(f"{PREFIX}_promotions", "Champion promotions", registry=r)
        self.rejections = Counter(f"{PREFIX}_rejections", "Candidates rejected by the gate", registry=r)
        self.rejections_in_a_row = Gauge(
            f"{PREFIX}_rejections_consecutive", "Candidates rejected since the last promotion", registry=r
        )
        self.rollbacks = Counter(f"{PREFIX}_rollbacks", "Champion rollbacks", registry=r)
        self.model_accuracy = Gauge(
            f"{PREFIX}_model_accuracy_ratio", "Holdout accuracy", ["model", "holdout"], registry=r
        )
        self.class_samples = Gauge(
            f"{PREFIX}_class_samples",
            "Stored samples per class (excluded ones do not count); at most [model] max_classes labels",
            ["label"],
            registry=r,
        )

        # models and serving
        self.model_info = Gauge(
            f"{PREFIX}_model_info", "The serving model (value 1)", ["version", "architecture"], registry=r
        )
        self.model_load_failures = Counter(
            f"{PREFIX}_model_load_failures", "Model versions refused at load (checksum or format)", registry=r
        )
        self.predictions = Counter(f"{PREFIX}_predictions", "Inputs predicted", registry=r)
        self.text_inputs = Counter(f"{PREFIX}_text_inputs", "Texts tokenized for prediction", registry=r)
        self.text_truncated = Counter(
            f"{PREFIX}_text_truncated",
            "Texts cut to [model.input] max_length tokens before the encoder (predict)",
            registry=r,
        )
        self._text_lock = threading.Lock()
        # Per serving transform (the newest few; a request still on the previous model after a swap
        # reports its counts too): (the transform, texts, truncated) mirrored so far. Keyed by id() but
        # holding the transform, so a freed one's id cannot be reused while its entry is here.
        self._text_seen: dict[int, tuple[object, int, int]] = {}
        self.predict_latency = Histogram(
            f"{PREFIX}_predict_latency_seconds", "Predict latency per request", buckets=_LATENCY_BUCKETS, registry=r
        )

        # the prediction log, delayed labels, live and estimated accuracy
        self.log_written = Counter(
            f"{PREFIX}_prediction_log_written", "Predictions written to the prediction log", registry=r
        )
        self.log_dropped = Counter(
            f"{PREFIX}_prediction_log_dropped",
            "Predictions not logged: the writer's queue was full, or the store refused the batch",
            ["reason"],
            registry=r,
        )
        self.label_delay = Histogram(
            f"{PREFIX}_label_delay_seconds",
            "Time from a prediction to its label arriving by prediction id",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.live_accuracy = Gauge(
            f"{PREFIX}_live_accuracy_ratio",
            "Accuracy of the version's most recently labeled predictions ([accuracy] live_window)",
            ["version"],
            registry=r,
        )
        self.live_accuracy_count = Gauge(
            f"{PREFIX}_live_accuracy_count", "Labeled predictions behind live_accuracy_ratio", ["version"], registry=r
        )
        self.live_accuracy_lower = Gauge(
            f"{PREFIX}_live_accuracy_lower_ratio",
            "Wilson 95% lower bound of the live accuracy",
            ["version"],
            registry=r,
        )
        self.live_accuracy_upper = Gauge(
            f"{PREFIX}_live_accuracy_upper_ratio",
            "Wilson 95% upper bound of the live accuracy",
            ["version"],
            registry=r,
        )
        self.gate_accuracy = Gauge(
            f"{PREFIX}_gate_accuracy_ratio",
            "Holdout accuracy the gate measured for the version (old and new holdouts together)",
            ["version"],
            registry=r,
        )
        self.estimated_accuracy = Gauge(
            f"{PREFIX}_estimated_accuracy_ratio",
            "Label-free accuracy estimate of the champion's newest window of predictions",
            ["method"],
            registry=r,
        )
        self.estimation_error = Gauge(
            f"{PREFIX}_estimation_error_ratio",
            "Estimated minus realized accuracy of the newest window with enough labels",
            ["method"],
            registry=r,
        )
        self.estimate_flagged = Gauge(
            f"{PREFIX}_estimate_flagged",
            "1 when the newest window is flagged: the estimates may not hold (far inputs, drift, unknown labels, no calibration)",
            registry=r,
        )
        self.labels_needed = Gauge(
            f"{PREFIX}_labels_needed",
            "Labeled samples still needed for the run the low accuracy estimate asks for (0: none needed)",
            registry=r,
        )
        self.label_queue_items = Counter(
            f"{PREFIX}_label_queue_items",
            "Predictions handed out (and leased) by the label queue, GET /v1/label-queue",
            registry=r,
        )

        # service
        self.state = Gauge(f"{PREFIX}_state", "1 for the current state", ["state"], registry=r)
        self.store_up = Gauge(f"{PREFIX}_store_up", "1 if the store answered the last health check", registry=r)
        self.set_state("starting")

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        for s in STATES:
            self.state.labels(state=s).set(1 if s == state else 0)

    def reject(self, reason: str, n: int = 1) -> None:
        self.feedback_rejected.labels(reason=reason if reason in REJECT_REASONS else "other").inc(n)

    def set_model(self, version: str, architecture: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version, architecture=architecture).set(1)

    # ``continual.serving.ServingEvents``
    def model_swapped(self, version: str, architecture: str) -> None:
        self.set_model(version, architecture)

    def model_refused(self, version: str) -> None:
        self.model_load_failures.inc()

    # ``continual.predlog.LogEvents``
    def prediction_log_written(self, n: int) -> None:
        self.log_written.inc(n)

    def prediction_log_dropped(self, n: int, reason: str) -> None:
        self.log_dropped.labels(reason=reason if reason in LOG_DROP_REASONS else "store_error").inc(n)

    def set_live_accuracy(
        self, rows: list[tuple[str, int, float | None, float | None, float | None, float | None]]
    ) -> None:
        """``(version, n, accuracy, lower, upper, gate accuracy)`` per version; versions not named are dropped."""
        for g in (self.live_accuracy, self.live_accuracy_count, self.live_accuracy_lower, self.live_accuracy_upper,
                  self.gate_accuracy):  # fmt: skip
            g.clear()
        for version, n, acc, lower, upper, gate in rows:
            self.live_accuracy_count.labels(version=version).set(n)
            for g, v in ((self.live_accuracy, acc), (self.live_accuracy_lower, lower),
                         (self.live_accuracy_upper, upper), (self.gate_accuracy, gate)):  # fmt: skip
                if v is not None:
                    g.labels(version=version).set(v)

    def set_estimates(self, estimates: dict[str, float | None], errors: dict[str, float | None], flagged: bool) -> None:
        for method in ESTIMATORS:
            for g, values in ((self.estimated_accuracy, estimates), (self.estimation_error, errors)):
                v = values.get(method)
                if v is not None:
                    g.labels(method=method).set(v)
                else:  # no estimate (yet): no series rather than a stale one
                    with contextlib.suppress(KeyError):
                        g.remove(method)
        self.estimate_flagged.set(1 if flagged else 0)

    def mirror_text_stats(self, owner: object, texts: int, truncated: int) -> None:
        """Mirror a serving transform's running counts (a new model's transform starts again from 0)."""
        with self._text_lock:
            _, seen_texts, seen_truncated = self._text_seen.pop(id(owner), (owner, 0, 0))
            if texts > seen_texts:
                self.text_inputs.inc(texts - seen_texts)
            if truncated > seen_truncated:
                self.text_truncated.inc(truncated - seen_truncated)
            self._text_seen[id(owner)] = (owner, max(texts, seen_texts), max(truncated, seen_truncated))
            while len(self._text_seen) > _TEXT_TRANSFORMS_KEPT:  # the oldest first (insertion order)
                del self._text_seen[next(iter(self._text_seen))]

    def set_text_drift(self, window: str, *, unknown_rate: float, mean_tokens: float) -> None:
        self.drift_text_unknown.labels(window=window).set(unknown_rate)
        self.drift_text_tokens.labels(window=window).set(mean_tokens)

    def set_drift(self, detector: str, *, effect: float | None, p_value: float | None, detected: bool) -> None:
        """One detector's outcome of the last check; a detector that could not run reports no drift."""
        if effect is not None and math.isfinite(effect):
            self.drift_score.labels(detector=detector).set(effect)
        if p_value is not None and math.isfinite(p_value):
            self.drift_p_value.labels(detector=detector).set(p_value)
        self.drift_detected.labels(detector=detector).set(1 if detected else 0)

    def drift_checked(self) -> None:
        self.drift_checks.inc()
        self.last_drift_check.set(time.time())

    def set_class_samples(self, counts: Mapping[str, int], *, limit: int) -> None:
        """Samples per class; only the first ``limit`` labels, so the label set stays bounded."""
        self.class_samples.clear()
        for label, n in list(counts.items())[:limit]:
            self.class_samples.labels(label=label).set(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
