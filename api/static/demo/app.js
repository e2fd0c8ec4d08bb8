// The demo storefront: plain browser JavaScript against the public API (docs/api.md).
// Every page view and cart change is sent to POST /v1/events; suggestions are read back
// from the API and refreshed every second, so the lists follow what the shopper does.
// A list that changed on screen is reported as an impression, a suggestion clicked as a
// click, both with the answer's request_id (docs/experiments.md).
"use strict";

const state = { cfg: null, catalog: new Map(), cart: [], item: null, user: null,
                category: null };
const $ = (id) => document.getElementById(id);

function shopperId(fresh) {
  let id = fresh ? null : localStorage.getItem("cartwise-demo-user");
  if (!id) {
    id = "demo-" + Math.random().toString(36).slice(2, 10);
    localStorage.setItem("cartwise-demo-user", id);
  }
  return id;
}

async function api(path, options = {}, key = state.cfg.read_key) {
  const res = await fetch(path, { ...options,
    headers: { "X-API-Key": key, "Content-Type": "application/json" } });
  const body = await res.json();
  if (!res.ok) throw new Error(`${res.status} ${body.error ? body.error.detail : ""}`);
  return body;
}

async function send(type, extra) {
  const event = { type, user_id: state.user, session_id: state.user + "-web", ...extra };
  try {
    await api("/v1/events", { method: "POST", body: JSON.stringify(event) },
              state.cfg.ingest_key);
    $("status").textContent = "";  // only problems are worth a line on a shop page
  } catch (err) {
    $("status").textContent = `event not sent: ${err.message}`;
  }
}

function label(id) {
  const item = state.catalog.get(id);
  return item && item.name ? item.name : id;
}

// The demo replays a UK shop (docs/demo-data.md): prices in pounds unless the config says.
function money(p) {
  if (p == null) return "";
  const currency = (state.cfg && state.cfg.currency) || "GBP";
  return new Intl.NumberFormat("en-GB", { style: "currency", currency }).format(Number(p));
}

function soldOut(id) { return (state.catalog.get(id) || {}).in_stock === false; }

async function loadCatalog() {
  let cursor = 0;
  do {
    const page = await api(`/v1/catalog?cursor=${cursor}&count=500`);
    page.items.forEach((it) => state.catalog.set(it.item_id, it));
    cursor = page.next_cursor;
  } while (cursor !== 0);
  const cats = [...new Set([...state.catalog.values()].map((i) => i.category))].sort();
  $("categories").replaceChildren(...cats.map((c) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = c;
    b.onclick = () => showCategory(c);
    return b;
  }));
  if (cats.length) showCategory(cats[0]);
}

function showCategory(cat) {
  state.category = cat;
  $("product").hidden = true;
  $("catalog").hidden = false;
  document.querySelectorAll("nav button").forEach((b) =>
    b.classList.toggle("active", b.textContent === cat));
  const items = [...state.catalog.values()].filter((i) => i.category === cat)
    .sort((a, b) => a.item_id.localeCompare(b.item_id));
  $("catalog").replaceChildren(...items.map((it) => {
    const d = document.createElement("div");
    d.className = "card";
    d.dataset.item = it.item_id;
    d.innerHTML = "<div class='name'></div><div class='price'></div>";
    d.querySelector(".name").textContent = label(it.item_id);
    d.querySelector(".price").textContent = money(it.price);
    if (it.in_stock === false) {
      d.classList.add("sold-out");
      d.querySelector(".price").textContent += " · out of stock";
    }
    d.onclick = () => showItem(it.item_id);
    return d;
  }));
}

async function showItem(id) {
  state.item = id;
  const it = state.catalog.get(id) || { item_id: id };
  $("catalog").hidden = true;
  $("product").hidden = false;
  $("product").dataset.item = id;
  $("product-name").textContent = label(id);
  $("product-price").textContent = money(it.price);
  $("product-category").textContent = it.category || "";
  $("product-stock").textContent = it.in_stock === false ? "out of stock" : "in stock";
  $("add-to-cart").hidden = it.in_stock === false;  // nothing to add: no button to press
  await send("view", { item_id: id, price: it.price, category: it.category });
  refresh();
}

function feedbackTags(body) {
  const tags = { request_id: body.request_id };
  if (body.experiment) {
    tags.experiment_id = body.experiment.id;
    tags.variant = body.experiment.variant;
  }
  return tags;
}

function heading(body, evidence) {
  return body.items.length && body.items.every((s) => s.kind === "trending")
    ? "Popular right now" : evidence;
}

function renderList(el, body, placement) {
  const tags = feedbackTags(body);
  const shown = body.items.map((s) => s.item_id).join(",");
  if (shown && shown !== el.dataset.shown) {  // an unchanged list was seen already
    send("impression", { ...tags, placement,
                         items: body.items.map((s) => ({ item_id: s.item_id })) });
  }
  el.dataset.shown = shown;
  el.replaceChildren(...body.items.map((s) => {
    const li = document.createElement("li");
    li.dataset.item = s.item_id;
    li.dataset.kind = s.kind;
    li.innerHTML = "<span class='name'></span> <span class='price'></span>" +
                   "<span class='reason'></span>";
    li.querySelector(".name").textContent = s.name || label(s.item_id);
    li.querySelector(".price").textContent = money(s.price);
    li.querySelector(".reason").textContent = s.reason;
    li.onclick = () => {
      send("click", { ...tags, item_id: s.item_id });
      showItem(s.item_id);
    };
    const add = document.createElement("button");
    add.type = "button";
    add.className = "add";
    add.textContent = "+ cart";
    add.onclick = (e) => {
      e.stopPropagation();
      send("click", { ...tags, item_id: s.item_id });
      addToCart(s.item_id);
    };
    if (!soldOut(s.item_id)) li.append(add);
    return li;
  }));
}

async function addToCart(id) {
  const it = state.catalog.get(id) || {};
  if (!state.cart.includes(id)) state.cart.push(id);
  renderCart();
  await send("add_to_cart", { item_id: id, price: it.price, category: it.category });
  refresh();
}

function renderCart() {
  $("cart-count").textContent = state.cart.length;
  $("cart-link-count").textContent = state.cart.length;
  $("buy").disabled = state.cart.length === 0;
  $("cart").replaceChildren(...state.cart.map((id) => {
    const li = document.createElement("li");
    li.dataset.item = id;
    li.textContent = `${label(id)} ${money((state.catalog.get(id) || {}).price)} `;
    const rm = document.createElement("button");
    rm.type = "button";
    rm.textContent = "remove";
    rm.onclick = async () => {
      state.cart = state.cart.filter((x) => x !== id);
      renderCart();
      await send("remove_from_cart", { item_id: id });
      refresh();
    };
    li.append(rm);
    return li;
  }));
}

async function refresh() {
  try {
    // "You may also need" shows what the shopper has not seen yet: with a cart, what
    // completes it; without, the "new for you" answer (no revisits of items already seen).
    const placement = state.cart.length ? "cart" : "new";
    const mine = await api(`/v1/users/${encodeURIComponent(state.user)}/suggestions` +
                           `?k=7&placement=${placement}`);
    mine.items = mine.items.filter((s) => s.item_id !== state.item).slice(0, 6);
    renderList($("user-suggestions"), mine, placement);
    // The answer's note says what happened (a rule, the cap, no evidence yet); without one,
    // say only what is true of every fallback.
    $("fallback-note").textContent = mine.note ? mine.note.text
      : mine.fallback ? "Popular in the shop right now." : "";
    if (state.item && !$("product").hidden) {
      const id = encodeURIComponent(state.item);
      const who = `&user_id=${encodeURIComponent(state.user)}`;
      const together = await api(`/v1/items/${id}/suggestions?k=4${who}`);
      const upsell = await api(`/v1/items/${id}/suggestions?k=3&kind=upsell${who}`);
      // Popular fillers are not "bought together": the heading says what the list is.
      $("item-heading").textContent = heading(together, "Frequently bought together");
      $("upsell-heading").textContent = heading(upsell, "A step up");
      renderList($("item-suggestions"), together, "product");
      renderList($("upsell-suggestions"), upsell, "upsell");
    }
  } catch (err) {
    $("status").textContent = `suggestions unavailable: ${err.message}`;
  }
}

async function main() {
  state.cfg = await (await fetch("config.json")).json();
  state.user = shopperId(false);
  $("user-id").textContent = state.user;
  $("new-shopper").onclick = () => {
    state.user = shopperId(true);
    state.cart = [];
    $("user-id").textContent = state.user;
    renderCart();
    refresh();
  };
  $("home-link").onclick = (e) => { e.preventDefault(); showCategory(state.category); };
  $("add-to-cart").onclick = () => { if (!soldOut(state.item)) addToCart(state.item); };
  $("buy").onclick = async () => {
    const items = state.cart.map((id) => ({ item_id: id, quantity: 1,
                                            price: (state.catalog.get(id) || {}).price }));
    await send("purchase", { items, order_id: "o-" + Date.now() });
    state.cart = [];
    renderCart();
    refresh();
  };
  await loadCatalog();
  renderCart();
  refresh();
  setInterval(refresh, 1000);
}

main();
