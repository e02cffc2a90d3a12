"""FullRegen baseline (persona regeneration, Appendix A.3): a new persona from every rating so far (W_0..W_t);
the old persona is not shown."""

from __future__ import annotations

from deeper.methods.base import SingleCallMethod, UpdateInput


class FullRegen(SingleCallMethod):
    name = "fullregen"
    template = "fullregen"

    def values(self, item: UpdateInput) -> dict:
        return {"item_type": item.item_type, "ratings": item.all_ratings()}
