"""IncUpdate baseline (persona extension, Appendix A.3): fold the latest window's ratings into the old persona."""

from __future__ import annotations

from deeper.methods.base import SingleCallMethod, UpdateInput


class IncUpdate(SingleCallMethod):
    name = "incupdate"
    template = "incupdate"

    def values(self, item: UpdateInput) -> dict:
        return {"item_type": item.item_type, "old_persona": item.persona, "ratings": item.current.pairs()}
