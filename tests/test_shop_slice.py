"""The demo shop: the shipped slice of UCI Online Retail and its replay as live traffic."""

from __future__ import annotations

import doctest
import time
from collections import Counter

import pytest

import bench.make_shop_slice as maker
import cartwise.shop_slice
from cartwise import datasets
from cartwise.contract import (
    SHOP_TYPES,
    ContractError,
    parse_event,
    validate_catalog,
    validate_event,
)
from cartwise.harness import produce, snapshot, wait_complete
from cartwise.shop_slice import DATA, ReplayTraffic, ShopSlice, co_bought, load_slice
from models import CrossSellRecommender
from streams.topics import ensure_topics

START = 1_750_000_000.0
CATEGORIES = {name for name, _ in maker.CATEGORY_KEYWORDS} | {maker.FALLBACK_CATEGORY}


@pytest.fixture(scope="module")
def shop() -> ShopSlice:
    return ShopSlice()


def by_name(shop: ShopSlice, name: str) -> str:
    return next(p.item_id for p in shop.products if p.name == name)


def test_the_slice_is_small_and_has_a_notice():
    assert (DATA / "NOTICE").read_text().count("CC BY 4.0") >= 1
    size = sum(f.stat().st_size for f in DATA.iterdir())
    assert size < 1_000_000, f"the slice is {size} bytes; it must stay under 1 MB"


def test_every_product_reads_like_a_shop(shop):
    products, invoices = load_slice()
    assert 200 <= len(products) <= 400
    assert 2_000 <= len(invoices) <= 5_000
    for p in products:
        assert p.name and p.name != p.name.upper(), p  # title case, not the log's capitals
        assert p.category in CATEGORIES, p
        assert p.price > 0, p
    assert Counter(p.category for p in products)[maker.FALLBACK_CATEGORY] < len(products) / 10
    for record in shop.catalog:
        validate_catalog(record)
    assert {p.item_id for p in products} >= {i for inv in invoices for i, _, _ in inv.lines}


def test_names_and_categories_from_descriptions():
    assert maker.display_name("RED RETROSPOT CAKE STAND ") == "Red Retrospot Cake Stand"
    assert maker.display_name("SET OF4 ASSTD  GIN + TONIC") == "Set of 4 Assorted Gin + Tonic"
    assert maker.display_name("CHRISTMAS LED LIGHTS") == "Christmas LED Lights"
    assert maker.category_of("CHRISTMAS HANGING STAR WITH BELL") == "Christmas"
    assert maker.category_of("SET/20 RED RETROSPOT PAPER NAPKINS") == "Kitchen"
    assert maker.category_of("BAGUETTE") == maker.FALLBACK_CATEGORY  # whole words only
    assert doctest.testmod(maker).failed == 0
    assert doctest.testmod(cartwise.shop_slice).failed == 0


def test_events_keep_the_contract_and_the_invoices(shop):
    events = list(shop.events(200, start_ts=START))
    assert all(isinstance(e, dict) for e in events)
    valid = [validate_event(e) for e in events]
    assert {e.type for e in valid} <= set(SHOP_TYPES)
    purchases = [e for e in valid if e.type == "purchase"]
    assert len(purchases) == 200
    for inv, bought in zip(shop.invoices, purchases, strict=False):
        assert bought.user_id == f"c{inv.customer}"
        assert [(ln.item_id, ln.quantity, ln.price) for ln in bought.lines] == list(inv.lines)
    carted = [e for e in valid if e.type == "add_to_cart"]
    assert len(carted) == sum(len(inv.lines) for inv in shop.invoices[:200])
    times = [e.ts for e in valid]
    assert times == sorted(times) and times[0] >= START
    log_span = shop.invoices[199].ts - shop.invoices[0].ts
    assert times[-1] - START <= log_span / shop.speedup + 1  # compressed to `speedup`


def test_replay_is_deterministic_and_the_seed_matters(shop):
    first = list(shop.events(300, start_ts=START))
    assert first == list(ShopSlice().events(300, start_ts=START))
    other = ShopSlice(seed=8)
    assert first != list(other.events(300, start_ts=START))
    assert shop.catalog != other.catalog  # other products out of stock
    assert 0 < sum(not c["in_stock"] for c in shop.catalog) < len(shop.catalog) / 10


def test_looping_gives_fresh_ids_and_time_moves_on(shop):
    n = len(shop.invoices)
    events = list(shop.events(2 * n + 10, start_ts=START, mean_gap_s=0.5))
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids))
    orders = [e["order_id"] for e in events if e["type"] == "purchase"]
    assert len(orders) == 2 * n + 10 == len(set(orders))
    assert len({e["session_id"] for e in events}) == 2 * n + 10
    assert [e["ts"] for e in events[:3]] == [START, START + 0.5, START + 1.0]
    purchases = [e for e in events if e["type"] == "purchase"]
    assert purchases[n]["items"] == purchases[0]["items"]  # round 2 replays the same baskets
    assert purchases[n]["user_id"] == purchases[0]["user_id"]  # by the same, returning shopper


def test_noise_is_invalid_records_and_exact_duplicates(shop):
    events = list(shop.events(100, start_ts=START, bad_rate=0.05, dup_rate=0.05))
    bad = [e for e in events if isinstance(e, bytes)]
    assert bad
    for raw in bad:
        with pytest.raises(ContractError):
            parse_event(raw)
    ids = Counter(e["event_id"] for e in events if isinstance(e, dict))
    assert 0 < sum(n > 1 for n in ids.values())


def test_top_products_have_complements_bought_together(shop):
    items, pairs = co_bought(shop.invoices)
    category = {p.item_id: p.category for p in shop.products}
    top = [i for i, _ in items.most_common(10)]
    for item in top:
        partners = {b if a == item else a for (a, b), n in pairs.items()
                    if item in (a, b) and n >= 3 and category[a] != category[b]}
        assert len(partners) >= 5, (item, len(partners))
    # What the demo's responding shoppers visit: heroes with complements of other categories.
    assert len(shop.complements) >= 20
    for hero, comps in shop.complements.items():
        assert hero in shop.prices and comps
        assert all(category[c] != category[hero] for c in comps)
    cakestand = by_name(shop, "Regency Cakestand 3 Tier")
    assert any("Teacup" in p.name for p in shop.products if p.item_id in
               shop.complements[cakestand][:3])


def test_the_library_learns_believable_complements(shop):
    """Carting a cakestand: the model's cross-sell, from the first 300 invoices, is mostly the
    Regency tea set (teacups, sugar bowl, cake tins): product names make it checkable."""
    rec = CrossSellRecommender()
    for record in shop.catalog:
        rec.learn_catalog(record)
    for ev in shop.events(300, start_ts=START):
        rec.learn_one(ev)
    rec.settle()
    names = {p.item_id: p.name for p in shop.products}
    got = [names[s["item_id"]] for s in rec.related(by_name(shop, "Regency Cakestand 3 Tier"),
                                                    k=5)]
    assert sum("Regency" in n for n in got) >= 3, got


def test_replayed_through_the_stream(make_settings, workers, shop):
    """The slice through the real broker and worker: the cakestand's stored list names the
    products carted with it."""
    settings = make_settings("slice")
    ensure_topics(settings)
    events = list(shop.events(150, start_ts=START, bad_rate=0.01, dup_rate=0.01))
    ends = produce(settings, events, shop.catalog)
    w = workers(settings)
    wait_complete(settings, ends, timeout=300, procs=[w])
    items = snapshot(settings)["items"]
    cakestand = by_name(shop, "Regency Cakestand 3 Tier")
    doc = items.get(f"item:{cakestand}")
    assert doc is not None and doc["cross_sell"], "no cross-sell list for the cakestand"
    bought_with = Counter(j for inv in shop.invoices[:150]
                          if cakestand in {i for i, _, _ in inv.lines}
                          for j, _, _ in inv.lines if j != cakestand)
    listed = [s["item_id"] for s in doc["cross_sell"]]
    assert len(set(listed[:5]) & {j for j, _ in bought_with.most_common(10)}) >= 3, listed


@pytest.mark.skipif(not (datasets.data_dir() / maker.SOURCE).exists(),
                    reason="the shared Online Retail log is not here (CARTWISE_DATA_DIR)")
def test_the_script_regenerates_the_shipped_slice(tmp_path):
    assert maker.main(["--out", str(tmp_path)]) == 0
    for name in ("products.csv", "invoices.csv.gz"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_a_missing_slice_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_shop_slice"):
        load_slice(tmp_path)


def test_pairs_are_counted_once_per_invoice():
    """co_bought by hand: two invoices, one repeating a product."""
    inv = cartwise.shop_slice.Invoice
    items, pairs = co_bought([inv("1", "c", 0.0, (("a", 1, 1.0), ("b", 1, 1.0), ("a", 2, 1.0))),
                              inv("2", "c", 1.0, (("b", 1, 1.0), ("c", 1, 1.0)))])
    assert items == Counter({"b": 2, "a": 1, "c": 1})
    assert pairs == Counter({("a", "b"): 1, ("b", "c"): 1})


class Recorder:
    """Stands in for the Kafka producer: keeps what the demo's loop sends, stops it at 300."""

    def __init__(self, stop: list[bool]) -> None:
        self.stop, self.sent, self.raw = stop, [], []

    def send(self, ev: dict) -> None:
        self.sent.append(ev)
        self.stop[0] = len(self.sent) >= 300

    def send_raw(self, raw: bytes) -> None:
        self.raw.append(raw)

    def flush(self) -> None:
        pass


def test_the_demo_traffic_source_sends_the_replay_now():
    source = ReplayTraffic(rate=100_000.0)
    assert "UCI Online Retail" in source.describe()
    heroes, prices = source.showcase()
    assert heroes and all(h in prices for h in heroes)
    assert source.catalog() == source.shop.catalog
    stop = [False]
    rec = Recorder(stop)
    before = time.time()
    assert source.run(rec, stop) >= 300
    sent = list(dict.fromkeys(e["event_id"] for e in rec.sent))  # less the duplicates
    assert sent == [e["event_id"] for e in source.shop.events(len(sent), start_ts=START)][
        : len(sent)]
    assert all(before <= e["ts"] <= time.time() for e in rec.sent)  # event time = now
