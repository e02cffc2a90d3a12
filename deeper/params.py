"""The params readers every block's parser shares: `number` (and `param`), `mapping`, `fill`, and
`sampling_block`, the one sampling parser.

The per-block parsers (PairConfig, TrainConfig, SampleSettings, ...) live with their concept but read numbers
only through `number` and sampling blocks only through `sampling_block`, so a rule is written once. The
whole-file validator that runs them all before any stage does work is `deeper.validate.check_params`.

This module is a foundation (docs/ARCHITECTURE.md, "Layers"): it imports only deeper.config, deeper.errors and
the LLM interface deeper.llm.base, so every layer may import it. The validator imports every block's owner, so
it lives a layer above them, in deeper/validate.py: kept here, it made the library's one import circle.

A number is refused, with one line naming the key, when it is not a number (`high`, `true`), not finite
(`.nan`, `.inf`), or out of its range; an integer knob refuses 2.5. YAML 1.1 reads `1e-4` (no dot) as a string,
so a string that spells a plain decimal number is read as that number; nothing else is converted.
"""

from __future__ import annotations

import math
import re
from typing import TypedDict

from deeper.config import get
from deeper.errors import ConfigError

_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class NumberRule(TypedDict, total=False):
    """A key's rule in the *_RULES tables: number()'s keyword arguments."""

    integer: bool
    low: float
    high: float
    low_open: bool
    high_open: bool
    nullable: bool


def number(
    value,
    key: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    nullable: bool = False,
):
    """`value` checked as a finite number in [low, high] (open ends with low_open / high_open); an int when
    `integer`. None passes only when `nullable`. Anything else is a ConfigError naming `key`."""
    if value is None:
        if nullable:
            return None
        raise ConfigError(key, "missing (null); a number is needed")
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    if integer:
        if value != int(value):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(key, f"must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(key, f"must be {'<' if high_open else '<='} {high:g}, got {value!r}")
    return value


def mapping(value, key: str, known: tuple[str, ...] | None = None, nullable: bool = False) -> dict:
    """A params block that must be a mapping; with `known`, an unknown key is named."""
    if value is None and nullable:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {value!r}")
    if known is not None:
        unknown = sorted(set(value) - set(known), key=str)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown key; known: {', '.join(known)}")
    return value


def param(params: dict, key: str, **rule):
    """`number(get(params, key), key, **rule)`."""
    return number(get(params, key), key, **rule)


# ---------------------------------------------------------------- sampling: the one parser

# the params blocks models.<role>: frozen (predicts every rating), policy (the refiner DPO trains), sampler (samples
# iteration 1's candidates; the base policy in DEEPER, a block of its own so another backbone trains on the same pairs)
MODEL_ROLES = ("frozen", "policy", "sampler")

SAMPLING_KEYS = ("temperature", "top_p", "repetition_penalty", "max_new_tokens", "seed")
SAMPLING_RULES: dict[str, NumberRule] = {
    "temperature": {"low": 0.0},
    "top_p": {"low": 0.0, "low_open": True, "high": 1.0},
    "repetition_penalty": {"low": 0.0, "low_open": True},
    "max_new_tokens": {"integer": True, "low": 1},
    "seed": {"integer": True, "low": 0},
}


def sampling_block(block, key: str, defaults=None, extra: tuple[str, ...] = ()):
    """A generation block (`sample`, `persona`, `predict.json`, `evaluate.sampling`) as Sampling. Keys missing
    from the block take `defaults`' values; with no defaults every key is required. `extra`: other keys the
    block may hold (its own settings, checked by its owner). Returns deeper.llm.base.Sampling."""
    from deeper.llm.base import (
        Sampling,  # here, so that a stage reading only numbers does not import the LLM layer
    )

    block = mapping(block, key, known=SAMPLING_KEYS + extra)
    return Sampling(
        **fill(
            block,
            key,
            SAMPLING_KEYS,
            defaults,
            lambda name, value: number(value, f"{key}.{name}", **SAMPLING_RULES[name]),
        )
    )


def fill(block: dict, key: str, names, defaults, check) -> dict:
    """{name: value} for each of `names`: `check(name, block[name])` where the block has it, else `defaults`'
    attribute of that name; with no defaults a missing name is `<key>.<name>: missing`."""
    values = {}
    for name in names:
        if name in block:
            values[name] = check(name, block[name])
        elif defaults is None:
            raise ConfigError(f"{key}.{name}", "missing")
        else:
            values[name] = getattr(defaults, name)
    return values
