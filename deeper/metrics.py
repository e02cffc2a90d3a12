"""Metrics JSON that `dvc metrics diff` reads well: small, stable in shape, rounded, keys sorted."""

from __future__ import annotations

import json
import math
from pathlib import Path

from deeper.outputs import write_text


def _clean(value, digits: int):
    if isinstance(value, dict):
        return {str(k): _clean(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, digits) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, digits)
    return value


def write_json(path: str | Path, data: dict, digits: int = 4) -> None:
    write_text(path, json.dumps(_clean(data, digits), indent=2, sort_keys=True) + "\n")
