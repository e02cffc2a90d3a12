"""Profiles: named sets of params overrides (profiles/<name>.yaml) applied with `dvc exp run -S ...`.

A profile maps dotted params.yaml keys to values; each entry sets that key to exactly its value (a mapping
replaces the whole block, as `models.policy` must when the backend changes). `load_profile` refuses keys that
params.yaml does not have (a typo would otherwise add a key no stage reads), `dvc_flags` turns the entries
into DVC's `-S` overrides (Hydra syntax: `key=value`, or `~key` + `+key={...}` to replace a block),
`apply_profile` is the params the flags produce; `deeper.validate.check_params` (the stages' own validator) checks every
block (the same code the stages run), up to the point where a GPU, a server or a key would be needed.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import yaml

from deeper.config import get
from deeper.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
_ABSENT = object()


def profile_path(name: str | Path) -> Path:
    """`paper` -> profiles/paper.yaml; a path to a YAML file is taken as is."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    return PROFILES_DIR / f"{name}.yaml"


def available() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


# Profiles that were removed, and why: asking for one by name says so (git history has the file).
RETIRED = {
    "quality": "retired: its frozen model, Qwen2.5-Coder-0.5B, does not read a persona (results/headroom/"
    "qwen2.5-coder-0.5b: sensitivity +0.005 [-0.013, +0.027]), so its table could not rank refiners; "
    "run the headroom profile on a frozen model first",
}


def load_profile(name: str | Path, params: dict) -> dict:
    """The profile's entries {dotted key: value}, each key checked against `params` (params.yaml)."""
    path = profile_path(name)
    if not path.is_file():
        why = RETIRED.get(str(name), "not found")
        raise ConfigError("(profile)", f"{why}; profiles: {', '.join(available()) or 'none'}", str(path))
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError("(file)", f"not valid YAML: {str(e).splitlines()[0]}", str(path)) from None
    if not isinstance(entries, dict):
        raise ConfigError("(file)", "top level must be a mapping of params keys to values", str(path))
    for key, value in entries.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(str(key), "is not a dotted params key", str(path))
        if get(params, key, _ABSENT) is _ABSENT:
            raise ConfigError(key, "is not a key of params.yaml (a typo?)", str(path))
        _check_value(key, value, str(path))
    if "models.policy" in entries and "models.sampler" not in entries:
        # DEEPER samples iteration 1's candidates from the base policy; a profile that swaps the policy's block
        # (another backend or model) and forgot the sampler would sample them from params.yaml's model
        raise ConfigError(
            "models.sampler",
            "must be set where models.policy is (the model that samples iteration "
            "1's candidates; equal to models.policy for DEEPER as published)",
            str(path),
        )
    return entries


def _check_value(key: str, value, source: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}.{k}", "mapping keys must be strings", source)
            _check_value(f"{key}.{k}", v, source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(f"{key}[{i}]", v, source)
    elif isinstance(value, str) and "${" in value:
        raise ConfigError(key, "must not contain ${...} (DVC would read it as an interpolation)", source)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}", source)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(key, f"unsupported value {value!r}", source)


def apply_profile(params: dict, entries: dict) -> dict:
    """A copy of `params` with every entry set (what `dvc exp run` with `dvc_flags(entries)` writes)."""
    out = copy.deepcopy(params)
    for key, value in entries.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[last] = copy.deepcopy(value)
    return out


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_NOT_PLAIN = {"null", "true", "false", "inf", "nan"}


def hydra_value(value) -> str:
    """A value in Hydra's override grammar (what DVC's -S parses). A string is quoted ("...") unless it is a
    plain word (letters, digits, `_./-`) that Hydra could not read as null, a bool or a number."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _NOT_PLAIN:
            return value
        # Hydra unescapes a backslash only before a quote or at the end of a quoted string
        escaped = re.sub(r'(\\+)(?="|$)', lambda m: m.group(1) * 2, value).replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Hydra form for {value!r}")


def dvc_flags(entries: dict) -> list[str]:
    """`dvc exp run` arguments: `-S key=value` per entry; a mapping replaces its block (`~key`, `+key={...}`)."""
    flags = []
    for key, value in entries.items():
        if isinstance(value, dict):
            flags += ["-S", f"~{key}", "-S", f"+{key}={hydra_value(value)}"]
        else:
            flags += ["-S", f"{key}={hydra_value(value)}"]
    return flags
