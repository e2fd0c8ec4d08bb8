"""The inspect page (admin) in headless Chromium, against the API of the `served` fixture.

A merchant finds a product by name and sees its four lists as the API serves them, with
names, reasons and freshness; looks up a shopper and sees their segment, reminders and list;
a wrong key gets one clear line. The page is the API's own `/inspect/`, so it talks to the
real API same-origin, as it will in production.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from tests.test_api import hero_with_lists
from tests.test_storefront import CHROMIUM, FLAGS

PHONE = {"width": 390, "height": 844}
ACCEPTED = "() => /Key accepted/.test(document.getElementById('status').textContent)"


def assert_served(base: str, folder: str, probe: str = "") -> None:
    """The API serves api/static/{folder} at {base}/{folder}/ (api/routers/pages.py)."""
    got = httpx.get(f"{base}/{folder}/{probe}", timeout=10)
    assert got.status_code == 200, f"the API does not serve /{folder}/{probe}: {got.status_code}"


def open_page(pw, served, errors: list[str], viewport: dict | None = None):
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    page = browser.new_page(viewport=viewport) if viewport else browser.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    assert_served(served.base, "inspect")
    page.goto(served.base + "/inspect/")
    return browser, page


def use_key(page: Page, key: str) -> None:
    page.fill("#key", key)
    page.click("#key-form button")


def lists_of(served, item: str) -> dict[str, dict]:
    return {kind: served.get(f"/v1/items/{item}/suggestions", kind=kind, k=20).json()
            for kind in ("cross_sell", "alternatives", "next", "upsell")}


def rows(page: Page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector + " li[data-item]",
                                     "ls => ls.map(l => l.dataset.item)")


def test_a_product_found_by_name_shows_its_lists_with_names_and_reasons(served, tmp_path):
    hero = hero_with_lists(served)
    names = {c["item_id"]: c["name"] for c in served.shop.catalog}
    served_lists = lists_of(served, hero)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser, page = open_page(pw, served, errors)
        try:
            assert "Paste an admin key" in page.text_content("#status")
            use_key(page, served.admin)
            page.wait_for_function(ACCEPTED)
            # Other tests on this stack add catalog records: at least the shop's are there.
            loaded = re.search(r"(\d+) products loaded", page.text_content("#status"))
            assert loaded and int(loaded.group(1)) >= len(served.shop.catalog)

            # A name typed in full finds the one product and opens it.
            page.fill("#item-query", names[hero].lower())
            page.click("#item-form button")
            page.wait_for_selector("#item-view:not([hidden]) section.list")
            assert names[hero] in page.text_content("#item-name")
            assert "Lists written" in page.text_content("#item-fresh")
            # Counts need the admin route for raw lists; without it the page says so.
            has_lists = served.get(f"/v1/items/{hero}/lists", "admin").status_code == 200
            assert ("not available" in page.text_content("#item-note")) != has_lists
            # The lists may still move (other tests' events reach this worker): the page must
            # show what the API answers at the same moment, so compare again after a reload.
            for _ in range(10):
                shown = {kind: rows(page, f"section.list[data-kind='{kind}']")
                         for kind in served_lists}
                if all(shown[k] == [e["item_id"] for e in b["items"]]
                       for k, b in served_lists.items()):
                    break
                served_lists = lists_of(served, hero)
                page.reload()
                page.wait_for_selector("#item-view:not([hidden]) section.list")
            for kind, body in served_lists.items():
                assert shown[kind] == [e["item_id"] for e in body["items"]], kind

            # Rows name products and give the API's reason; ids only as small print.
            cross = page.locator("section.list[data-kind='cross_sell'] li").first
            first = served_lists["cross_sell"]["items"][0]
            assert cross.locator(".reason").text_content() == first["reason"]
            first = first["item_id"]
            assert cross.locator(".name").text_content() == names[first]

            # A list item is a link to that product's own page.
            cross.locator("a.item").click()
            page.wait_for_function(
                "n => document.getElementById('item-name').textContent.startsWith(n)",
                arg=names[first])
            assert page.url.endswith(f"#item={first}")
            page.screenshot(path=str(tmp_path / "inspect-item.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def test_a_partial_name_lists_the_matches_to_pick_from_on_a_phone(served, tmp_path):
    errors: list[str] = []
    with sync_playwright() as pw:
        browser, page = open_page(pw, served, errors, viewport=PHONE)
        try:
            use_key(page, served.admin)
            page.wait_for_function(ACCEPTED)
            page.fill("#item-query", "headphones")
            page.click("#item-form button")
            page.wait_for_selector("#matches li")
            listed = rows(page, "#matches")
            want = sorted(c["item_id"] for c in served.shop.catalog
                          if "headphones" in c["name"].lower())
            assert len(want) > 20 and len(listed) == 20 and set(listed) <= set(want)
            assert f"{len(want)} products match" in page.text_content("#status")

            # Picking one opens it; its four lists fit the phone's width.
            page.locator("#matches a.item").first.click()
            page.wait_for_selector("#item-view:not([hidden]) section.list li")
            assert page.url.endswith(f"#item={listed[0]}")
            wide = page.evaluate("() => document.documentElement.scrollWidth")
            assert wide <= PHONE["width"], wide
            page.screenshot(path=str(tmp_path / "inspect-item-phone.png"))
            assert not errors, errors
        finally:
            browser.close()


@pytest.mark.parametrize(("key", "says"), [("not-a-key", "missing or unknown"),
                                           ("read", "not an admin key")])
def test_a_wrong_key_gets_one_clear_line(served, key, says):
    errors: list[str] = []
    with sync_playwright() as pw:
        browser, page = open_page(pw, served, errors)
        try:
            use_key(page, getattr(served, key, key))
            page.wait_for_selector("#status.error")
            assert says in page.text_content("#status")
            assert page.is_hidden("#item-view")
            assert not errors, errors
        finally:
            browser.close()


def buy_twice(served, user: str) -> tuple[str, str]:
    """A shopper who bought a consumable 30 and 5 days ago (due to rebuy in about 13 days),
    then looked at a product a minute ago: (what they bought, what they looked at)."""
    item = next(c for c in served.shop.catalog if c["consumable"] and c["in_stock"])
    now = time.time()
    events = [{"event_id": f"{user}-{n}", "type": "purchase", "user_id": user,
               "order_id": f"{user}-o{n}", "ts": now - days * 86_400,
               "items": [{"item_id": item["item_id"], "quantity": 1, "price": item["price"]}]}
              for n, days in enumerate((30, 5))]
    hero = hero_with_lists(served)
    events.append({"event_id": f"{user}-v", "type": "view", "user_id": user, "ts": now - 60,
                   "item_id": hero})
    assert served.post("/v1/events", events).status_code == 202
    return item["item_id"], hero


def test_a_shopper_shows_segment_reminders_and_list_on_a_phone(served, tmp_path):
    user = f"inspect-{time.time_ns()}"
    item, viewed = buy_twice(served, user)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        due = served.get("/v1/replenishment/due", "admin", within="90d", count=1000).json()
        if any(d["user_id"] == user for d in due["due"]):
            break
        time.sleep(0.5)
    theirs = [d["item_id"] for d in due["due"] if d["user_id"] == user]
    assert theirs == [item]
    profile = served.get(f"/v1/users/{user}/profile", "admin").json()
    names = {c["item_id"]: c["name"] for c in served.shop.catalog}
    errors: list[str] = []
    with sync_playwright() as pw:
        browser, page = open_page(pw, served, errors, viewport=PHONE)
        try:
            use_key(page, served.admin)
            page.wait_for_function(ACCEPTED)
            page.fill("#user-query", user)
            page.click("#user-form button")
            page.wait_for_selector("#user-view:not([hidden])")
            segment = page.text_content("#user-segment")
            assert profile["rfm"]["quadrant"].replace("_", " ") in segment
            assert names[item] in segment  # what they bought, by name
            assert rows(page, "#user-due") == [item]
            assert names[item] in page.text_content("#user-due")
            # What they are doing now needs the admin route for the stored context.
            context = page.text_content("#user-context")
            if served.get(f"/v1/users/{user}/context", "admin").status_code == 200:
                assert names[viewed] in context
            else:
                assert "not available" in context
            listed = page.locator("#user-list li[data-item]")
            assert listed.count() > 0
            assert all(listed.nth(n).locator(".reason").text_content()
                       for n in range(listed.count()))
            # Fits a phone: nothing wider than the screen.
            wide = page.evaluate("() => document.documentElement.scrollWidth")
            assert wide <= PHONE["width"], wide
            page.screenshot(path=str(tmp_path / "inspect-shopper-phone.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
