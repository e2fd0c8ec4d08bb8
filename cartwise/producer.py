"""Producer library for apps: validate, then send to Kafka (kafka-python + orjson).

    from cartwise.producer import EventProducer
    with EventProducer("kafka:9092") as p:
        p.view("u1", "sku-1", session_id="s1")
        p.purchase("u1", [{"item_id": "sku-1", "quantity": 1, "price": 19.9}], order_id="o1")

Invalid events raise `ContractError` here, before they leave the app; the worker checks again
(other producers exist) and dead-letters what still breaks the contract.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaProducer

from cartwise.contract import ContractError, prepare_catalog, prepare_event

__all__ = ["ContractError", "EventProducer"]


class EventProducer:
    def __init__(
        self,
        bootstrap_servers: str | list[str],
        events_topic: str = "cartwise.events",
        catalog_topic: str = "cartwise.catalog",
        **kafka_options: Any,
    ) -> None:
        if isinstance(bootstrap_servers, str):
            bootstrap_servers = [h.removeprefix("kafka://") for h in bootstrap_servers.split(",")]
        options = {"acks": "all", "linger_ms": 5, "retries": 5}
        options.update(kafka_options)
        self.events_topic = events_topic
        self.catalog_topic = catalog_topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap_servers, **options)

    def send(self, event: dict[str, Any]) -> Any:
        """Validate and send one event; returns kafka-python's future (`.get()` to wait).

        Missing `event_id` and `ts` are filled in (a uuid4 and now): pass your own event_id
        when you may retry, so a retried event is applied once.
        """
        valid, value = prepare_event(event, time.time())
        # Keyed by shopper: one shopper's events stay in order on one partition.
        return self._producer.send(self.events_topic, key=valid.user_id.encode(), value=value)

    def send_raw(self, value: bytes, key: bytes | None = None) -> Any:
        """Send bytes unchecked (for tools and tests that exercise the dead-letter path)."""
        return self._producer.send(self.events_topic, key=key, value=value)

    def _single(self, etype: str, user_id: str, item_id: str, **fields: Any) -> Any:
        return self.send({"type": etype, "user_id": user_id, "item_id": item_id, **fields})

    def view(self, user_id: str, item_id: str, **fields: Any) -> Any:
        return self._single("view", user_id, item_id, **fields)

    def add_to_cart(self, user_id: str, item_id: str, **fields: Any) -> Any:
        return self._single("add_to_cart", user_id, item_id, **fields)

    def remove_from_cart(self, user_id: str, item_id: str, **fields: Any) -> Any:
        return self._single("remove_from_cart", user_id, item_id, **fields)

    def purchase(self, user_id: str, items: list[dict[str, Any]], **fields: Any) -> Any:
        return self.send({"type": "purchase", "user_id": user_id, "items": items, **fields})

    def catalog(self, item: dict[str, Any]) -> Any:
        valid, value = prepare_catalog(item)
        return self._producer.send(self.catalog_topic, key=valid.item_id.encode(), value=value)

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout)

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
        self.close()
