"""DEEPER's refinement (paper Sec. 3.2, Appendix A.3):
S_t = f(S_{t-1}, actual W_t ratings, predictions made with S_{t-1}).

The same prompt serves three refiners that differ only in the policy model: the untrained policy, Model 1
(LoRA adapter of iteration 1) and Model 2 = DEEPER (adapter of iteration 2); see the registry.
"""

from __future__ import annotations

from deeper.methods.base import SingleCallMethod, UpdateInput


class Refine(SingleCallMethod):
    name = "refine"
    template = "refine"

    def values(self, item: UpdateInput) -> dict:
        return {"item_type": item.item_type, "old_persona": item.persona, "comparisons": item.comparisons()}
