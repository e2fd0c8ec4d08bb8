"""The demo storefront in headless Chromium: suggestions follow the cart, live; and what a
cart placement shows (complements before substitutes), through the stream and the API.

Debian's Chromium (installed by `make test`) driven by Playwright, against the API process of
the `served` fixture, with a real worker turning the page's events into suggestions.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from models.config import ModelConfig
from tests.test_api import hero_with_lists

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a root user on a machine without a network beyond loopback.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

LIST_STATE = """sel => [...document.querySelectorAll(sel + ' li')]
                  .map(li => li.dataset.item + ':' + li.dataset.kind)"""


def test_adding_to_cart_changes_the_suggestions_shown(served, tmp_path: Path):
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run `make test`"
    hero = hero_with_lists(served)
    category = next(c["category"] for c in served.shop.catalog if c["item_id"] == hero)
    # Every shopper in one arm, the default strategy: the lists are what they would be
    # without it, and the report shows what the page sent as feedback.
    watch = {"variants": [{"name": "all", "weight": 1}, {"name": "none", "weight": 1e-9}]}
    served.clear_experiments()
    assert served.put("/v1/experiments/demo-feedback", watch).status_code == 200
    time.sleep(1.0)
    try:
        shop_with_feedback(served, hero, category, tmp_path)
    finally:
        served.delete("/v1/experiments/demo-feedback")


def shop_with_feedback(served, hero: str, category: str, tmp_path: Path) -> None:
    stored = served.doc("item", hero)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(served.base + "/demo/")
            page.get_by_role("button", name=category, exact=True).click()
            page.locator(f".card[data-item='{hero}']").click()
            page.wait_for_selector("#item-suggestions li")

            # The product page shows the item's stored cross-sell list (in stock, in order).
            shown = page.evaluate(LIST_STATE, "#item-suggestions")
            in_stock = {c["item_id"] for c in served.shop.catalog if c["in_stock"]}
            want = [e["item_id"] for e in stored["cross_sell"] if e["item_id"] in in_stock][:4]
            assert [s.split(":")[0] for s in shown] == want

            # Once the view is processed, the shopper's own list is evidence-based.
            page.wait_for_function(
                """() => { const li = [...document.querySelectorAll('#user-suggestions li')];
                           return li.length > 0
                                  && li.every(e => e.dataset.kind !== 'trending'); }""",
                timeout=30_000)
            before = page.evaluate(LIST_STATE, "#user-suggestions")
            evidence = {e["item_id"] for kind in ("cross_sell", "next", "alternatives")
                        for e in stored.get(kind, [])}
            assert hero not in {s.split(":")[0] for s in before}
            assert before[0].split(":")[0] in evidence
            # Before a cart, "you may also need" is the "new for you" answer: nothing seen.
            kinds = page.eval_on_selector_all("#user-suggestions li",
                                              "ls => ls.map(l => l.dataset.kind)")
            assert set(kinds) <= {"cross_sell", "next", "alternatives"}, kinds

            # Adding the first suggestion to the cart changes the list within seconds: the
            # carted item leaves it and the list now answers the cart (complements only).
            pick = before[0].split(":")[0]
            page.locator(f"#user-suggestions li[data-item='{pick}'] button.add").click()
            page.wait_for_selector(f"#cart li[data-item='{pick}']")
            page.wait_for_function(
                """pick => { const li = [...document.querySelectorAll('#user-suggestions li')];
                             return li.length > 0 && li.every(e => e.dataset.item !== pick
                                    && ['cross_sell', 'next'].includes(e.dataset.kind)); }""",
                arg=pick, timeout=30_000)
            after = page.evaluate(LIST_STATE, "#user-suggestions")
            assert after != before
            assert not {s.split(":")[0] for s in after} & {hero, pick}
            doc = served.doc("user", page.evaluate("() => state.user"))
            assert pick in doc["context"]["cart"]

            # The page reported what it showed and the click on the carted suggestion; the
            # worker attributed the cart to it.
            def counted() -> dict:
                rep = served.get("/v1/experiments/demo-feedback/report", "admin").json()
                return {r["variant"]: r for r in rep["variants"]}["all"]

            # A bound on the wait, not a timing check: the feedback passes through the API, the
            # broker and the worker, and a full suite on two loaded cores once took over 30 s.
            deadline = time.monotonic() + 90
            while (row := counted())["conversions"] < 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert row["shoppers"] == 1 and row["impressions"] >= 2, row
            assert row["clicks"] >= 1, row
            assert row["conversions"] >= 1, row
            page.screenshot(path=str(tmp_path / "storefront.png"))
            assert not errors, errors
        finally:
            browser.close()


@pytest.fixture(autouse=True)
def _chromium_output(tmp_path: Path):
    yield
    for shot in sorted(tmp_path.glob("*.png")):
        print(f"screenshot: {shot}")


ALTERNATIVES_READ = ModelConfig().per_anchor("alternatives")
PHONE = {"width": 390, "height": 844}  # a phone-sized screen (CSS pixels)


def test_the_shop_page_fits_a_phone_and_sells_only_what_is_in_stock(served, tmp_path: Path):
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run `make test`"
    sold_out = next(c for c in served.shop.catalog if not c["in_stock"])
    stocked = next(c for c in served.shop.catalog
                   if c["in_stock"] and c["category"] == sold_out["category"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport=PHONE)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(served.base + "/demo/")
            page.get_by_role("button", name=sold_out["category"], exact=True).click()
            page.wait_for_selector(f".card[data-item='{sold_out['item_id']}']")
            # One column: nothing wider than the screen, the cart below the products.
            width = page.evaluate("() => document.documentElement.scrollWidth")
            assert width <= PHONE["width"], width
            main, cart = (page.locator(sel).bounding_box() for sel in ("main", "#cart-panel"))
            assert cart["y"] >= main["y"] + main["height"] - 1
            assert cart["width"] > PHONE["width"] * 0.9
            page.screenshot(path=str(tmp_path / "phone-catalog.png"))

            # The header is the shop's: no shopper ids, no event log.
            header = page.locator("header").inner_text()
            assert "demo-" not in header and "sent" not in header, header

            page.locator(f".card[data-item='{sold_out['item_id']}']").click()
            page.wait_for_selector("#product:not([hidden])")
            assert page.locator("#product-stock").inner_text() == "out of stock"
            assert not page.locator("#add-to-cart").is_visible()
            page.screenshot(path=str(tmp_path / "phone-sold-out.png"))

            page.locator("#home-link").click()
            page.locator(f".card[data-item='{stocked['item_id']}']").click()
            page.wait_for_selector("#add-to-cart:visible")
            page.locator("#add-to-cart").click()
            page.wait_for_selector(f"#cart li[data-item='{stocked['item_id']}']")
            assert page.locator("#cart-link-count").inner_text() == "1"
            width = page.evaluate("() => document.documentElement.scrollWidth")
            assert width <= PHONE["width"], width
            page.screenshot(path=str(tmp_path / "phone-in-cart.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def test_a_cart_is_completed_before_it_is_offered_substitutes(served):
    """Through the stream and the API: the simulator's heroes have fixed complements in other
    categories, and shoppers view other items of the hero's category before carting it, so
    the hero's next picks are full of substitutes."""
    facts = {c["item_id"]: c for c in served.shop.catalog}
    checked = 0
    for hero, complements in served.shop.complements.items():
        doc = served.doc("item", hero)
        if not doc or not doc["cross_sell"]:
            continue
        body = served.post("/v1/cart/suggestions", {"items": [hero], "k": 10},
                           key="read").json()
        # What would replace the hero in the cart: never bought with it, and of its category
        # or one of its alternatives (looked at instead). Bought with it by a few, and
        # alike: for the model to weigh, left out here.
        bought = {e["item_id"] for e in doc["cross_sell"]}
        alike = {e["item_id"] for e in doc["alternatives"][: ALTERNATIVES_READ]} | {
            i for i, f in facts.items() if f["category"] == facts[hero]["category"]}
        ids = [e["item_id"] for e in body["items"] if e["kind"] != "trending"
               and not (e["item_id"] in bought and e["item_id"] in alike)]
        swap = [i in alike for i in ids]
        assert swap == sorted(swap), (hero, ids)
        # The known complements with evidence are all in the answer, ahead of any substitute.
        known = {i for i in bought & set(complements) if facts[i]["in_stock"]}
        assert known <= set(ids), (hero, known, ids)
        if True in swap and known:
            assert max(ids.index(i) for i in known) < swap.index(True), (hero, known, ids)
        checked += True in swap
    assert checked >= 5  # heroes whose answer had substitutes to put last
