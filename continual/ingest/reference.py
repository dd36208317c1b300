"""Feedback by reference: ``{"prediction_id": ..., "label": ...}`` becomes a sample built from the logged input.

The sample's payload is the input the prediction log kept, its id is the given ``id``
or ``"prediction:" + prediction_id``, so resending a label is a duplicate and another
label for the same prediction is a ``409`` — exactly as for samples sent with their
input. Storing it labels the prediction (``Store.insert``), which live accuracy reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from continual.config import Settings
from continual.ingest.decode import ValidationFailed
from continual.store import LoggedPrediction, NewSample

REFERENCE_KEYS = frozenset({"prediction_id", "id", "label", "metadata"})
ID_PREFIX = "prediction:"


class PredictionLookup(Protocol):
    """Logged predictions by id (``store.predictions``)."""

    def get_many(self, ids: Sequence[str]) -> Mapping[str, LoggedPrediction]: ...


class UnknownPrediction(ValueError):
    """Prediction ids that no logged prediction has: ``(index in the batch, prediction id)`` each (422)."""

    def __init__(self, items: Sequence[tuple[int, str]]) -> None:
        self.items = list(items)
        shown = ", ".join(repr(p) for _, p in self.items[:5]) + (" ..." if len(self.items) > 5 else "")
        super().__init__(
            f"{len(self.items)} prediction id(s) are not in the prediction log: {shown} (never answered by this "
            "service, not logged — the log drops records when its queue is full — or deleted by retention)"
        )

    @property
    def details(self) -> list[dict[str, Any]]:
        return [{"index": i, "field": "prediction_id", "id": pid, "message": "no logged prediction has this id"}
                for i, pid in self.items]  # fmt: skip


class InputNotLogged(ValueError):
    """Predictions logged without their input, so no sample can be built: ``(index, id, why)`` each (422)."""

    def __init__(self, items: Sequence[tuple[int, str, str]]) -> None:
        self.items = list(items)
        first = self.items[0]
        more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
        super().__init__(f"prediction {first[1]!r}: {first[2]}{more}; send the sample with its input instead")

    @property
    def details(self) -> list[dict[str, Any]]:
        return [{"index": i, "field": "prediction_id", "id": pid, "message": why} for i, pid, why in self.items]


@dataclass(frozen=True)
class Reference:
    """A validated by-reference sample, waiting for its logged prediction."""

    index: int
    prediction_id: str
    label: str
    sample_id: str | None
    meta: dict[str, Any] | None


def not_logged_reason(policy: str, max_payload_bytes: int) -> str:
    """Why a logged prediction has no input, naming the policy it was logged under."""
    if policy == "none":
        return "its input was not logged ([serving] log_inputs = 'none')"
    if policy == "sampled":
        return "its input was not in the sample the log keeps ([serving] log_inputs = 'sampled', see log_sample_rate)"
    return f"its input was not logged: larger than store.max_payload_bytes = {max_payload_bytes}"


def resolve(
    refs: Sequence[Reference], lookup: PredictionLookup | None, settings: Settings, source: str
) -> dict[int, NewSample]:
    """The samples of ``refs`` by batch index; raises naming every reference that cannot become one."""
    if not refs:
        return {}
    if lookup is None:
        raise ValidationFailed(
            [{"index": r.index, "field": "prediction_id", "message": "feedback by prediction id needs the "
              "service's prediction log; send the sample with its input"} for r in refs]
        )  # fmt: skip
    logged = lookup.get_many([r.prediction_id for r in refs])
    unknown = [(r.index, r.prediction_id) for r in refs if r.prediction_id not in logged]
    if unknown:
        raise UnknownPrediction(unknown)
    missing = [
        (r.index, r.prediction_id, not_logged_reason(p.input_policy, settings.store.max_payload_bytes))
        for r in refs
        if (p := logged[r.prediction_id]).payload is None
    ]
    if missing:
        raise InputNotLogged(missing)
    kind = settings.model.input.kind
    wrong = [
        {"index": r.index, "field": "prediction_id",
         "message": f"the prediction's input is a {p.kind} input; this service takes {kind} inputs"}
        for r in refs
        if (p := logged[r.prediction_id]).kind != kind
    ]  # fmt: skip
    if wrong:
        raise ValidationFailed(wrong)
    out = {}
    for r in refs:
        p = logged[r.prediction_id]
        out[r.index] = NewSample(
            external_id=r.sample_id if r.sample_id is not None else ID_PREFIX + r.prediction_id,
            label=r.label,
            kind=p.kind,
            payload=p.payload,  # type: ignore[arg-type]  # checked above
            source=source,
            meta=r.meta,
            sha256=p.sha256,
            prediction_id=p.id,
            predicted_at=p.created_at,
        )
    return out
