"""The demo storefront in headless Chromium: suggestions follow the cart, live.

Debian's Chromium (installed by `make test`) driven by Playwright, against the API process of
the `served` fixture, with a real worker turning the page's events into suggestions.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

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

            deadline = time.monotonic() + 30
            while (row := counted())["conversions"] < 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert row["shoppers"] == 1 and row["impressions"] >= 2
            assert row["clicks"] >= 1 and row["conversions"] >= 1
            page.screenshot(path=str(tmp_path / "storefront.png"))
            assert not errors, errors
        finally:
            browser.close()


@pytest.fixture(autouse=True)
def _chromium_output(tmp_path: Path):
    yield
    shot = tmp_path / "storefront.png"
    if shot.exists():
        print(f"screenshot: {shot}")
