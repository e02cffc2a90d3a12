"""Reading params.yaml: `load_params` reads the whole file, `get` one dotted key of it.

A stage does not read only the keys its dvc.yaml entry declares: every stage that takes params
(`stages._cli.load_checked_params`) loads the whole file and checks every block it has with
`deeper.validate.check_params` before any work, so a bad value of a key the stage never uses stops it too. It
then reads the values it uses with `get`. The keys a stage declares in dvc.yaml are only what DVC watches to
decide whether it re-runs; nothing here checks that a stage reads no key it does not declare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deeper.errors import ConfigError

MISSING = object()


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError("(file)", "not found; run the stage from the repository root", str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError("(file)", f"not valid YAML: {str(e).splitlines()[0]}", str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("(file)", "top level must be a mapping", str(path))
    return data


def get(params: dict, dotted: str, default: Any = MISSING) -> Any:
    """`get(p, "window.size")`; a missing key without default is a ConfigError naming it."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is MISSING:
                raise ConfigError(dotted, "missing")
            return default
        node = node[part]
    return node
