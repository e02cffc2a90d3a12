"""HierMerge baseline (persona extension, Appendix A.3): two calls per update.

1. A short-term persona from the latest window's ratings (template hiermerge_short).
2. The old (long-term) persona and the short-term one merged into the new persona (hiermerge_merge).
Both calls are batched over all users. A user whose short-term persona came back empty gets no merge call
and keeps the old persona (failure "empty").
"""

from __future__ import annotations

from collections.abc import Sequence

from deeper.methods.base import FAILED_REASONS, UpdateInput, UpdateMethod, UpdateResult, finish
from deeper.personas import clean_persona, degenerate_reason


class HierMerge(UpdateMethod):
    name = "hiermerge"
    calls_per_update = 2

    def update(self, inputs: Sequence[UpdateInput]) -> list[UpdateResult]:
        short_chats = [
            self.prompts.render("hiermerge_short", item_type=item.item_type, ratings=item.current.pairs())
            for item in inputs
        ]
        short_raw = self._generate(short_chats)
        short = [clean_persona(text) for text in short_raw]
        mergeable = [
            i for i, text in enumerate(short) if degenerate_reason(text, min_words=0) not in FAILED_REASONS
        ]
        merge_chats = [
            self.prompts.render(
                "hiermerge_merge", item_type=inputs[i].item_type,
                long_term_persona=inputs[i].persona, short_term_persona=short[i],
            )
            for i in mergeable
        ]
        merged = dict(zip(mergeable, self._generate(merge_chats)))
        results = []
        for i, item in enumerate(inputs):
            if i not in merged:
                results.append(UpdateResult(persona=item.persona, failure="empty", generated=(short_raw[i],)))
            else:
                results.append(finish(item.persona, merged[i], generated=(short_raw[i], merged[i])))
        return results
