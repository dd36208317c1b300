"""Feedback ingestion: wire-format decoding, batch validation and file importers."""

from __future__ import annotations

from continual.ingest.batch import (
    BatchTooLarge,
    MalformedBody,
    SampleTooLarge,
    derived_id,
    feedback_samples,
    parse_json,
)
from continual.ingest.decode import (
    Decoded,
    InputError,
    ValidationFailed,
    decode_input,
    decode_inputs,
    decode_payload,
)

__all__ = [
    "BatchTooLarge",
    "Decoded",
    "InputError",
    "MalformedBody",
    "SampleTooLarge",
    "ValidationFailed",
    "decode_input",
    "decode_inputs",
    "decode_payload",
    "derived_id",
    "feedback_samples",
    "parse_json",
]
