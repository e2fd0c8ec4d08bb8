"""The shopper profile document that segments and audiences read (docs/redis.md)."""

from __future__ import annotations

import time
from typing import Any

from models.context import ShopperContext


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
