"""Suggestion answers: one Redis read, the live catalog, the merchant's rules, the shopper's
experiment variant and the re-ranker (docs/api.md). Shared by the routes and the fast path.

Reads never score anything: the workers keep ready lists in Redis and models/serving.py only
selects, filters by the live catalog and fills short answers with trending items.

Reasons are worded here, at read time, from each entry's kind, anchor and evidence and the
catalog's names (models/wording.py): the workers know no product names.

What a read writes is bounded (docs/api.md, "Limits"): served records (the re-ranker's
features of an answer) at most `served_rate` a second per process. The frequency cap's counts
are written by the workers from impression events (what shoppers saw, not what was asked),
and only read here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from api.auth import TokenBucket
from api.metrics import ApiMetrics
from api.services.catalog import CatalogCache
from api.services.config import ConfigService
from cartwise.contract import expected_partition
from cartwise.redisconn import AsyncClient
from cartwise.settings import Settings
from models import serving, wording
from models.cart import complete_cart, rank_for_cart
from models.config import ModelConfig
from models.feedback import features, rerank
from models.rules import LadderStep, Rules, dropped, ladder, order_by_price, shortfall, utc_day
from models.rules import apply as apply_rules
from models.segments import rfm
from streams.store import Keys, Store

log = logging.getLogger("cartwise.api")
CONFIG = ModelConfig()  # the model settings the workers run with (their defaults)


class Answers:
    """Builds suggestion bodies (without request_id; the caller adds it)."""

    def __init__(self, settings: Settings, redis: AsyncClient, store: Store,
                 config: ConfigService, catalog: CatalogCache, metrics: ApiMetrics) -> None:
        self.settings, self.redis, self.store = settings, redis, store
        self.keys: Keys = store.keys
        self.config, self.catalog, self.metrics = config, catalog, metrics
        self.segments = settings.segments  # validated here: bad thresholds stop the start
        rate = settings.served_rate
        self._served_budget = TokenBucket(rate, max(1.0, rate)) if rate > 0 else None
        self._background: set[asyncio.Task] = set()  # served documents being written

    # -- policies -------------------------------------------------------------------------

    def order(self, entries: list[dict], catalog: dict, anchor: dict | None, placement: str,
              existing: bool, evidence: dict[str, dict], reranked: bool
              ) -> tuple[list[dict], dict[str, list[float]]]:
        """Each entry's features, taken in the plain order; the re-ranker's order if asked."""
        top = max((e["score"] or 0.0 for e in entries), default=0.0)
        xs = [features(e, n, top, catalog.get(e["item_id"]), anchor, placement, existing,
                       evidence.get(e["item_id"])) for n, e in enumerate(entries)]
        by_item = {e["item_id"]: x for e, x in zip(entries, xs, strict=True)}
        if reranked and entries:
            r = self.config.reranker
            entries = rerank(entries, xs, r["weights"], r["intercept"])
        return entries, by_item

    def shopper_policy(self, user_id: str | None, raw: bytes | None, rules: Rules
                       ) -> tuple[LadderStep | None, float | None, dict[str, Any] | None]:
        """The price-ladder step, average order and a summary for this shopper (docs/rules.md).

        `raw` is their cw:profile document, read by the caller in the same round trip as the
        list. A shopper with no profile has 0 orders: a step starting at 0 applies, if any.
        """
        if not rules.needs_profile or user_id is None:
            return None, None, None
        orders = orjson.loads(raw)["orders"] if raw else []
        amounts = [a for _, a in orders if a is not None]
        average = sum(amounts) / len(amounts) if amounts else None
        quadrant = rfm(orders, time.time(), self.segments).quadrant
        step = rules.step(len(orders))
        return step, average, {
            "orders": len(orders), "quadrant": quadrant,
            "step": step.min_orders if step else None,
            "budget": quadrant in rules.budget_quadrants,
            "average_order": round(average, 2) if average is not None else None}

    async def fill(self, entries: list[dict], catalog: dict[str, dict | None], k: int,
                   exclude: set[str], categories: list[str | None],
                   first: Callable[[list, dict], list] | None = None,
                   price_cap: float | None = None, rules: Rules | None = None,
                   enabled: bool = True) -> tuple[list[dict], str | None]:
        """Top up a short answer from trending sets (category first, then shop-wide)."""
        if len(entries) >= k or not enabled:
            return entries, None
        sets, facts = await self.catalog.trending_sets(list(dict.fromkeys([*categories, None])))
        for i, f in facts.items():
            catalog.setdefault(i, f)
        if first is not None:
            sets = [(first(ranked, catalog), c) for ranked, c in sets if c is not None] + sets
        rules = self.config.rules if rules is None else rules
        if not rules.empty:
            sets = [([(i, sc) for i, sc in ranked if rules.permits(i, catalog.get(i))], c)
                    for ranked, c in sets]
        if price_cap is not None:
            sets = [([(i, sc) for i, sc in ranked
                      if ((catalog.get(i) or {}).get("price") or 0.0) <= price_cap], c)
                    for ranked, c in sets]
        entries, used = serving.fill(entries, sets, catalog, k, exclude)
        if used:
            self.metrics.fallback.labels(used.partition(":")[0]).inc()
        return entries, used

    # -- what reads write ---------------------------------------------------------------------

    def remember(self, rid: str, user_id: str | None, placement: str,
                 experiment: dict[str, str] | None, entries: list[dict],
                 xs: dict[str, list[float]], catalog: dict, anchor: dict | None,
                 existing: bool) -> None:
        """Keep what was served under `rid` for the workers (docs/experiments.md), off the
        request path. Entries added after ordering (pins, fillers) get features where they
        ended up. Over the per-process budget the answer goes out without a record."""
        ttl = self.settings.served_ttl_s
        if ttl <= 0 or not entries:
            return
        budget = self._served_budget
        if budget is not None and budget.take(time.monotonic()) > 0:
            self.metrics.served_skipped.inc()
            return
        top = max((e["score"] or 0.0 for e in entries), default=0.0)
        # Four decimals are plenty for the model and keep a record under 1.5 KB (docs/redis.md).
        doc = {"u": user_id, "p": placement,
               "e": experiment["id"] if experiment else None,
               "v": experiment["variant"] if experiment else None,
               "x": {e["item_id"]: [round(v, 4) for v in xs.get(e["item_id"]) or features(
                   e, n, top, catalog.get(e["item_id"]), anchor, placement, existing)]
                   for n, e in enumerate(entries)}}
        task = asyncio.create_task(self._remember(self.keys.served(rid), orjson.dumps(doc), ttl))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _remember(self, key: str, raw: bytes, ttl: float) -> None:
        try:
            await self.redis.set(key, raw, ex=max(1, int(ttl)))
        except Exception as exc:  # feedback for this answer is lost, the answer was not
            self.metrics.served_lost.inc()
            log.debug("served document not written: %r", exc)

    async def shown_today(self, user_id: str) -> dict[str, int]:
        """What this shopper saw today (UTC), item -> impressions: the workers count them
        with HINCRBYFLOAT (`Keys.shown`, beside their events partition's state), hence "2.0",
        not "2"."""
        partition = expected_partition(user_id, self.settings.partitions)
        got = await self.redis.hgetall(self.keys.shown(partition, user_id,
                                                       utc_day(time.time())))
        return {k.decode(): int(float(v)) for k, v in got.items()}

    async def with_anchors(self, entries: list[dict], catalog: dict) -> None:
        """Add the facts of the entries' anchors to `catalog`, in one read, so that reasons
        can name them; callers usually asked for them with the candidates already."""
        missing = [a for a in wording.anchors_of(entries) if a not in catalog]
        if missing:
            catalog.update(await self.catalog.facts(missing))

    @staticmethod
    def note(evidence: list[dict], entries: list[dict], fallback: str | None, rules: Rules,
             catalog: dict, held: set[str] | frozenset[str] = frozenset(),
             shown: dict[str, int] | None = None) -> dict[str, str] | None:
        """Why trending items filled this answer (models/rules.py `shortfall`): a rule, the
        stock or the cap that emptied the list says so; "no evidence" only when there was
        none. `evidence`: the evidence-based entries before stock and rules."""
        if fallback is None:
            return None
        served = {e["item_id"] for e in entries}
        kept = len(served & {e["item_id"] for e in evidence})
        return wording.note(shortfall(len(evidence), kept,
                              dropped(evidence, served, rules, catalog, held, shown)))

    # -- answers ------------------------------------------------------------------------------

    def body(self, entries: list[dict], catalog: dict, fallback: str | None,
             doc: dict | None, **extra: Any) -> dict[str, Any]:
        """The answer: entries worded and enriched; `catalog` holds their anchors' facts."""
        exp = extra.get("experiment")
        self.metrics.answers.labels(exp["id"] if exp else "", exp["variant"] if exp else "",
                                    extra.get("ranking") or "plain").inc()
        return {"items": wording.render_all(serving.enrich(entries, catalog), catalog),
                "fallback": fallback,
                "model": doc.get("model") if doc else None,
                "as_of": doc.get("as_of") if doc else None,
                "generated_at": doc.get("generated_at") if doc else None,
                "served_at": time.time(), **extra}

    async def item(self, item_id: str, kind: str, k: int,
                   user_id: str | None = None, rid: str | None = None) -> dict[str, Any]:
        experiment, strategy, rules, reranked = self.config.strategy(user_id)
        if user_id is not None and rules.needs_profile:  # one round trip (a node each)
            raw, profile = await self.store.mget([self.keys.item(item_id),
                                                  self.keys.profile(user_id)])
        else:
            raw, profile = await self.redis.get(self.keys.item(item_id)), None
        doc = orjson.loads(raw) if raw else None
        step, average, shopper = self.shopper_policy(user_id, profile, rules)
        if shopper and shopper["budget"] and kind == "upsell":
            kind = "cross_sell"  # a budget-limited shopper is offered complements instead
        source = "alternatives" if kind == "upsell" else kind
        listed = doc.get(source, []) if doc else []
        # Pins belong next to an item's complements; the other kinds answer other questions.
        pinned = rules.wanted([item_id], False) if kind == "cross_sell" else []
        room = k if rules.empty and not reranked else k + serving.HEADROOM
        wanted = ([e["item_id"] for e in listed] if kind == "upsell"
                  else serving.candidates(listed, room))
        catalog = await self.catalog.facts([item_id, *wanted, *pinned])
        anchor = catalog.get(item_id)
        if kind == "upsell":
            entries = serving.upsell(item_id, doc, anchor, catalog, room)
            evidence = entries
        else:
            entries = serving.in_stock(listed, catalog, room, {item_id})
            evidence = listed[: len(wanted)]
        existing = bool(shopper and shopper["orders"])
        entries, xs = self.order(entries, catalog, anchor, "product", existing,
                                 {e["item_id"]: e for e in listed}, reranked)
        if not rules.empty:
            entries = ladder(entries, step, catalog, average)
            entries = apply_rules(entries, rules, catalog, k,
                                  [item_id] if kind == "cross_sell" else [], {item_id})
            entries = order_by_price(entries, step, catalog)
        entries = entries[:k]
        category = (anchor or {}).get("category")
        first = ((lambda ranked, cat: serving.upsell_trending(ranked, anchor, cat))
                 if kind == "upsell" else None)
        cap = step.cap(average) if step else None
        entries, fallback = await self.fill(entries, catalog, k, {item_id}, [category], first,
                                            cap, rules, strategy.fill)
        if rid is not None:
            self.remember(rid, user_id, "product", experiment, entries, xs, catalog, anchor,
                          existing)
        extra = {"shopper": shopper} if shopper else {}
        await self.with_anchors(entries, catalog)
        return self.body(entries, catalog, fallback, doc, item_id=item_id, kind=kind,
                         experiment=experiment, ranking="reranker" if reranked else "plain",
                         note=self.note(evidence, entries, fallback, rules, catalog, {item_id}),
                         **extra)

    async def user(self, user_id: str, placement: str, k: int,
                   rid: str | None = None) -> dict[str, Any]:
        experiment, strategy, rules, reranked = self.config.strategy(user_id)
        if rules.needs_profile:  # one round trip (a node each)
            raw, profile = await self.store.mget([self.keys.user(user_id),
                                                  self.keys.profile(user_id)])
        else:
            raw, profile = await self.redis.get(self.keys.user(user_id)), None
        doc = orjson.loads(raw) if raw else None
        listed = serving.for_placement(doc.get("items", []) if doc else [], placement)
        step, average, shopper = self.shopper_policy(user_id, profile, rules)
        if shopper and shopper["budget"]:
            # Substitutes are where the dearer tiers are: complements instead (SPEC 1).
            listed = [e for e in listed if e.get("kind") != "alternatives"]
        ctx = (doc or {}).get("context") or {}
        recent = ctx.get("recent") or []
        in_cart = list(ctx.get("cart") or {})
        anchors = list(dict.fromkeys([*recent[:1], *reversed(in_cart)]))
        existing = bool(ctx.get("bought"))
        room = k if rules.empty and not reranked else k + serving.HEADROOM
        wanted = serving.candidates(listed, room)
        evidence = listed[: len(wanted)]
        # One read: the candidates, their anchors (named in the reasons), the cart's items
        # (whose categories tell complements from substitutes) and what the rules add.
        catalog = await self.catalog.facts(list(dict.fromkeys(
            [*wanted, *wording.anchors_of(evidence), *recent[:1],
             *(in_cart if placement == "cart" else ()), *rules.wanted(anchors, existing)])))
        anchor = catalog.get(recent[0]) if recent else None
        exclude = serving.user_exclusions(doc, catalog, placement)
        # The worker ranked `listed` from the context stored beside it (revisits included on
        # purpose); the exclusions are for the trending fillers and what the rules add.
        entries, xs = self.order(serving.in_stock(listed, catalog, room), catalog, anchor,
                                 placement, existing, {}, reranked)
        if placement == "cart":  # complements of the cart first, substitutes after them
            entries = complete_cart(entries, in_cart, catalog)
        # The cap counts impressions (written by the workers); a shopper the workers do not
        # know has no list to cap.
        capped = bool(rules.frequency_cap) and doc is not None
        shown: dict[str, int] = {}
        if not rules.empty:
            shown = await self.shown_today(user_id) if capped else {}
            entries = ladder(entries, step, catalog, average)
            entries = apply_rules(entries, rules, catalog, k, anchors, held=exclude,
                                  existing_customer=existing, shown=shown)
            entries = order_by_price(entries, step, catalog)
            exclude = exclude | {i for i, n in shown.items() if n >= rules.frequency_cap}
        entries = entries[:k]
        categories = [(catalog.get(recent[0]) or {}).get("category")] if recent else []
        cap = step.cap(average) if step else None
        entries, fallback = await self.fill(entries, catalog, k, exclude, categories,
                                            price_cap=cap, rules=rules, enabled=strategy.fill)
        if rid is not None:
            self.remember(rid, user_id, placement, experiment, entries, xs, catalog, anchor,
                          existing)
        extra = {"shopper": shopper} if shopper else {}
        await self.with_anchors(entries, catalog)
        # The model's list may revisit held items on purpose: no "held" cause for it.
        return self.body(entries, catalog, fallback, doc, user_id=user_id, placement=placement,
                         experiment=experiment, ranking="reranker" if reranked else "plain",
                         note=self.note(evidence, entries, fallback, rules, catalog,
                                        shown=shown),
                         **extra)

    async def cart(self, items: list[str], k: int, exclude: list[str], user_id: str | None,
                   rid: str) -> dict[str, Any]:
        """An anonymous cart, blended like a shopper who carted those items (rank_for_cart)."""
        cart = list(dict.fromkeys(items))
        lists = {i: d for i, d in (await self.store.item_lists(cart)).items() if d}
        wanted = {e["item_id"] for doc in lists.values() for kind in ("cross_sell", "next")
                  for e in doc.get(kind, ())[: CONFIG.per_anchor(kind)]}
        experiment, strategy, rules, reranked = self.config.strategy(user_id)
        anchors = list(reversed(cart))
        catalog = await self.catalog.facts(
            sorted(wanted | set(cart) | set(rules.wanted(anchors, False))))
        held = set(exclude) | set(cart)
        room = k if rules.empty and not reranked else k + serving.HEADROOM
        ranked = rank_for_cart(cart, lists, catalog, room, held | rules.block, CONFIG)
        # What the blend left out for the stock or a block: the note's causes, if it empties.
        listed = {e["item_id"] for e in ranked}
        evidence = ranked + [{"item_id": i} for i in sorted(wanted - held - listed)
                             if i in rules.block or (catalog.get(i) or {}).get("in_stock")
                             is False]
        anchor = catalog.get(cart[-1])
        ranked, xs = self.order(ranked, catalog, anchor, "cart", False, {}, reranked)
        if reranked:  # the re-ranker knows nothing of substitutes: complements first again
            ranked = complete_cart(ranked, cart, catalog, lists, CONFIG)
        entries = (ranked[:k] if rules.empty
                   else apply_rules(ranked, rules, catalog, k, anchors, held))
        categories = [(catalog.get(i) or {}).get("category") for i in reversed(cart)]
        entries, fallback = await self.fill(entries, catalog, k, held,
                                            [c for c in categories if c][:3],
                                            rules=rules, enabled=strategy.fill)
        self.remember(rid, user_id, "cart", experiment, entries, xs, catalog, anchor, False)
        newest = max(lists.values(), key=lambda d: d.get("generated_at") or 0, default=None)
        await self.with_anchors(entries, catalog)
        return self.body(entries, catalog, fallback, newest, experiment=experiment,
                         ranking="reranker" if reranked else "plain",
                         note=self.note(evidence, entries, fallback, rules, catalog, held))
