"""The event contract: what is accepted, and the exact reason for what is not."""

from __future__ import annotations

import orjson
import pytest

from cartwise.contract import (
    MAX_EVENT_BYTES,
    MAX_FUTURE_S,
    ContractError,
    event_to_dict,
    parse_catalog,
    parse_event,
    prepare_catalog,
    prepare_event,
    validate_event,
)

TS = 1_700_000_000.0


def ev(**fields):
    base = {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1", "ts": TS}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("etype", ["view", "add_to_cart", "remove_from_cart", "purchase"])
def test_single_item_events_of_every_type_are_accepted(etype):
    e = validate_event(ev(type=etype, quantity=2, price=9.5, session_id="s", category="c"))
    assert e.type == etype and e.lines[0].item_id == "i1" and e.lines[0].quantity == 2
    assert e.lines[0].price == 9.5 and e.session_id == "s" and e.category == "c"


def test_order_lines_and_iso_timestamps():
    e = validate_event(ev(type="purchase", item_id=None, order_id="o1", ts="2023-11-14T22:13:20Z",
                          items=[{"item_id": "a", "quantity": 2, "price": 3},
                                 {"item_id": "b"}]))
    assert [(ln.item_id, ln.quantity, ln.price) for ln in e.lines] == [("a", 2, 3.0),
                                                                        ("b", 1, None)]
    assert e.ts == TS and e.order_id == "o1"


def test_canonical_form_round_trips():
    for raw in (ev(), ev(type="purchase", item_id=None, items=[{"item_id": "a", "price": 1},
                                                               {"item_id": "b", "price": 2}])):
        e = validate_event(raw)
        assert validate_event(event_to_dict(e)) == e


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (b"{nope", "bad_json", None),
        (b"[1]", "not_an_object", None),
        (b"x" * (MAX_EVENT_BYTES + 1), "oversized", None),
        (orjson.dumps(ev(type="teleport")), "unknown_type", "type"),
        (orjson.dumps(ev(type="click")), "missing_field", "request_id"),
        (orjson.dumps(ev(type="impression", item_id=None, request_id="r")), "missing_field",
         "items"),
        (orjson.dumps(ev(type="impression", item_id=None, request_id="r",
                         items=[{"item_id": str(n)} for n in range(51)])), "too_many_lines",
         "items"),
        (orjson.dumps(ev(type="click", request_id="r", experiment_id="x")), "missing_field",
         "variant"),
        (orjson.dumps(ev(request_id="r")), "bad_value", "request_id"),
        (orjson.dumps(ev(type=None)), "missing_field", "type"),
        (orjson.dumps(ev(user_id=None)), "missing_field", "user_id"),
        (orjson.dumps(ev(event_id=None)), "missing_field", "event_id"),
        (orjson.dumps(ev(item_id=None)), "missing_field", "item_id"),
        (orjson.dumps(ev(ts=None)), "missing_field", "ts"),
        (orjson.dumps(ev(user_id=["u"])), "wrong_type", "user_id"),
        (orjson.dumps(ev(user_id="")), "bad_value", "user_id"),
        (orjson.dumps(ev(item_id="x" * 129)), "bad_value", "item_id"),
        (orjson.dumps(ev(price=-1)), "negative_price", "price"),
        (orjson.dumps(ev(price="3")), "wrong_type", "price"),
        (orjson.dumps(ev(quantity=0)), "bad_quantity", "quantity"),
        (orjson.dumps(ev(quantity=1.5)), "wrong_type", "quantity"),
        (orjson.dumps(ev(ts=TS * 1000)), "bad_timestamp", "ts"),
        (orjson.dumps(ev(ts="yesterday")), "bad_timestamp", "ts"),
        (orjson.dumps(ev(ts=True)), "wrong_type", "ts"),
        (orjson.dumps(ev(v=2)), "unsupported_version", "v"),
        (orjson.dumps(ev(type="view", items=[{"item_id": "a"}], item_id=None)), "bad_value",
         "items"),
        (orjson.dumps(ev(type="purchase", items=[], item_id=None)), "wrong_type", "items"),
        (orjson.dumps(ev(type="purchase", items=[{"item_id": "a", "price": -2}], item_id=None)),
         "negative_price", "items[0].price"),
        (orjson.dumps(ev(type="purchase", items=[{"price": 2}], item_id=None)),
         "missing_field", "items[0].item_id"),
        (orjson.dumps(ev(type="purchase", items=[{"item_id": "a"}] * 201, item_id=None)),
         "too_many_lines", "items"),
        (orjson.dumps(ev(category=5)), "wrong_type", "category"),
    ],
)
def test_invalid_events_name_the_reason_and_the_field(raw, reason, field):
    with pytest.raises(ContractError) as info:
        parse_event(raw)
    assert info.value.reason == reason
    assert info.value.field == field
    assert info.value.as_dict()["reason"] == reason


def test_catalog_records():
    item = parse_catalog(b'{"item_id": "i", "price": 10, "in_stock": false, "consumable": true}')
    assert (item.price, item.in_stock, item.consumable, item.category) == (10.0, False, True, None)
    with pytest.raises(ContractError) as info:
        parse_catalog(b'{"item_id": "i", "in_stock": "no"}')
    assert (info.value.reason, info.value.field) == ("wrong_type", "in_stock")
    # Not set and null both mean "the shop does not say": the shoppers' repurchases decide.
    assert parse_catalog(b'{"item_id": "i"}').consumable is None
    assert parse_catalog(b'{"item_id": "i", "consumable": null}').consumable is None
    assert parse_catalog(b'{"item_id": "i", "consumable": false}').consumable is False
    with pytest.raises(ContractError) as info:
        parse_catalog(b'{"item_id": "i", "consumable": "yes"}')
    assert (info.value.reason, info.value.field) == ("wrong_type", "consumable")
    assert "null" in str(info.value)
    with pytest.raises(ContractError) as info:
        parse_catalog(b'{"item_id": "i", "in_stock": null}')
    assert (info.value.reason, info.value.field) == ("wrong_type", "in_stock")
    with pytest.raises(ContractError) as info:
        parse_catalog(b'{"item_id": "i", "price": -5}')
    assert info.value.reason == "negative_price"


def test_prepare_fills_defaults_and_rejects_the_far_future():
    valid, raw = prepare_event({"type": "view", "user_id": "u", "item_id": "i"}, now=TS)
    assert valid.ts == TS and len(valid.event_id) == 32
    assert orjson.loads(raw) == event_to_dict(valid)
    prepare_event(ev(ts=TS + MAX_FUTURE_S), now=TS)  # within the allowed clock drift
    with pytest.raises(ContractError) as info:
        prepare_event(ev(ts=TS + MAX_FUTURE_S + 1), now=TS)
    assert (info.value.reason, info.value.field) == ("future_timestamp", "ts")
    with pytest.raises(ContractError) as info:
        prepare_event(["not", "an", "object"], now=TS)  # type: ignore[arg-type]
    assert info.value.reason == "not_an_object"


def test_catalog_names_are_bounded_text():
    item, raw = prepare_catalog({"item_id": "i", "name": "Blue mug"})
    assert item.name == "Blue mug" and orjson.loads(raw)["name"] == "Blue mug"
    with pytest.raises(ContractError) as info:
        prepare_catalog({"item_id": "i", "name": "x" * 201})
    assert (info.value.reason, info.value.field) == ("bad_value", "name")
