"""Persona update methods, and how params name them.

The one list of evaluation methods is params `evaluate.methods` (an ordered mapping; dvc.yaml's `evaluate`
stage runs `foreach` over it, and the report gathers it in that order). Each entry says

    <name>: {update: <a key of UPDATES>, model: policy | frozen, weights: <LoRA adapter folder> | models/embedded}

`update` picks the method's class (its prompts are the class's templates), `model` the params block
`models.<model>` that writes the updates, `weights` the adapter on that model (`models/embedded`, the base
models' folder, means none: every stage then depends on a real folder, and the baselines never on training).
A new method is its prompt, its class, one UPDATES line and one params entry; a new use of an existing class
(the paper's "GPT-4o-mini as refiner": refine on the frozen model) is one params entry.

The baselines run on the frozen model, as in the paper (GPT-4o-mini served all baselines).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deeper.errors import ConfigError
from deeper.llm.base import LLM, Sampling
from deeper.methods.base import UpdateInput, UpdateMethod, UpdateResult, Window
from deeper.methods.fullregen import FullRegen
from deeper.methods.hiermerge import HierMerge
from deeper.methods.incupdate import IncUpdate
from deeper.methods.refine import Refine
from deeper.methods.slideregen import SlideRegen
from deeper.prompts import PromptSet

ROLES = ("policy", "frozen")
NO_ADAPTER = "models/embedded"  # `weights` of a method that runs on the bare model
METHOD_KEYS = ("update", "model", "weights")
# `update` names of params evaluate.methods -> the class that writes the updates
UPDATES: dict[str, type[UpdateMethod]] = {
    "refine": Refine,
    "incupdate": IncUpdate,
    "hiermerge": HierMerge,
    "fullregen": FullRegen,
    "slideregen": SlideRegen,
}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type[UpdateMethod]
    role: str  # which model of params `models` writes the updates: "policy" or "frozen"
    adapter: str | None = None  # LoRA adapter folder on that model (repo-relative), or None

    @property
    def is_refiner(self) -> bool:
        return self.cls is Refine

    @property
    def trained(self) -> bool:
        """Whether its updates come from an adapter that training wrote."""
        return self.adapter is not None

    def build(self, llm: LLM, sampling: Sampling, prompts: PromptSet | None = None) -> UpdateMethod:
        return self.cls(llm, sampling, prompts)


def method_spec(name: str, entry, key: str = "evaluate.methods") -> MethodSpec:
    """One entry of params evaluate.methods, checked."""
    where = f"{key}.{name}"
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise ConfigError(key, f"method names are letters, digits and _, got {name!r}")
    if not isinstance(entry, dict):
        raise ConfigError(where, f"must be a mapping with {', '.join(METHOD_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(METHOD_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown key; known: {', '.join(METHOD_KEYS)}")
    update, role, weights = (entry.get(k) for k in METHOD_KEYS)
    if update not in UPDATES:
        raise ConfigError(f"{where}.update", f"{update!r} is not one of {', '.join(UPDATES)}")
    if role not in ROLES:
        raise ConfigError(f"{where}.model", f"{role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(weights, str) or not weights.strip():
        raise ConfigError(f"{where}.weights", f"must be an adapter folder or {NO_ADAPTER}, got {weights!r}")
    adapter = None if weights.rstrip("/") == NO_ADAPTER else weights.rstrip("/")
    return MethodSpec(name, UPDATES[update], role, adapter)


def trained_update_from_params(params: dict) -> type[UpdateMethod]:
    """params `refiner.update`: the update whose prompt the RL pipeline trains the policy on (contexts, S_1)."""
    from deeper.config import get

    update = get(params, "refiner.update")
    if update not in UPDATES:
        raise ConfigError("refiner.update", f"{update!r} is not one of {', '.join(UPDATES)}")
    if UPDATES[update] is HierMerge:
        raise ConfigError(
            "refiner.update", "hiermerge makes two calls per update; the RL pipeline trains one"
        )
    return UPDATES[update]


def reference_method(specs: dict[str, MethodSpec]) -> str:
    """The method every other is measured against (eval.json `bootstrap.vs_<it>`: it minus each other; `deeper
    refine`'s default adapter): the first entry of evaluate.methods, DEEPER's Model 2 in params.yaml. The method
    names live in params alone; code finds the ones it needs by their place and their weights."""
    return next(iter(specs))


def method_with_adapter(specs: dict[str, MethodSpec], iteration: int | None) -> str | None:
    """The first method on the policy whose adapter is train@`iteration`'s (models/adapters/it<k>: Model k,
    whatever its update), or with iteration None the first refiner on the bare policy (the untrained refiner);
    None where there is none."""
    for name, spec in specs.items():
        if spec.role != "policy":
            continue
        if iteration is None and spec.adapter is None and spec.is_refiner:
            return name
        if iteration is not None and spec.adapter is not None and Path(spec.adapter).name == f"it{iteration}":
            return name
    return None


def methods_from_params(methods, key: str = "evaluate.methods") -> dict[str, MethodSpec]:
    """params evaluate.methods (in order) -> {name: MethodSpec}."""
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(
            key,
            f"must be a non-empty mapping of method name -> {{{', '.join(METHOD_KEYS)}}}, got {methods!r}",
        )
    return {name: method_spec(name, entry, key) for name, entry in methods.items()}


__all__ = [
    "NO_ADAPTER",
    "ROLES",
    "UPDATES",
    "FullRegen",
    "HierMerge",
    "IncUpdate",
    "MethodSpec",
    "Refine",
    "SlideRegen",
    "UpdateInput",
    "UpdateMethod",
    "UpdateResult",
    "Window",
    "method_spec",
    "method_with_adapter",
    "methods_from_params",
    "reference_method",
    "trained_update_from_params",
]
