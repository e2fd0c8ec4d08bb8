"""Suggestion feedback in the context stage: impressions and clicks attributed to what was
served, labelled once their window has passed, the examples the re-ranker learns from
(docs/experiments.md). State lives in the shoppers' contexts and the partition's heap."""

from __future__ import annotations

import heapq
from typing import Any

import orjson

from cartwise.contract import Event
from models.context import ContextBook
from models.feedback import Attribution, Delta, Example, FeedbackConfig
from streams.store import Store


class Feedback:
    def __init__(self, store: Store, settings: Any) -> None:
        self.store = store
        self.attribution = Attribution(FeedbackConfig(settings.attribution_window_s,
                                                      settings.feedback_label_s))

    def pending(self, book: ContextBook) -> list[tuple[float, str]]:
        """The settle heap of a loaded partition: when each shopper's impressions are due."""
        heap = []
        for user, ctx in book.users.items():
            if ctx.feedback and (at := self.attribution.next_settle(ctx.feedback)) is not None:
                heap.append((at, user))
        heapq.heapify(heap)
        return heap

    async def served_docs(self, events: list[Event]) -> dict[str, Any]:
        """What the API served for the impressions of a batch: one MGET."""
        rids = list({e.request_id for e in events if e.type == "impression" and e.request_id})
        if not rids:
            return {}
        raws = await self.store.mget([self.store.keys.served(r) for r in rids])
        return {r: orjson.loads(raw) for r, raw in zip(rids, raws, strict=True) if raw}

    def attribute(self, st: Any, event: Event, served: dict[str, Any],
                 deltas: list[Delta]) -> None:
        """Attribute one impression or click (after the context learned it: it is new)."""
        ctx = st.book.users[event.user_id]
        fb = ctx.feedback
        if event.type == "impression":
            doc = served.get(event.request_id or "")
            if doc is not None and doc.get("u") not in (None, event.user_id):
                doc = None  # another shopper's answer: its features are not about this one
            st.counts["feedback.impressions"] += 1
            if doc is None:
                st.counts["feedback.unserved"] += 1
            deltas += self.attribution.impression(fb, event, doc, bool(ctx.orders))
            at = self.attribution.next_settle(fb)
            if at is not None:
                heapq.heappush(st.settle_heap, (at, event.user_id))
        else:
            st.counts["feedback.clicks"] += 1
            deltas += self.attribution.click(fb, event)

    def settle(self, st: Any, now: float, examples: list[Example]) -> None:
        """Label the impressions whose window has passed by event time `now`."""
        heap = st.settle_heap
        while heap and heap[0][0] <= now:
            _, user = heapq.heappop(heap)
            ctx = st.book.users.get(user)
            if ctx is None or not ctx.feedback:
                continue
            examples += self.attribution.settle(ctx.feedback, now)
            st.book.dirty.add(user)
            at = self.attribution.next_settle(ctx.feedback)
            if at is not None:
                heapq.heappush(heap, (at, user))
