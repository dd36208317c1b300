"""Typed settings loaded from ``config.toml`` with ``CONTINUAL_<SECTION>__<KEY>`` overrides.

Every default lives here. Loading fails with one :class:`ConfigError` whose message
names the key, the value and what is allowed.

One module on purpose (it is longer than most): the design keeps every default in
one place, and the override and error-message code walks the whole settings tree.
Reading order: one class per ``config.toml`` table, in the file's order ([service],
[auth], [store], [ingest], [model] with [model.input], [triggers], [drift],
[training] with the text recipe's defaults, [adaptation], [label_queue], [gate],
[serving], [retention], [accuracy]); then :class:`Settings`, which joins them and
checks rules that span tables; then loading (:func:`load_settings`, env overrides,
error messages). Each part starts at a ``# --`` heading.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "CONTINUAL_"
DEFAULT_CONFIG = "config.toml"


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


# -- the tables: one class per config.toml table, in the file's order ----------------------------------------
def _check_device(v: str) -> str:
    if v not in ("auto", "cpu") and not v.startswith("cuda"):
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("data")
    role: Literal["all", "api", "trainer"] = "all"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Seconds SIGTERM waits for in-flight requests and a cancelled run before exiting.
    shutdown_timeout_seconds: float = Field(20.0, gt=0)
    # /readyz answers "store": false when the store ping takes longer than this.
    readyz_timeout_seconds: float = Field(2.0, gt=0)
    # The watchdog fails (no WATCHDOG=1, so systemd restarts the service) when no request
    # thread has come free for this long: every one is stuck. Keep it above the longest
    # request you expect to wait, e.g. a store that is slow to answer.
    request_thread_stall_seconds: float = Field(60.0, gt=0)


class AuthSettings(_Section):
    enabled: bool = True
    ingest_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    # One token per line; relative paths are looked up in $CREDENTIALS_DIRECTORY
    # first (systemd LoadCredential=), then relative to the working directory.
    ingest_tokens_file: str = ""
    admin_tokens_file: str = ""


class StoreSettings(_Section):
    # Empty: SQLite file <data_dir>/continual.db. PostgreSQL: postgresql+psycopg://user@host/db
    url: str = ""
    # The database password, read from a file so it never sits in config.toml.
    password_file: str = ""
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    max_payload_bytes: int = Field(1_048_576, ge=64)
    busy_timeout_ms: int = Field(5_000, ge=0)
    pool_size: int = Field(8, ge=1)
    # How long a request may wait for the database before it answers 503 (PostgreSQL).
    pool_timeout_seconds: float = Field(10.0, gt=0)
    connect_timeout_seconds: float = Field(10.0, gt=0)
    statement_timeout_seconds: float = Field(60.0, ge=0)  # 0: no limit
    # FULL: a 2xx survives a power cut. NORMAL: faster, survives a process crash only.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"


# A classifier resizes its input to a few hundred pixels a side; 4096 x 4096 still takes a
# 12 MP phone photo or a 4K frame as it is.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class IngestSettings(_Section):
    max_body_bytes: int = Field(32 * 1_048_576, ge=1024)
    max_batch_samples: int = Field(1_000, ge=1)
    # Decompression-bomb guard: images with more pixels than this are rejected (422), read
    # from the header before decoding. Training, drift and evaluation refuse stored images
    # over it too (the run fails naming the sample).
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    # What one request may make the service decode: the sum of width x height over its
    # images, read from their headers before any is decoded (413 decoded_too_large).
    # Images are decoded one at a time, so this bounds CPU time; memory is one image per thread.
    max_request_pixels: int = Field(16 * DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    # One sample's metadata object, as JSON (stored in the sample's row).
    max_metadata_bytes: int = Field(65_536, ge=2)
    # How deeply that object may nest; checked without recursion, before anything walks it.
    max_metadata_depth: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _budget_holds_an_image(self) -> IngestSettings:
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels}) must be >= max_image_pixels "
                f"({self.max_image_pixels}): a request must be able to carry one image at the cap"
            )
        return self


class InputSettings(_Section):
    kind: Literal["vector", "image", "text"] = "image"
    shape: tuple[int, ...] = (64,)
    size: tuple[int, int] = (224, 224)
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    augment: bool = False
    # kind "text": the longest text a sample or predict input may carry (characters, 422 above it),
    # and the tokens the encoder sees (longer texts are cut; continual_text_truncated_total counts them).
    max_text_chars: int = Field(10_000, ge=1)
    max_length: int = Field(128, ge=8, le=512)
    # Domain augmentation for images in training batches (off by default): photometric changes a
    # new camera or scanner brings, so the model leans less on them. Any of "color_jitter", "blur", "noise".
    augment_domain: tuple[Literal["color_jitter", "blur", "noise"], ...] = ()

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(d <= 0 for d in v):
            raise ValueError("must be a non-empty list of positive integers")
        return v

    @field_validator("size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(d <= 0 for d in v):
            raise ValueError("must be two positive integers [height, width]")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v

    @model_validator(mode="after")
    def _stats_match_channels(self) -> InputSettings:
        if self.kind == "image" and (len(self.mean) != self.channels or len(self.std) != self.channels):
            raise ValueError(
                f"mean and std need one value per channel (channels = {self.channels}), "
                f"got mean={list(self.mean)} std={list(self.std)}"
            )
        return self

    @property
    def vector_size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class ModelSettings(_Section):
    # torchvision names (resnet18, resnet50, mobilenet_v3_small, efficientnet_b0),
    # efficientnet_lite0, mlp, minilm (text), or "package.module:function".
    architecture: str = "efficientnet_lite0"
    # "imagenet", "none", or a local file path. For minilm, "imagenet" means its own pretrained
    # weights (the name is the contract's; "pretrained" is accepted as a synonym).
    weights: str = "imagenet"
    classes: tuple[str, ...] = tuple(str(i) for i in range(10))
    mode: Literal["feature_extraction", "fine_tune", "all"] = "feature_extraction"
    unfreeze_last: int = Field(0, ge=0)
    hidden: tuple[int, ...] = (128,)
    # "imagenet" for a torchvision model fetches its checkpoint into TORCH_HOME when missing;
    # false: fail at once with the file to place there (offline machines).
    download_weights: bool = True
    # Registry retention: the newest N versions plus every version that was ever champion.
    keep_versions: int = Field(10, ge=1)
    # A feedback label outside the known classes: "refuse" (422) or "accept" (stored; the class
    # joins the model once it has enough samples, see [triggers] min_class_samples).
    new_classes: Literal["refuse", "accept"] = "refuse"
    # With "accept": every class ever known (configured + accepted) counts; it also bounds the
    # metrics' label set (with "refuse" the configured list may be longer).
    max_classes: int = Field(100, ge=2)
    # A new label must match this regular expression (whole string) and be at most this long.
    label_pattern: str = r"[\w][\w .:/+@-]*"
    max_label_length: int = Field(64, ge=1, le=255)
    input: InputSettings = InputSettings()

    @model_validator(mode="after")
    def _no_frozen_random_base(self) -> ModelSettings:
        # A user factory ("package.module:function") brings its own weights; "none" is its business.
        if self.weights == "none" and self.mode == "feature_extraction" and ":" not in self.architecture:
            raise ValueError(
                'weights = "none" with mode = "feature_extraction" would freeze a randomly initialised '
                'backbone and train only a head on random features: set mode = "all" (train everything '
                'from scratch) or use pretrained weights (weights = "imagenet" or a file)'
            )
        return self

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2:
            raise ValueError("needs at least two class names")
        if len(set(v)) != len(v):
            dupes = sorted({c for c in v if v.count(c) > 1})
            raise ValueError(f"class names must be unique; repeated: {dupes}")
        if any(not c for c in v):
            raise ValueError("class names must be non-empty")
        return v

    @field_validator("label_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _classes_fit(self) -> ModelSettings:
        if self.new_classes == "accept" and len(self.classes) > self.max_classes:
            raise ValueError(
                f"[model] classes has {len(self.classes)} names, more than max_classes = {self.max_classes} "
                '(with new_classes = "accept")'
            )
        return self

    @property
    def most_classes(self) -> int:
        """The most classes a model may have: ``max_classes``, or more when "refuse" configures more."""
        return max(self.max_classes, len(self.classes))


class TriggerSettings(_Section):
    check_interval_seconds: float = Field(60.0, gt=0)
    min_new_samples: int = Field(500, ge=1)
    max_new_samples: int = Field(5_000, ge=1)
    max_interval_seconds: float = Field(86_400.0, gt=0)
    cooldown_seconds: float = Field(300.0, ge=0)
    # Start a run when the label-free accuracy estimate of the newest window of predictions
    # falls below this (and min_new_samples labeled samples exist); 0 turns the rule off.
    min_estimated_accuracy: float = Field(0.0, ge=0, le=1)
    # A class the champion lacks joins a run once it has this many train-split samples and this
    # many holdout samples (the gate measures its recall on them); that alone starts a run.
    min_class_samples: int = Field(50, ge=1)
    min_class_holdout: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> TriggerSettings:
        if self.max_new_samples < self.min_new_samples:
            raise ValueError(
                f"max_new_samples ({self.max_new_samples}) must be >= min_new_samples ({self.min_new_samples})"
            )
        return self


class DriftSettings(_Section):
    detectors: tuple[Literal["mmd", "ks", "label", "prediction"], ...] = ("mmd", "ks", "label", "prediction")
    alpha: float = Field(0.01, gt=0, lt=1)
    # A p-value alone flags any difference once windows are large; drift is
    # reported only when the effect size is at least this (see continual/drift/).
    min_effect: float = Field(0.1, ge=0)
    # MMD's effect (sqrt of the unbiased MMD²) lives on a smaller scale than KS D or
    # Cramér's V: 0.02 ~ an RMS mean shift of 0.036 sd per embedding feature (0.2 sd in
    # 3% of the dimensions); min_effect = 0.1 would need a shift several times that.
    mmd_min_effect: float = Field(0.02, ge=0)
    # KS runs per feature on the embeddings projected onto this many pooled-PCA axes:
    # 1280 raw features would spend the BH correction on dimensions that carry no shift.
    ks_features: int = Field(16, ge=1)
    window: int = Field(1_000, ge=10)
    permutations: int = Field(500, ge=10)
    min_samples: int = Field(100, ge=2)
    # Above this many samples per window MMD switches to random Fourier features.
    exact_max_samples: int = Field(5_000, ge=10)
    reservoir_size: int = Field(2_000, ge=10)


class TrainingSettings(_Section):
    strategy: Literal["naive", "replay", "ewc", "replay+ewc"] = "replay+ewc"
    replay_ratio: float = Field(0.5, ge=0, lt=1)
    replay_buffer: int = Field(2_000, ge=0)
    # For the per-sample empirical Fisher (continual/learn/ewc.py); bench/stream.py measured 1-5 as
    # good and 100 as too rigid to learn a new domain.
    ewc_lambda: float = Field(3.0, ge=0)
    fisher_decay: float = Field(0.9, ge=0, le=1)
    epochs: int = Field(3, ge=1)
    warmup_epochs: int = Field(0, ge=0)
    learning_rate: float = Field(1e-4, gt=0)
    head_learning_rate: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    batch_size: int = Field(32, ge=1)
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    device: str = "auto"
    cpu_threads: int = Field(0, ge=0)  # 0: all cores but one, so serving keeps a core
    num_workers: int = Field(0, ge=0)
    launcher: Literal["local", "torchrun"] = "local"
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str = ""
    max_duration_seconds: float = Field(3_600.0, gt=0)
    # The worker stops itself at max_duration_seconds between steps; the service kills one still
    # running this much later (stuck outside the training steps), recording the phase it was in.
    deadline_grace_seconds: float = Field(60.0, gt=0)
    feature_cache_items: int = Field(100_000, ge=0)
    seed: int = 0
    # Samples of the run's training data used to estimate the EWC Fisher diagonal.
    fisher_samples: int = Field(1_000, ge=1)
    # Epochs without a better validation accuracy before training stops early.
    early_stopping_patience: int = Field(2, ge=1)
    # lr_schedule = "step": multiply the LRs by lr_gamma every lr_step_epochs epochs.
    lr_step_epochs: int = Field(1, ge=1)
    lr_gamma: float = Field(0.5, gt=0, le=1)
    # Runs that add classes (see continual/learn/candidate.py):
    # the new head rows start from the class's mean embedding (centred imprint) or small random values.
    head_init: Literal["imprint", "random"] = "imprint"
    # Weight and temperature of the distillation term (the parent's old-class logits, every batch).
    distill_weight: float = Field(0.5, ge=0)
    distill_temperature: float = Field(2.0, gt=0)
    # Fit a scale and shift of the new classes' logits on the validation slice and fold it into the head.
    bias_correction: bool = True
    # Every class the same share of each batch: the replayed share becomes the old classes' share of the
    # class list (7 old of 10: 0.7) instead of replay_ratio. false: replay_ratio as in any other run.
    class_balanced_batches: bool = True
    # The first share of the run's optimizer steps ramps every LR linearly from 0 (0: no ramp).
    lr_warmup_fraction: float = Field(0.0, ge=0, lt=1)
    # AdamW/SGD weight decay on LayerNorm/BatchNorm weights and biases too (false: matrices only).
    decay_norm_and_bias: bool = True
    # Learning from unlabeled traffic (continual/learn/adapt.py; see [adaptation]): "adabn" recomputes the
    # backbone's BatchNorm statistics on logged inputs, "dann" adds a domain classifier behind a gradient
    # reversal layer. Both need a trainable or BatchNorm backbone to change anything.
    adaptation: Literal["none", "adabn", "dann"] = "none"
    # "progressive": the head first, then one more block from the top each epoch up to [model] unfreeze_last,
    # each step with a short LR warm-up. "fixed": [model] mode / unfreeze_last (after warmup_epochs) throughout.
    unfreeze_schedule: Literal["fixed", "progressive"] = "fixed"

    _device = field_validator("device")(classmethod(lambda cls, v: _check_device(v)))


# [training] defaults for [model.input] kind = "text" (keys set in the file or the environment win):
# the usual BERT fine-tuning recipe -- base LR 2e-5 (the head keeps 1e-3), a linear LR ramp over the
# first 10% of steps, and no weight decay on LayerNorm weights and biases.
TEXT_TRAINING_DEFAULTS: dict[str, float | bool] = {
    "learning_rate": 2e-5,
    "lr_warmup_fraction": 0.1,
    "decay_norm_and_bias": False,
    "weight_decay": 0.01,
}


class AdaptationSettings(_Section):
    """Unlabeled target data for [training] adaptation: logged inputs from the prediction log."""

    # "drift_window": the predictions logged while the last drift check's current window was collected
    # (the window it flagged), falling back to "latest" when no check flagged drift. "latest": the newest.
    target: Literal["drift_window", "latest"] = "drift_window"
    # At most this many logged inputs (deduplicated by input hash, holdout inputs left out).
    target_samples: int = Field(1_000, ge=1)
    # Fewer than this: the run trains without adaptation and records why.
    min_target_samples: int = Field(32, ge=1)
    # The gradient reversal layer's final weight; it ramps from 0 by 2/(1+exp(-10 p))-1 over training.
    grl_weight: float = Field(1.0, ge=0)
    # Weight of the domain classifier's loss in the total loss.
    domain_weight: float = Field(1.0, ge=0)
    domain_hidden: int = Field(256, ge=1)
    # Progressive unfreezing: optimizer steps of linear LR warm-up after each block joins.
    warmup_steps: int = Field(20, ge=0)


class LabelQueueSettings(_Section):
    """``GET /v1/label-queue``: which logged, unlabeled predictions are most worth a label."""

    # A handed-out item is not handed out again for this long (unless labeled, it then comes back).
    lease_seconds: float = Field(600.0, gt=0)
    max_k: int = Field(500, ge=1)
    # The newest this many unlabeled predictions with a kept input are considered.
    candidates: int = Field(5_000, ge=1)
    # How k items are picked: "typical" (the newest typical_pool candidates in k clusters of the
    # champion's embeddings, the one nearest each centre) or "uncertain" (the diversity_pool x k
    # smallest margins, thinned by greedy k-center). Either way handed out most uncertain first.
    strategy: Literal["typical", "uncertain"] = "typical"
    # Embedded by the champion on every request: this bounds a request's cost.
    typical_pool: int = Field(1_000, ge=1)
    diversity_pool: int = Field(4, ge=1)


class GateSettings(_Section):
    min_holdout_samples: int = Field(30, ge=1)
    min_new_improvement: float = Field(0.0, ge=-1, le=1)
    max_old_forgetting: float = Field(0.02, ge=0, le=1)
    min_accuracy: float = Field(0.5, ge=0, le=1)
    # p-value threshold for the exact McNemar test on the new holdout; 0 disables it.
    significance: float = Field(0.05, ge=0, lt=1)
    shadow: bool = False
    # A candidate that adds classes: each new class's holdout recall must reach this, and no old
    # class's recall may drop by more than max_class_recall_drop below the champion's.
    min_new_class_recall: float = Field(0.5, ge=0, le=1)
    max_class_recall_drop: float = Field(0.1, ge=0, le=1)


class ServingSettings(_Section):
    device: str = "auto"
    poll_interval_seconds: float = Field(2.0, gt=0)
    max_batch: int = Field(256, ge=1)
    warmup: bool = True
    # The prediction log (continual/predlog.py): every answered input becomes a row in the
    # store, written in batches by one background thread, so a label can arrive later by id.
    log_predictions: bool = True
    # Whether a logged prediction keeps its input (needed for feedback by prediction id):
    # "all", "sampled" (a share of log_sample_rate), or "none".
    log_inputs: Literal["all", "sampled", "none"] = "all"
    log_sample_rate: float = Field(0.1, ge=0, le=1)
    log_top_k: int = Field(5, ge=1)  # scores kept per logged prediction (the k most probable classes)
    # Records waiting for the writer; when it is full new records are dropped (and counted), never requests.
    log_queue_size: int = Field(20_000, ge=1)
    log_flush_rows: int = Field(500, ge=1)  # the writer commits this many at once ...
    log_flush_seconds: float = Field(0.25, gt=0)  # ... or what it has, this long after the oldest arrived
    # Retention (the hourly retention job): rows older than this many days, and beyond this many, are deleted.
    prediction_retention_days: float = Field(30.0, gt=0)
    prediction_retention_rows: int = Field(1_000_000, ge=1)

    _device = field_validator("device")(classmethod(lambda cls, v: _check_device(v)))


class RetentionSettings(_Section):
    """What the hourly retention job prunes (model versions: ``[model] keep_versions``)."""

    # The event log and the drift checks: older than N days, and beyond the newest M rows.
    events_days: float = Field(90.0, gt=0)
    events_max_rows: int = Field(100_000, ge=1)
    drift_checks_days: float = Field(30.0, gt=0)
    drift_checks_max_rows: int = Field(50_000, ge=1)
    # Training runs keep their row (the audit trail); their worker log (<data_dir>/runs/<id>.log)
    # and their settings snapshot go after this long. Gate decisions and the champion history stay.
    run_logs_days: float = Field(30.0, gt=0)
    run_specs_days: float = Field(90.0, gt=0)


class AccuracySettings(_Section):
    """Live accuracy from delayed labels, and accuracy estimated without labels (see README)."""

    # Live accuracy per version: over its last live_window labeled predictions, for the
    # champion and the live_versions - 1 champions before it (a bounded metric label set).
    live_window: int = Field(500, ge=1)
    live_versions: int = Field(3, ge=1)
    # Label-free estimates are computed per window of this many consecutive predictions of the champion.
    estimate_window: int = Field(200, ge=10)
    interval_seconds: float = Field(15.0, gt=0)
    # A window's estimation error is recorded once this many of its predictions are labeled.
    min_labels: int = Field(30, ge=1)
    # Which estimate the trigger ([triggers] min_estimated_accuracy) and the status headline use.
    estimator: Literal["atc", "confidence"] = "atc"
    # Fit a temperature on the holdout when a candidate is built; served confidences use it.
    calibrate: bool = True


# -- Settings: the tables joined, and the rules that span them -----------------------------------------------
class Settings(_Section):
    service: ServiceSettings = ServiceSettings()
    auth: AuthSettings = AuthSettings()
    store: StoreSettings = StoreSettings()
    ingest: IngestSettings = IngestSettings()
    model: ModelSettings = ModelSettings()
    triggers: TriggerSettings = TriggerSettings()
    drift: DriftSettings = DriftSettings()
    training: TrainingSettings = TrainingSettings()
    gate: GateSettings = GateSettings()
    serving: ServingSettings = ServingSettings()
    retention: RetentionSettings = RetentionSettings()
    accuracy: AccuracySettings = AccuracySettings()
    adaptation: AdaptationSettings = AdaptationSettings()
    label_queue: LabelQueueSettings = LabelQueueSettings()

    @model_validator(mode="after")
    def _text_training_defaults(self) -> Settings:
        # A BERT-style encoder wants another recipe than an ImageNet CNN; keys set explicitly win.
        if self.model.input.kind == "text":
            unset = {k: v for k, v in TEXT_TRAINING_DEFAULTS.items() if k not in self.training.model_fields_set}
            if unset:
                object.__setattr__(self, "training", self.training.model_copy(update=unset))
        return self

    def resolved_store(self) -> StoreSettings:
        """The store section with the URL filled in (the SQLite default in the data dir); no password in it."""
        url = self.store.url or f"sqlite:///{(self.service.data_dir / 'continual.db').as_posix()}"
        return self.store.model_copy(update={"url": url})

    @property
    def models_dir(self) -> Path:
        return self.service.data_dir / "models"

    def tokens(self, scope: Literal["ingest", "admin"]) -> frozenset[str]:
        """Tokens of one scope from the settings and the token file (one per line, # comments)."""
        inline = self.auth.ingest_tokens if scope == "ingest" else self.auth.admin_tokens
        path = self.auth.ingest_tokens_file if scope == "ingest" else self.auth.admin_tokens_file
        tokens = set(inline)
        if path:
            for line in read_secret_file(path).splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    tokens.add(line)
        return frozenset(t for t in tokens if t)


# -- loading: the file, CONTINUAL_* overrides, error messages ------------------------------------------------
def read_secret_file(path: str) -> str:
    """Read a secret, trying ``$CREDENTIALS_DIRECTORY/<path>`` first for relative paths."""
    p = Path(path)
    candidates = [p]
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and not p.is_absolute():
        candidates.insert(0, Path(creds) / p)
    for c in candidates:
        if c.is_file():
            return c.read_text(encoding="utf-8")
    raise ConfigError(f"secret file {path!r} does not exist (looked in: {', '.join(str(c) for c in candidates)})")


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--config`` if given, else ``$CONTINUAL_CONFIG``, else ``./config.toml``."""
    return Path(explicit or os.environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_file: bool = True,
) -> Settings:
    """Load settings from a TOML file, then apply ``CONTINUAL_<SECTION>__<KEY>`` overrides."""
    file = config_path(path)
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if file.is_file():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{file}: not valid TOML: {e}") from None
    elif require_file:
        raise ConfigError(f"config file {str(file)!r} does not exist (pass --config PATH or set CONTINUAL_CONFIG)")
    _apply_env(data, env)
    return settings_from_dict(data, source=str(file))


def settings_from_dict(data: Mapping[str, Any], source: str = "config") -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, data, source)) from None


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name}: [{part}] is not a section")
        node[path[-1]] = _parse_env_value(raw, _field_is_sequence(path))


def _field_is_sequence(path: list[str]) -> bool:
    model: type[BaseModel] = Settings
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            continue
        return getattr(ann, "__origin__", None) is tuple
    return False


def _parse_env_value(raw: str, sequence: bool) -> Any:  # Any: a string or a parsed JSON list
    text = raw.strip()
    if sequence:
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
        return [item.strip() for item in text.split(",") if item.strip()]
    return raw


def _describe(error: ValidationError, data: Mapping[str, Any], source: str) -> str:
    lines = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        key = loc[-1] if loc else "?"
        where = f"[{'.'.join(loc[:-1])}] {key}" if len(loc) > 1 else f"[{key}]"
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            hint = difflib.get_close_matches(key, known, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            lines.append(f"{source}: unknown key {where}{did_you_mean}; allowed keys: {', '.join(sorted(known))}")
            continue
        value = _lookup(data, err["loc"])
        shown = f" = {value!r}" if value is not _MISSING else ""
        lines.append(f"{source}: {where}{shown}: {_allowed(err)}")
    return "; ".join(lines)


def _allowed(err: Any) -> str:  # Any: pydantic's ErrorDetails dict
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


_MISSING = object()


def _lookup(data: Mapping[str, Any], loc: tuple[Any, ...]) -> Any:  # Any: whatever the user wrote there
    node: Any = data  # Any: walks user-written TOML
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return node


def _known_keys(section: list[str]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in section:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)
