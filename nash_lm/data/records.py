"""Record schemas of the text data layer and their validation.

Three kinds of records, each a JSON object per line (JSONL) or per ArrayRecord entry:

    prompt      {"prompt": str}
    sft         {"prompt": str, "response": str}
    preference  {"prompt": str, "chosen": str, "rejected": str, "label": float in [0, 1] (optional)}

`label` is a soft label P(chosen > rejected); absent means a hard label (chosen won, i.e. 1.0). Strings must be
non-empty after stripping whitespace; extra keys are allowed and ignored (so a preference file also serves as a
prompt file). `parse(obj, kind)` returns the record as a plain dict with exactly the schema's fields or raises
`RecordError` with a one-line reason; where the record came from (file and line) is added by the readers in
`nash_lm.data.sources`.
"""
from __future__ import annotations

import math

KINDS = ("prompt", "sft", "preference")
_TEXT_FIELDS = {
    "prompt": ("prompt",),
    "sft": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
}


class RecordError(ValueError):
    """A record that does not match its schema (the message is one line, without the location)."""


def fields(kind: str) -> tuple[str, ...]:
    """The fields of a record of `kind`, in order (the optional `label` last for preferences)."""
    check_kind(kind)
    return _TEXT_FIELDS[kind] + (("label",) if kind == "preference" else ())


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"record kind: unknown {kind!r}; known: {list(KINDS)}")


def parse(obj, kind: str) -> dict:
    """Validates one decoded JSON value against the schema of `kind`; returns {field: value}."""
    check_kind(kind)
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    out = {}
    for name in _TEXT_FIELDS[kind]:
        if name not in obj:
            raise RecordError(f"missing field {name!r}")
        value = obj[name]
        if not isinstance(value, str):
            raise RecordError(f"field {name!r}: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise RecordError(f"field {name!r}: empty string")
        out[name] = value
    if kind == "preference":
        label = obj.get("label", None)
        if label is None:
            out["label"] = 1.0
        else:
            if isinstance(label, bool) or not isinstance(label, (int, float)):
                raise RecordError(f"field 'label': expected a number in [0, 1], got {type(label).__name__}")
            if not (math.isfinite(label) and 0.0 <= label <= 1.0):
                raise RecordError(f"field 'label': expected a number in [0, 1], got {label!r}")
            out["label"] = float(label)
    return out
