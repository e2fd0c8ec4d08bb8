"""The shopper profile document that segments and audiences read (docs/redis.md)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from models.context import ShopperContext
from models.interests import preferences
from streams.store import Keys


def order_mark(ctx: ShopperContext) -> tuple:
    return (len(ctx.orders), ctx.orders[-1][0] if ctx.orders else None)


def profile_doc(user: str, ctx: ShopperContext, interest: dict[str, Any] | None) -> dict[str, Any]:
    """What segments and audiences are computed from (docs/redis.md, cw:profile)."""
    return {
        "user_id": user,
        "orders": ctx.orders,
        "bought": list(ctx.bought),
        "interest": interest,
        "as_of": ctx.last_ts,
        "generated_at": time.time(),
    }


class Profiles:
    """Shoppers' interest clusters and profile documents, queued with their lists."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def queue(self, st: Any, user: str, ctx: ShopperContext, catalog: dict,
                 docs: dict[str, bytes], profiled: dict[str, tuple]) -> None:
        """Learn the shopper's interest and queue their profile, when either changed.

        The clustering learns a shopper again only when their category shares moved: most
        events are another view in the same categories, and k-means is the costly part.
        """
        prefs = preferences(((i, t.w) for i, t in ctx.items.items()), catalog)
        shape = hash(tuple(sorted((c, round(v, 2)) for c, v in prefs.items())))
        before = st.profiled.get(user)
        if before is not None and before[1] == shape:
            interest = before[2]
        else:
            interest = st.clusters.learn(prefs)
            st.clusters_dirty = st.clusters_dirty or interest is not None
        mark = (order_mark(ctx), shape, interest)
        if (ctx.orders or interest) and before != mark:
            docs[self.keys.profile(user)] = orjson.dumps(profile_doc(user, ctx, interest))
            profiled[user] = mark
