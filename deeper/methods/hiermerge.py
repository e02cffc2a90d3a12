"""HierMerge baseline (persona extension, Appendix A.3): two calls per update.

1. A short-term persona from the latest window's ratings (template hiermerge_short).
2. The old (long-term) persona and the short-term one merged into the new persona (hiermerge_merge).
Both calls are batched over all users. A user whose short-term persona came back empty gets no merge call
and keeps the old persona (failure "empty").
"""

from __future__ import annotations

from collections.abc import Sequence

from deeper.llm.base import Chat
from deeper.methods.base import FAILED_REASONS, UpdateInput, UpdateMethod, UpdateResult, finish
from deeper.personas import clean_persona, degenerate_reason


class HierMerge(UpdateMethod):
    name = "hiermerge"

    def short_chat(self, item: UpdateInput) -> Chat:
        return self.prompts.render("hiermerge_short", item_type=item.item_type, ratings=item.current.pairs())

    def merge_chat(self, item: UpdateInput, short_term_persona: str) -> Chat:
        return self.prompts.render(
            "hiermerge_merge",
            item_type=item.item_type,
            long_term_persona=item.persona,
            short_term_persona=short_term_persona,
        )

    def planned_chats(self, item: UpdateInput) -> list[Chat]:
        return [self.short_chat(item), self.merge_chat(item, item.persona)]

    def update(self, inputs: Sequence[UpdateInput]) -> list[UpdateResult]:
        short_raw = self._generate([self.short_chat(item) for item in inputs])
        short = [clean_persona(text) for text in short_raw]
        mergeable = [
            i for i, text in enumerate(short) if degenerate_reason(text, min_words=0) not in FAILED_REASONS
        ]
        merged = dict(
            zip(mergeable, self._generate([self.merge_chat(inputs[i], short[i]) for i in mergeable]))
        )
        results = []
        for i, item in enumerate(inputs):
            if i not in merged:
                results.append(UpdateResult(persona=item.persona, failure="empty", generated=(short_raw[i],)))
            else:
                results.append(finish(item.persona, merged[i], generated=(short_raw[i], merged[i])))
        return results
