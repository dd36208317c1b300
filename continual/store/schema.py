"""The store's tables. Changes go through an Alembic migration in ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
)

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# One row per labeled sample. ``seq`` is the monotonic ingest order: a version's
# data cutoff is a seq, "old" is seq <= cutoff and "new" is seq > cutoff.
samples = Table(
    "samples",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("external_id", String(255), nullable=False, unique=True),
    Column("label", String(255), nullable=False),
    Column("kind", String(16), nullable=False),  # "vector" | "image"
    Column("sha256", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("split", String(16), nullable=False),  # "train" | "holdout"
    Column("ingested_at", DateTime(timezone=True), nullable=False),
    Column("source", String(255), nullable=False, default=""),
    Column("meta", JSON, nullable=True),
    # Excluded samples (poisoned or mislabeled feedback, taken out by an operator)
    # stay stored for the audit trail but count for nothing: no training, no
    # holdout, no drift window, not pending.
    Column("excluded", Boolean, nullable=False, default=False, server_default=false()),
)
# Covers counts and (seq, label) reads for draws within a split.
Index("ix_samples_split_seq", samples.c.split, samples.c.seq, samples.c.label)

# One row per label ever stored (configured or accepted as a new class): when it was first
# seen. Its sample counts come from ``samples`` (excluded samples do not count).
classes = Table(
    "classes",
    metadata,
    Column("label", String(255), primary_key=True),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("first_seq", BigInteger, nullable=True),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("parent", String(64), nullable=True),
    Column("architecture", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("data_cutoff", BigInteger, nullable=False, default=0),
    Column("run_id", BigInteger, nullable=True),
    Column("status", String(32), nullable=False, default="candidate"),
    Column("metrics", JSON, nullable=True),
    Column("manifest_sha256", String(64), nullable=True),
    # The version's class list in head order (its manifest's); NULL for rows written before 0004.
    Column("classes", JSON, nullable=True),
)

# Append-only: the champion is the version of the newest row.
champion_history = Table(
    "champion_history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("version", String(64), ForeignKey("model_versions.version"), nullable=False),
    Column("previous", String(64), nullable=True),
    Column("promoted_at", DateTime(timezone=True), nullable=False),
    Column("reason", String(32), nullable=False),  # gate | manual | rollback | import | bootstrap
    Column("actor", String(255), nullable=False, default=""),
    Column("details", JSON, nullable=True),
)

training_runs = Table(
    "training_runs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("trigger", String(255), nullable=False),
    Column("status", String(32), nullable=False),  # pending running succeeded failed interrupted cancelled
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("parent_version", String(64), nullable=True),
    Column("candidate_version", String(64), nullable=True),
    Column("data_cutoff", BigInteger, nullable=True),
    Column("spec", JSON, nullable=True),
    Column("progress", JSON, nullable=True),
    Column("metrics", JSON, nullable=True),
    Column("error", Text, nullable=True),
    Column("pid", Integer, nullable=True),
    Column("host", String(255), nullable=True),
)

gate_decisions = Table(
    "gate_decisions",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("run_id", BigInteger, nullable=True),
    Column("candidate", String(64), nullable=False),
    Column("champion", String(64), nullable=True),
    Column("outcome", String(16), nullable=False),  # promoted | rejected | deferred | superseded
    Column("rule", String(64), nullable=False),
    Column("reasons", JSON, nullable=True),
    Column("metrics", JSON, nullable=True),
    Column("shadow", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

drift_checks = Table(
    "drift_checks",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("champion", String(64), nullable=True),
    Column("detected", Boolean, nullable=False),
    Column("n_reference", Integer, nullable=False),
    Column("n_current", Integer, nullable=False),
    Column("duration_seconds", Float, nullable=False),
    Column("results", JSON, nullable=True),
)

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=True),
)

# One row per named lease (e.g. "trainer"); the holder renews before expires_at.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# Secrets generated once per install (e.g. the salt of token fingerprints), shared by every process.
install_secrets = Table(
    "install_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
# One row per answered /v1/predict input (the prediction log). ``id`` sorts by creation
# time (a ULID-like string); ``payload`` is the input as a sample would store it, or NULL
# when the logging policy (``input_policy``) did not keep it. A label that arrives later
# by prediction id fills ``true_label``/``labeled_at`` and names the sample it became.
predictions = Table(
    "predictions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("label", String(255), nullable=False),  # predicted
    Column("confidence", Float, nullable=False),  # calibrated, as served
    # Embedding distance from the version's holdout / its 99th percentile (> 1: far); NULL without one.
    Column("distance", Float, nullable=True),
    Column("scores", JSON, nullable=True),  # the top-k classes and their probabilities
    Column("kind", String(16), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=True),
    Column("input_policy", String(16), nullable=False),  # [serving] log_inputs when it was logged
    Column("true_label", String(255), nullable=True),
    Column("labeled_at", DateTime(timezone=True), nullable=True),
    Column("sample_id", String(255), nullable=True),  # external id of the sample the label became
)
# Windows of one version's predictions in id order; labeled predictions per version, newest first
# (partial: a prediction is inserted unlabeled, so the insert — the hot path — skips this index).
# No index on created_at: ids sort by time, so retention walks the primary key from the oldest.
_labeled = predictions.c.labeled_at.is_not(None)
Index("ix_predictions_version_id", predictions.c.model_version, predictions.c.id)
Index(
    "ix_predictions_version_labeled",
    predictions.c.model_version,
    predictions.c.labeled_at,
    sqlite_where=_labeled,
    postgresql_where=_labeled,
)

# Consecutive windows of the champion's predictions with their label-free accuracy
# estimates; the realized accuracy fills in as labels arrive.
accuracy_windows = Table(
    "accuracy_windows",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("first_id", String(32), nullable=False),
    Column("last_id", String(32), nullable=False),
    Column("first_at", DateTime(timezone=True), nullable=False),
    Column("last_at", DateTime(timezone=True), nullable=False),
    Column("n", Integer, nullable=False),
    Column("estimates", JSON, nullable=False),  # {method: estimated accuracy or null}
    Column("flags", JSON, nullable=True),  # why the estimates may not hold for this window
    Column("n_labeled", Integer, nullable=False, default=0),
    Column("n_correct", Integer, nullable=False, default=0),
    Column("unknown_labels", JSON, nullable=True),  # true labels outside the version's classes
    Column("realized_at", DateTime(timezone=True), nullable=True),
)
Index("ix_accuracy_windows_version_last", accuracy_windows.c.model_version, accuracy_windows.c.last_id)

# The label queue's leases: a prediction handed out by GET /v1/label-queue is not handed out again
# until ``leased_until`` (the labeler's label usually arrives first; then it is labeled and never queued).
label_leases = Table(
    "label_leases",
    metadata,
    Column("prediction_id", String(32), primary_key=True),
    Column("leased_at", DateTime(timezone=True), nullable=False),
    Column("leased_until", DateTime(timezone=True), nullable=False),
    Column("holder", String(255), nullable=False, default=""),
)
