"""Feedback ingestion: wire-format decoding, batch validation and file importers."""

from __future__ import annotations

from continual.ingest.batch import (
    BatchTooLarge,
    MalformedBody,
    class_limit,
    derived_id,
    feedback_samples,
    id_problem,
    label_problem,
    parse_json,
)
from continual.ingest.decode import (
    Decoded,
    DecodedTooLarge,
    InputError,
    TooManyInputs,
    ValidationFailed,
    check_pixel_budget,
    decode_input,
    decode_inputs,
    decode_payload,
    predict_inputs,
)
from continual.ingest.exclusion import Exclusion, ExclusionInvalid, TooManyIds, exclusion_request
from continual.ingest.reference import InputNotLogged, UnknownPrediction

__all__ = [
    "BatchTooLarge",
    "Decoded",
    "DecodedTooLarge",
    "Exclusion",
    "ExclusionInvalid",
    "InputError",
    "InputNotLogged",
    "MalformedBody",
    "TooManyIds",
    "TooManyInputs",
    "UnknownPrediction",
    "ValidationFailed",
    "check_pixel_budget",
    "class_limit",
    "decode_input",
    "decode_inputs",
    "decode_payload",
    "derived_id",
    "exclusion_request",
    "feedback_samples",
    "id_problem",
    "label_problem",
    "parse_json",
    "predict_inputs",
]
