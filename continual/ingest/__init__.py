"""Feedback ingestion: wire-format decoding, batch validation and file importers."""

from __future__ import annotations

from continual.ingest.batch import (
    BatchTooLarge,
    MalformedBody,
    class_limit,
    derived_id,
    feedback_samples,
    label_problem,
    parse_json,
)
from continual.ingest.decode import (
    Decoded,
    InputError,
    TooManyInputs,
    ValidationFailed,
    decode_input,
    decode_inputs,
    decode_payload,
    predict_inputs,
)

__all__ = [
    "BatchTooLarge",
    "Decoded",
    "InputError",
    "MalformedBody",
    "TooManyInputs",
    "ValidationFailed",
    "class_limit",
    "decode_input",
    "decode_inputs",
    "decode_payload",
    "derived_id",
    "feedback_samples",
    "label_problem",
    "parse_json",
    "predict_inputs",
]
