"""Feedback ingestion: wire-format decoding, batch validation and file importers."""

from __future__ import annotations

from continual.ingest.batch import (
    BatchTooLarge,
    MalformedBody,
    derived_id,
    feedback_samples,
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
    "decode_input",
    "decode_inputs",
    "decode_payload",
    "derived_id",
    "feedback_samples",
    "parse_json",
    "predict_inputs",
]
