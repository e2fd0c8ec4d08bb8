"""The storefront widget in headless Chromium, on a shop page of another origin.

The page is `https://shop.example/` (an origin the `served` API allows by CORS), handed to the
browser by the test; the widget script comes from the API (`/widget/cartwise.js`, or the file
at that address until the API mounts it) and every request it makes goes to the real API.
"""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.test_api import hero_with_lists
from tests.test_inspect_page import PHONE, assert_served
from tests.test_storefront import CHROMIUM, FLAGS

SHOP = "https://shop.example"
# The shop is an internet origin and the API is on loopback here: Chromium's local network
# access check would ask the user (a test artefact; a real API is on the internet too).
SHOP_FLAGS = [*FLAGS, "--disable-features=LocalNetworkAccessChecks"]
# The shop's own styling, through the widget's custom properties and parts.
SHOP_CSS = """
cartwise-suggestions { --cartwise-accent: rgb(200, 0, 0); --cartwise-min-width: 10em; }
cartwise-suggestions::part(name) { text-transform: uppercase; }
"""


def shop_page(base: str, body: str) -> str:
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shop</title><style>{SHOP_CSS}</style>
<script src="{base}/widget/cartwise.js" defer></script></head>
<body><h1>A product page</h1>{body}</body></html>"""


def open_shop(pw, served, body: str, errors: list[str], viewport: dict | None = None,
              warnings: list[str] | None = None):
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=SHOP_FLAGS)
    page = browser.new_page(viewport=viewport or {"width": 1000, "height": 800})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    if warnings is not None:
        page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
    assert_served(served.base, "widget", "cartwise.js")
    html = shop_page(served.base, body)
    page.route(f"{SHOP}/**", lambda route: route.fulfill(status=200, body=html,
                                                          content_type="text/html"))
    page.goto(f"{SHOP}/product")
    return browser, page


def shown(page: Page, selector: str) -> list[str]:
    """Item ids the widget rendered, in order (Playwright's CSS pierces the shadow root)."""
    return page.eval_on_selector_all(f"{selector} li[part=item]",
                                     "ls => ls.map(l => l.dataset.item)")


def report_row(served, experiment: str) -> dict:
    rep = served.get(f"/v1/experiments/{experiment}/report", "admin").json()
    return {r["variant"]: r for r in rep["variants"]}["all"]


@pytest.fixture
def watched(served):
    """Every shopper in one arm of an experiment: its report counts the widget's feedback."""
    served.clear_experiments()
    arms = {"variants": [{"name": "all", "weight": 1}, {"name": "none", "weight": 1e-9}]}
    assert served.put("/v1/experiments/widget-feedback", arms).status_code == 200
    time.sleep(1.0)  # every API process picks experiments up within half a second
    yield "widget-feedback"
    served.delete("/v1/experiments/widget-feedback")


def test_an_item_widget_renders_the_lists_and_reports_what_was_seen(served, watched, tmp_path):
    hero = hero_with_lists(served)
    user = f"widget-{time.time_ns()}"
    want = served.get(f"/v1/items/{hero}/suggestions", k=4, user_id=user).json()["items"]
    body = f"""
      <cartwise-suggestions id="item" item="{hero}" user="{user}" k="4" show-reasons
        key="{served.read}" ingest-key="{served.ingest}"></cartwise-suggestions>
      <div style="height: 3000px"></div>
      <cartwise-suggestions id="below" item="{hero}" kind="alternatives" user="{user}"
        key="{served.read}" ingest-key="{served.ingest}"></cartwise-suggestions>"""
    errors: list[str] = []
    with sync_playwright() as pw:
        browser, page = open_shop(pw, served, body, errors)
        try:
            page.wait_for_selector("#item li[part=item]")
            assert shown(page, "#item") == [e["item_id"] for e in want]
            first = page.locator("#item li[part=item]").first
            assert first.locator("[part=name]").text_content() == want[0]["name"]
            assert first.locator("[part=reason]").text_content() == want[0]["reason"]

            # The shop's CSS reaches inside: a custom property and a part.
            price = first.locator("[part=price]")
            assert price.evaluate("e => getComputedStyle(e).color") == "rgb(200, 0, 0)"
            assert first.locator("[part=name]").evaluate(
                "e => getComputedStyle(e).textTransform") == "uppercase"

            # On screen: one impression; the list below the fold is not seen yet.
            deadline = time.monotonic() + 30
            while report_row(served, watched)["impressions"] < 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            row = report_row(served, watched)
            assert row["impressions"] == 1 and row["shoppers"] == 1

            # A click is reported with the answer's request id; the shop hears of it too.
            page.evaluate("""() => document.getElementById('item').addEventListener(
                'cartwise-click', e => { e.preventDefault(); window.clicked = e.detail.item; })""")
            first.locator("[part=link]").click()
            assert page.evaluate("() => window.clicked.item_id") == want[0]["item_id"]
            deadline = time.monotonic() + 30
            while report_row(served, watched)["clicks"] < 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert report_row(served, watched)["clicks"] == 1
            page.screenshot(path=str(tmp_path / "widget-item.png"))

            # Scrolled into view, the second list is seen: a second impression.
            page.locator("#below").scroll_into_view_if_needed()
            deadline = time.monotonic() + 30
            while report_row(served, watched)["impressions"] < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert report_row(served, watched)["impressions"] == 2
            assert not errors, errors
        finally:
            browser.close()


def test_a_cart_widget_follows_the_cart_on_a_phone(served, tmp_path):
    hero = hero_with_lists(served)
    newcomer = f"widget-new-{time.time_ns()}"
    body = f"""<cartwise-suggestions id="cart" cart="{hero}" k="6"
                 key="{served.read}"></cartwise-suggestions>
               <cartwise-suggestions id="mine" user="{newcomer}" k="4"
                 key="{served.read}"></cartwise-suggestions>"""
    errors: list[str] = []
    with sync_playwright() as pw:
        browser, page = open_shop(pw, served, body, errors, viewport=PHONE)
        try:
            page.wait_for_selector("#cart li[part=item]")
            before = shown(page, "#cart")
            assert hero not in before
            kinds = page.eval_on_selector_all("#cart li[part=item]",
                                              "ls => ls.map(l => l.dataset.kind)")
            assert set(kinds) <= {"cross_sell", "next", "trending", "pinned", "new"}

            # The shop changes the attribute when the cart changes; the list follows.
            pick = before[0]
            page.evaluate("p => document.getElementById('cart').setAttribute('cart', p)",
                          f"{hero},{pick}")
            page.wait_for_function(
                "p => ![...document.getElementById('cart').shadowRoot"
                ".querySelectorAll('li')].some(l => l.dataset.item === p)", arg=pick)
            after = shown(page, "#cart")
            assert after and not {hero, pick} & set(after)

            # A shopper's own list: a newcomer gets what is popular, under its heading.
            page.wait_for_selector("#mine li[part=item]")
            theirs = served.get(f"/v1/users/{newcomer}/suggestions", k=4, placement="home")
            assert shown(page, "#mine") == [e["item_id"] for e in theirs.json()["items"]]
            assert page.text_content("#mine [part=heading]") == "You may also need"
            wide = page.evaluate("() => document.documentElement.scrollWidth")
            assert wide <= PHONE["width"], wide
            page.screenshot(path=str(tmp_path / "widget-cart-phone.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def test_a_widget_without_a_usable_key_stays_out_of_the_way(served):
    body = """<cartwise-suggestions id="bad" user="u-1" key="not-a-key"></cartwise-suggestions>
              <p id="after">the rest of the page</p>"""
    errors: list[str] = []
    warnings: list[str] = []
    with sync_playwright() as pw:
        browser, page = open_shop(pw, served, body, errors, warnings=warnings)
        try:
            page.wait_for_selector("#bad[data-state=error]", state="attached")
            assert page.is_hidden("#bad") and page.is_visible("#after")
            assert any("unknown_api_key" in w for w in warnings), warnings
            assert not errors, errors
        finally:
            browser.close()
