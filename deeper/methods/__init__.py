"""Persona update methods and the registry: evaluation method name -> how to build it.

| name        | method     | model (params `models.<role>`) | adapter                 |
|-------------|------------|--------------------------------|-------------------------|
| deeper      | Refine     | policy                         | models/adapters/it2     |  Model 2 = DEEPER
| deeper_it1  | Refine     | policy                         | models/adapters/it1     |  Model 1
| untrained   | Refine     | policy                         | none                    |  the base policy
| incupdate   | IncUpdate  | frozen                         | none                    |
| hiermerge   | HierMerge  | frozen                         | none                    |  two calls
| fullregen   | FullRegen  | frozen                         | none                    |
| slideregen  | SlideRegen | frozen                         | none                    |

The baselines run on the frozen model, as in the paper (GPT-4o-mini served all baselines). dvc.yaml's
`evaluate` foreach lists the same names, roles and adapters (tests/test_methods.py checks that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type[UpdateMethod]
    role: str  # which model of params `models` writes the updates: "policy" or "frozen"
    adapter: str | None = None  # LoRA adapter folder on the policy model (repo-relative), or None

    @property
    def is_refiner(self) -> bool:
        return self.cls is Refine

    def build(self, llm: LLM, sampling: Sampling, prompts: PromptSet | None = None) -> UpdateMethod:
        return self.cls(llm, sampling, prompts)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("deeper", Refine, "policy", "models/adapters/it2"),
        MethodSpec("deeper_it1", Refine, "policy", "models/adapters/it1"),
        MethodSpec("untrained", Refine, "policy", None),
        MethodSpec("incupdate", IncUpdate, "frozen"),
        MethodSpec("hiermerge", HierMerge, "frozen"),
        MethodSpec("fullregen", FullRegen, "frozen"),
        MethodSpec("slideregen", SlideRegen, "frozen"),
    )
}


def method_spec(name: str, key: str = "evaluate.methods") -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(key, f"unknown method {name!r}; known: {list(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "ROLES",
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
]
