"""The event contract: what is accepted, and the exact reason for what is not."""

from __future__ import annotations

import math
import random
import sys
import unicodedata

import orjson
import pytest

from cartwise.contract import (
    DLQ_HEADER_MAX,
    DLQ_MAX_BYTES,
    MAX_EVENT_BYTES,
    MAX_FUTURE_S,
    MAX_ID_LEN,
    MAX_ORDER_LINES,
    MAX_PRICE,
    MAX_QUANTITY,
    MAX_TEXT_LEN,
    ContractError,
    decode,
    dlq_headers,
    dlq_record,
    event_to_dict,
    expected_partition,
    parse_catalog,
    parse_event,
    prepare_catalog,
    prepare_event,
    validate_catalog,
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


def reject(fn, *args):
    """The ContractError `fn(*args)` raises (and nothing else may escape)."""
    with pytest.raises(ContractError) as info:
        fn(*args)
    return info.value


# --- decode: ContractError for anything a topic may hold ---------------------------------------


def test_a_tombstone_is_a_contract_error_not_a_crash():
    for fn in (decode, parse_event, parse_catalog):
        err = reject(fn, None)
        assert (err.reason, err.field) == ("tombstone", None)
        assert "no value" in err.detail


NESTED = b"[" * 5000 + b"]" * 5000  # deeper than the parser allows


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "bad_json"),
        ("", "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        (b'{"user_id": "\xc3"}', "bad_json"),  # cut inside a UTF-8 sequence
        ("\ud800", "bad_json"),  # a str no UTF-8 encoder accepts
        (b'{"user_id": "\\ud800"}', "bad_json"),  # an escaped lone surrogate
        (b"null", "not_an_object"),
        (b"42", "not_an_object"),
        (b'"text"', "not_an_object"),
        (b"true", "not_an_object"),
        (bytearray(b"[]"), "not_an_object"),
        (NESTED, "bad_json"),
        (b'{"a":' * 2000 + b"1" + b"}" * 2000, "bad_json"),
        (b"NaN", "bad_json"),
        (b'{"price": Infinity}', "bad_json"),
        (b'{"price": 1e999}', "bad_json"),
        (5, "bad_json"),
        ([b"{}"], "bad_json"),
        # the size limit is on bytes: 32769 two-byte characters are 64 KiB and more
        ('{"a": "' + "\u00e9" * (MAX_EVENT_BYTES // 2) + '"}', "oversized"),
    ],
)
def test_decode_raises_only_contract_errors(raw, reason):
    assert reject(decode, raw).reason == reason


def test_deeply_nested_values_are_wrong_types_not_recursion_errors():
    deep = orjson.loads(b"[" * 1000 + b"]" * 1000)  # what orjson still parses
    for field in ("type", "v", "user_id", "ts", "price", "category"):
        err = reject(validate_event, ev(**{field: deep}))
        assert (err.reason, err.field) == ("wrong_type", field)
    assert reject(validate_catalog, {"item_id": "i", "name": deep}).field == "name"


def test_validators_reject_non_objects():
    for fn in (validate_event, validate_catalog):
        for d in (None, [], "x", 3):
            assert reject(fn, d).reason == "not_an_object"


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        ({"price": 10**5000}, "bad_value", "price"),
        ({"price": -(10**5000)}, "negative_price", "price"),
        ({"ts": 10**400}, "bad_timestamp", "ts"),
        ({"ts": float("nan")}, "wrong_type", "ts"),
        ({"user_id": 10**5000}, "bad_value", "user_id"),
        ({"v": 10**5000}, "unsupported_version", "v"),
        ({"quantity": 10**400}, "bad_quantity", "quantity"),
        ({"user_id": "u\ud800"}, "bad_value", "user_id"),
        ({"category": "c\udfff"}, "bad_value", "category"),
    ],
)
def test_python_values_from_the_collector_raise_only_contract_errors(fields, reason, field):
    """prepare_event takes dicts, where ints have any size and strs may hold surrogates."""
    err = reject(prepare_event, ev(**fields), TS)
    assert (err.reason, err.field) == (reason, field)
    assert len(str(err)) < 500


def test_catalog_text_must_be_encodable():
    err = reject(prepare_catalog, {"item_id": "i", "brand": "b\ud800"})
    assert (err.reason, err.field) == ("bad_value", "brand")


# --- fuzz: garbled records built from valid ones -----------------------------------------------

VALID_RECORDS = [
    ev(session_id="s1", category="shoes", price=9.5, quantity=2),
    ev(type="purchase", item_id=None, order_id="o1", ts="2023-11-14T22:13:20Z",
       items=[{"item_id": "a", "quantity": 2, "price": 3}, {"item_id": "b"}]),
    ev(type="impression", item_id=None, request_id="r1", placement="cart",
       experiment_id="x", variant="a", items=[{"item_id": "a"}, {"item_id": "b"}]),
    ev(type="click", request_id="r1", experiment_id="x", variant="b", v=1),
    {"item_id": "i1", "price": 10, "category": "c", "tier": "t", "brand": "b", "name": "n",
     "in_stock": False, "consumable": None, "v": 1},
]
RAW_LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1e308", b"-0",
                b"18446744073709551615", b"-9223372036854775809", b"123456789012345678901234567890",
                b'"\\ud800"', b'"a\\u0000b"', b'"\\n"', b"[" * 1000 + b"]" * 1000,
                b"[" * 1100 + b"]" * 1100, b"{}", b"[]", b"null", b"true", b"false", b"",
                b'"2026-01-01T10:00:00"', b'"2026-01-01T10:00:00+02:00"', b'"0001-01-01T00:00Z"']
WEIRD_VALUES = [None, True, False, 0, -1, 1, 1.5, -1e308, 1e308, 1e155, 2**63, -(2**63), "",
                " x", "x\n", "\x00", "\x7f", "\x85", "..", "../x", "a/../b", "a/..", "x" * 129,
                "x" * 201, "x" * 70_000, "2026-01-01T10:00:00", "1700000000", [], {}, [1, 2],
                {"item_id": "a"}, [{"item_id": "a"}], [{"item_id": ["a"]}], [None], [[[]]],
                {"a": {"b": {"c": [1]}}}]


def garble(rng: random.Random, record: dict) -> bytes | None:
    d = dict(record)
    roll = rng.random()
    if roll < 0.02:
        return None
    if roll < 0.25:  # a field of the wrong type or value, also inside order lines
        target = d
        if "items" in d and rng.random() < 0.4:
            d["items"] = [dict(x) for x in d["items"]]
            target = rng.choice(d["items"])
            keys = list(target) + ["item_id", "quantity", "price"]
        else:
            keys = list(d) + ["v", "ts", "type", "items", "item_id", "request_id", "variant"]
        target[rng.choice(keys)] = rng.choice(WEIRD_VALUES)
        return orjson.dumps(d)
    if roll < 0.45:  # a raw JSON literal orjson would never write: NaN, huge numbers, depth
        field = rng.choice(list(d) + ["v", "quantity"])
        d[field] = "@@RAW@@"
        return orjson.dumps(d).replace(b'"@@RAW@@"', rng.choice(RAW_LITERALS))
    raw = bytearray(orjson.dumps(d))
    if roll < 0.55:
        del d[rng.choice(list(d))]
        return orjson.dumps(d)
    if roll < 0.7:
        return bytes(raw[: rng.randrange(len(raw) + 1)])
    if roll < 0.8:  # splice a piece of another record in
        other = orjson.dumps(rng.choice(VALID_RECORDS))
        i, j = rng.randrange(len(raw) + 1), rng.randrange(len(other) + 1)
        return bytes(raw[:i] + other[j:])
    for _ in range(rng.randint(1, 4)):  # flipped bytes
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return bytes(raw)


def test_fuzz_garbled_records_raise_only_contract_errors():
    rng = random.Random(20261122)
    outcomes: dict[str, int] = {}
    for n in range(4000):
        raw = garble(rng, rng.choice(VALID_RECORDS))
        for parse in (parse_event, parse_catalog):
            try:
                got = parse(raw)
            except ContractError as err:
                outcomes[err.reason] = outcomes.get(err.reason, 0) + 1
                assert len(str(err)) < 1000, (n, raw[:200])
                value, headers = dlq_record(raw, err.reason, err.field, err.detail, f"t/0/{n}")
                assert len(value) <= DLQ_MAX_BYTES and sum(map(len, headers.values())) < 4096
                continue
            except Exception as exc:  # the point of the test
                pytest.fail(f"record {n} {raw[:300]!r}: {parse.__name__} raised {exc!r}")
            outcomes["ok"] = outcomes.get("ok", 0) + 1
            if parse is parse_event:  # what passed can be sent again as is
                assert validate_event(orjson.loads(orjson.dumps(event_to_dict(got)))) == got
                assert all(ln.price is None or ln.price <= MAX_PRICE for ln in got.lines)
    # the mutations reach deep into validation, not only the JSON parser
    assert outcomes["ok"] > 100 and outcomes["bad_json"] > 100
    assert {"tombstone", "wrong_type", "bad_value", "bad_timestamp"} <= set(outcomes)


# --- ids ---------------------------------------------------------------------------------------

BAD_IDS = ["a\x00b", "a\nb", "\tab", "ab\r", "a\x7f", "a\x85b", "a\x1bb", "..", "../etc",
           "a/../b", "sku/..", " a", "a ", "\u3000a", "a\u00a0"]
GOOD_IDS = ["a b", "a..b", "...", "..a", "a..", ".", "a/b", "sku-1/blue", "a/.../b", "..\\x",
            "\u00fcn\u00efc\u00f6de", "x" * MAX_ID_LEN]
ID_FIELDS = ["event_id", "user_id", "item_id", "session_id", "order_id", "request_id",
             "placement", "experiment_id", "variant", "items[0].item_id", "catalog item_id"]


def with_id(field: str, value: object) -> tuple[object, dict, str]:
    """A valid record with `value` in `field`, its validator and the field an error names."""
    if field == "catalog item_id":
        return validate_catalog, {"item_id": value}, "item_id"
    if field == "items[0].item_id":
        return validate_event, ev(type="purchase", item_id=None,
                                  items=[{"item_id": value}]), field
    base = ev(type="click", request_id="r", experiment_id="x", variant="a")
    return validate_event, base | {field: value}, field


@pytest.mark.parametrize("field", ID_FIELDS)
def test_ids_reject_control_characters_paths_and_outer_whitespace(field):
    for bad in BAD_IDS:
        fn, d, label = with_id(field, bad)
        err = reject(fn, d)
        assert (err.reason, err.field) == ("bad_value", label), bad
        assert f"'{label}'" in err.detail
    for good in GOOD_IDS:
        fn, d, label = with_id(field, good)
        fn(d)


def test_every_control_character_is_rejected_and_nothing_else():
    controls = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cc"]
    assert len(controls) == 65
    for c in controls:
        err = reject(validate_event, ev(user_id=f"u{c}1"))
        assert "control character" in err.detail and f"U+{ord(c):04X}" in err.detail
    for c in map(chr, range(0x20, 0x3000)):  # alone as item_id: no whitespace categories
        if unicodedata.category(c) not in ("Cc", "Zs", "Zl", "Zp"):
            validate_event(ev(user_id=f"u{c}1", item_id=c))


def test_int_ids_become_strings_but_floats_and_bools_do_not():
    e = validate_event(ev(user_id=42, item_id=7, event_id=-3))
    assert (e.user_id, e.lines[0].item_id, e.event_id) == ("42", "7", "-3")
    for bad in (4.2, 1e3, True, float("nan")):
        assert reject(validate_event, ev(user_id=bad)).reason == "wrong_type"


# --- version, time zones, bounds ---------------------------------------------------------------


@pytest.mark.parametrize("v", [True, False, 1.0, "1", None, [1]])
def test_version_must_be_exactly_the_integer_1(v):
    for fn, d in ((validate_event, ev()), (validate_catalog, {"item_id": "i"})):
        err = reject(fn, d | {"v": v})
        assert (err.reason, err.field) == ("wrong_type", "v")
    validate_event(ev(v=1))
    assert reject(parse_event, b'{"v": true, "event_id": "e", "type": "view", "user_id": "u", '
                                b'"item_id": "i", "ts": 1700000000}').field == "v"


def test_iso_times_need_an_offset():
    for naive in ("2026-01-01T10:00:00", "2026-01-01 10:00:00", "2026-01-01", "2026-01-01T10:00"):
        err = reject(validate_event, ev(ts=naive))
        assert (err.reason, err.field) == ("bad_timestamp", "ts")
        assert "UTC offset or 'Z'" in err.detail
    for aware in ("2026-01-01T10:00:00Z", "2026-01-01T12:00:00+02:00", "2026-01-01T05:00:00-05:00",
                  "2026-01-01T10:00:00.000+00:00"):
        assert validate_event(ev(ts=aware)).ts == 1_767_261_600.0
    assert reject(validate_event, ev(ts="0001-01-01T00:00:00+01:00")).reason == "bad_timestamp"


def test_prices_are_bounded_so_revenue_sums_stay_finite():
    # the bound's promise: a whole order, squared, summed many times over, is still finite
    assert math.isfinite((MAX_ORDER_LINES * MAX_QUANTITY * MAX_PRICE) ** 2 * 1e200)
    assert validate_event(ev(price=MAX_PRICE)).lines[0].price == MAX_PRICE
    assert validate_event(ev(price=10**9)).lines[0].price == MAX_PRICE
    for price in (MAX_PRICE * (1 + 1e-15), 1e155, 10**30, 1.7e308):
        for fn, d, field in (
            (validate_event, ev(price=price), "price"),
            (validate_event, ev(type="purchase", item_id=None,
                                items=[{"item_id": "a"}, {"item_id": "b", "price": price}]),
             "items[1].price"),
            (validate_catalog, {"item_id": "i", "price": price}, "price"),
        ):
            err = reject(fn, d)
            assert (err.reason, err.field) == ("bad_value", field)
            assert "1000000000" in err.detail


def test_category_and_catalog_text_are_bounded_and_plain():
    assert validate_event(ev(category="c" * MAX_TEXT_LEN)).category == "c" * MAX_TEXT_LEN
    for bad in ("c" * (MAX_TEXT_LEN + 1), "a\nb", "a\tb", "\x00", "a\x9f"):
        err = reject(validate_event, ev(category=bad))
        assert (err.reason, err.field) == ("bad_value", "category")
        for field in ("category", "tier", "brand", "name"):
            err = reject(validate_catalog, {"item_id": "i", field: bad})
            assert (err.reason, err.field) == ("bad_value", field)
    assert validate_catalog({"item_id": "i", "name": " Blue mug "}).name == " Blue mug "


# --- dead letters ------------------------------------------------------------------------------


def test_dlq_copies_tombstones_as_empty_values_with_a_header():
    value, headers = dlq_record(None, "tombstone", None, "no value", "cartwise.events/0/7")
    assert value == b""
    assert headers == {"cartwise-reason": b"tombstone", "cartwise-field": b"",
                       "cartwise-detail": b"no value", "cartwise-source": b"cartwise.events/0/7",
                       "cartwise-tombstone": b"1"}


def test_dlq_copies_small_records_byte_for_byte_and_truncates_large_ones():
    raw = b'{"user_id": "\xff"}'
    value, headers = dlq_record(raw, "bad_json", None, "not UTF-8", "t/1/2")
    assert value == raw and set(headers) == {"cartwise-reason", "cartwise-field",
                                             "cartwise-detail", "cartwise-source"}
    exact = b"x" * DLQ_MAX_BYTES
    assert dlq_record(exact, "r", None, "", "s") == (exact, dlq_record(b"", "r", None, "", "s")[1])
    big = bytes(range(256)) * 4096  # 1 MiB
    value, headers = dlq_record(big, "oversized", None, "too big", "t/0/1")
    assert value == big[:DLQ_MAX_BYTES]
    assert headers["cartwise-truncated"] == b"1"
    assert headers["cartwise-original-bytes"] == str(len(big)).encode()
    value, headers = dlq_record(b"abcdef", "r", "f", "d", "s", max_bytes=4)
    assert value == b"abcd" and headers["cartwise-original-bytes"] == b"6"


def test_dlq_headers_stay_small_and_valid_utf8():
    long = "\u00e9" * 5000 + "\ud800"
    _, headers = dlq_record(b"x" * 10**6, long, long, long, long)
    assert sum(len(k) + len(v) for k, v in headers.items()) < 4096
    for name in ("cartwise-reason", "cartwise-field", "cartwise-detail", "cartwise-source"):
        assert len(headers[name]) <= DLQ_HEADER_MAX
        headers[name].decode("utf-8")  # cut on a character boundary


def test_dlq_headers_keeps_its_shape():
    err = reject(parse_event, orjson.dumps(ev(user_id=None)))
    assert dlq_headers(err, "api/r1/events[0]") == {
        "cartwise-reason": b"missing_field", "cartwise-field": b"user_id",
        "cartwise-detail": b"'user_id' is required", "cartwise-source": b"api/r1/events[0]"}
    assert dlq_headers(err, "s" * 2000)["cartwise-source"] == b"s" * DLQ_HEADER_MAX


# --- partitions --------------------------------------------------------------------------------


class OneTopicCluster:
    """The little of kafka-python's ClusterMetadata its DefaultPartitioner reads."""

    def __init__(self, partitions: int) -> None:
        self.partitions = set(range(partitions))

    def topics(self):
        return {"cartwise.events"}

    def partitions_for_topic(self, topic):
        return self.partitions

    def available_partitions_for_topic(self, topic):
        return self.partitions


def kafka_python_partition(key: bytes, partitions: int) -> int:
    from kafka.partitioner.default import DefaultPartitioner

    p = DefaultPartitioner()
    if hasattr(p, "partition"):  # kafka-python 2.1 and later
        return p.partition("cartwise.events", key, key, b"{}", b"{}",
                           OneTopicCluster(partitions))
    return p(key, list(range(partitions)), list(range(partitions)))


def test_expected_partition_matches_the_kafka_clients():
    aiokafka_partitioner = pytest.importorskip("aiokafka.partitioner").DefaultPartitioner()
    rng = random.Random(7)
    alphabet = "abcxyz0189-_:./@\u00e9\u00fc\u4e2d\U0001f600"
    for _ in range(400):
        user = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        n = rng.choice([1, 2, 3, 4, 7, 12, 16, 64, 100])
        want = kafka_python_partition(user.encode(), n)
        assert expected_partition(user, n) == want, (user, n)
        assert aiokafka_partitioner(user.encode(), list(range(n)), list(range(n))) == want
    assert expected_partition("u42", 1) == 0
    with pytest.raises(ValueError):
        expected_partition("u42", 0)
