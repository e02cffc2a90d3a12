"""SlideRegen baseline (persona regeneration, Appendix A.3): a new persona from the latest window W_t only;
the old persona is not shown."""

from __future__ import annotations

from deeper.methods.base import SingleCallMethod, UpdateInput


class SlideRegen(SingleCallMethod):
    name = "slideregen"
    template = "slideregen"

    def values(self, item: UpdateInput) -> dict:
        return {"item_type": item.item_type, "ratings": item.current.pairs()}
