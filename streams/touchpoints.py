"""Touchpoints as they leave the system (docs/replenishment.md): ids and messages."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

TOUCHPOINTS_PER_TICK = 500  # per partition: bounds one tick's work after downtime


def touchpoint_member(user: str, item: str, kind: str, bought_at: float) -> bytes:
    return orjson.dumps([user, item, kind, bought_at])


def touchpoint_message(member: bytes, at: float, lead_s: float) -> dict[str, Any]:
    """A touchpoint as sent to the touchpoints topic (docs/events.md, contract v1)."""
    user, item, kind, bought_at = orjson.loads(member)
    msg: dict[str, Any] = {
        "v": 1,
        "touchpoint_id": hashlib.sha1(member + repr(at).encode()).hexdigest()[:20],
        "kind": kind,
        "user_id": user,
        "item_id": item,
        "at": at,
        "bought_at": bought_at,
    }
    if kind == "replenish":
        msg["expected_run_out"] = at + lead_s
        msg["reason"] = f"about to run out of {item}"
    else:
        msg["reason"] = f"{kind.replace('_', ' ')} after buying {item}"
    return msg
