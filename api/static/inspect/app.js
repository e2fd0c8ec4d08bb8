// The inspect page (admin): what cartwise would suggest for a product or a shopper, and why.
// Plain browser JavaScript against the API (docs/api.md) with the admin key typed in, kept in
// sessionStorage like the experiments page. The API base is `?api=` or this page's origin.
// Routes newer than this page may lack (`/v1/catalog/search`, `/v1/items/{id}/lists`,
// `/v1/users/{id}/context`) are used when the API has them; without them the page says what
// it cannot show and falls back to what the public routes give.
"use strict";

const API = (new URLSearchParams(location.search).get("api") || "").replace(/\/+$/, "");
const KEY = "cw-admin-key";
const CATALOG_PAGES = 40;      // 40 x 500 items searched in the page without a search route
const DUE_PAGES = 10;          // 10 x 1000 reminders scanned for one shopper
const KINDS = [
  ["cross_sell", "Goes with it", "bought together (cross-sell)"],
  ["alternatives", "Instead of it", "viewed together (alternatives)"],
  ["next", "Picked around it", "picked just before or after it in the same visit"],
  ["upsell", "A step up", "dearer alternatives in its category (upsell)"],
];
const KIND_WORDS = { cross_sell: "goes with", alternatives: "instead of", next: "picked around it",
                     upsell: "step up", trending: "popular (filler)", revisit: "revisit",
                     pinned: "pinned by you", new: "new (boosted)" };

const $ = (id) => document.getElementById(id);
const state = { catalog: new Map(), catalogComplete: false, catalogLoaded: false };

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.detail || `HTTP ${status}`);
    this.status = status;
    this.reason = e.reason || "";
    this.field = e.field || null;
  }
}

// -- talking to the API ----------------------------------------------------------------------

async function api(path) {
  let res;
  try {
    res = await fetch(API + path, { headers: { "X-API-Key": sessionStorage.getItem(KEY) || "" } });
  } catch (err) {
    throw new Error(`cannot reach the API at ${API || location.origin}: is \`cartwise api\` ` +
                    "running, and does CARTWISE_CORS_ORIGINS allow this page?");
  }
  const body = await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

/** A route this API version may lack: null when the route is missing, not the thing asked. */
async function optional(path) {
  try {
    return await api(path);
  } catch (err) {
    const routeMissing = err instanceof ApiError
      && ((err.status === 404 && !err.field) || err.status === 405);
    if (routeMissing) return null;
    throw err;
  }
}

function say(text, bad = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", bad);
}

function explain(err) {
  if (err.status === 401) return "The admin key is missing or unknown: paste one above " +
                                 "(make one with `cartwise api-key admin`).";
  if (err.status === 403) return "This key is not an admin key: the inspect page needs one.";
  if (err.status === 429) return "Too many requests for this key: wait a second and retry.";
  if (err.status === 503) return "The API cannot reach Redis right now: retry shortly.";
  return err.message;
}

// -- words a merchant reads ------------------------------------------------------------------

function nameOf(id) {
  const it = state.catalog.get(id);
  return it && it.name ? it.name : id;
}

function money(p) {
  return p == null ? "no price" : Number(p).toLocaleString(undefined,
    { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}

function num(v, digits = 2) {
  return v == null ? "–" : Number(v).toLocaleString(undefined, { maximumFractionDigits: digits });
}

function ago(ts) {
  if (ts == null) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function when(ts) {
  return ts == null ? "–" : new Date(ts * 1000).toLocaleString();
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(e.dataset, v);
    else e[k] = v;
  }
  e.append(...children.filter((c) => c != null && c !== ""));
  return e;
}

function itemLink(id) {
  return el("a", { href: `#item=${encodeURIComponent(id)}`, className: "item" },
            el("span", { className: "name", textContent: nameOf(id) }),
            nameOf(id) !== id ? el("code", { textContent: id }) : null);
}

function facts(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", { textContent: k }),
                                                  el("dd", {}, v)]));
}

// -- the catalog: names and search -----------------------------------------------------------

async function loadCatalog() {
  if (state.catalogLoaded) return;
  let cursor = 0;
  let pages = 0;
  do {
    const page = await api(`/v1/catalog?cursor=${cursor}&count=500`);
    page.items.forEach((it) => state.catalog.set(it.item_id, it));
    cursor = page.next_cursor;
    pages += 1;
  } while (cursor !== 0 && pages < CATALOG_PAGES);
  state.catalogComplete = cursor === 0;
  state.catalogLoaded = true;
}

async function search(query) {
  const q = query.trim();
  if (!q) return;
  const found = await optional(`/v1/catalog/search?q=${encodeURIComponent(q)}&k=20`);
  let matches;
  if (found) {
    found.items.forEach((it) => state.catalog.set(it.item_id, it));
    matches = found.items;
  } else {
    const needle = q.toLowerCase();
    matches = [...state.catalog.values()]
      .filter((it) => it.item_id.toLowerCase().includes(needle)
                      || (it.name || "").toLowerCase().includes(needle))
      .sort((a, b) => rank(a, needle) - rank(b, needle)
                      || (a.name || a.item_id).localeCompare(b.name || b.item_id));
  }
  const total = found && found.matches != null ? found.matches : matches.length;
  matches = matches.slice(0, 20);
  const exact = matches.find((it) => it.item_id === q);
  if (exact || matches.length === 1) {
    go("item", (exact || matches[0]).item_id);
    return;
  }
  if (!matches.length) {
    // Not in the catalog (or beyond what was searched): an item with lists may still exist.
    const more = (found ? found.complete !== false : state.catalogComplete) ? "" :
      ` (searched the first ${found ? found.scanned : state.catalog.size} catalog items)`;
    say(`No product named like "${q}"${more}; trying it as an id.`);
    go("item", q);
    return;
  }
  say(total > matches.length
    ? `${total} products match "${q}"; the first ${matches.length}: pick one or type more.`
    : `${total} products match "${q}": pick one.`);
  $("matches").replaceChildren(...matches.map((it) => el("li", { dataset: { item: it.item_id } },
    itemLink(it.item_id),
    el("span", { className: "muted", textContent: ` ${it.category || ""} · ${money(it.price)}` }))));
}

function rank(it, needle) {
  const name = (it.name || "").toLowerCase();
  if (it.item_id.toLowerCase() === needle || name === needle) return 0;
  return name.startsWith(needle) || it.item_id.toLowerCase().startsWith(needle) ? 1 : 2;
}

// -- a product -------------------------------------------------------------------------------

async function showItem(id) {
  $("user-view").hidden = true;
  $("matches").replaceChildren();
  const it = state.catalog.get(id);
  const enc = encodeURIComponent(id);
  const [raw, ...answers] = await Promise.all([
    optional(`/v1/items/${enc}/lists`),
    ...KINDS.map(([kind]) => api(`/v1/items/${enc}/suggestions?kind=${kind}&k=20`)),
  ]);
  $("item-name").replaceChildren(nameOf(id), " ", el("code", { textContent: id }));
  const typed = $("item-query").value.trim().toLowerCase();
  if (typed && ![id.toLowerCase(), nameOf(id).toLowerCase()].includes(typed)) {
    $("item-query").value = "";  // reached by a link: the old query would mislead
  }
  $("item-facts").textContent = it
    ? [it.category || "no category", money(it.price),
       it.in_stock === false ? "out of stock" : "in stock",
       it.consumable ? "consumable" : null].filter(Boolean).join(" · ")
    : "Not in the catalog: no name, price or stock known.";
  const doc = raw || answers.find((a) => a.generated_at != null) || {};
  $("item-fresh").textContent = doc.generated_at == null
    ? "No lists for this product yet: shoppers see popular items until it is viewed or " +
      "bought with others."
    : `Lists written ${ago(doc.generated_at)}, from events up to ${when(doc.as_of)}.` +
      (raw && raw.repurchase ? ` Bought again every ${num(raw.repurchase.cycle_days, 1)} ` +
                               "days (median)." : "");
  $("item-note").textContent = raw ? "" :
    "The counts behind each suggestion (shoppers, confidence, lift) are not available from " +
    "this API version (it lacks GET /v1/items/{id}/lists): below are the lists as shoppers " +
    "are served them.";
  $("item-lists").replaceChildren(...KINDS.map(([kind, title, what], n) =>
    itemList(kind, title, what, answers[n], raw)));
  $("item-view").hidden = false;
  say(`Showing ${nameOf(id)}.`);
}

function itemList(kind, title, what, answer, raw) {
  const stored = raw ? raw[kind === "upsell" ? "alternatives" : kind] || [] : null;
  const evidence = new Map((stored || []).map((e) => [e.item_id, e]));
  const rows = answer.items.map((s, n) => row(s, n, evidence.get(s.item_id)));
  const served = new Set(answer.items.map((s) => s.item_id));
  const held = (stored || []).filter((e) => !served.has(e.item_id)).length;
  const summary = [what];
  if (stored && kind !== "upsell") summary.push(`${stored.length} stored, ${held} not served ` +
                                                "(out of stock, rules or beyond 20)");
  if (answer.fallback) summary.push("topped up with popular items");
  return el("section", { className: "list", dataset: { kind } },
    el("h3", { textContent: title }),
    el("p", { className: "muted", textContent: summary.join(" · ") }),
    rows.length ? el("ol", { className: "rows" }, ...rows)
                : el("p", { className: "empty", textContent: "Nothing to show." }));
}

function row(s, n, evidence) {
  const item = state.catalog.get(s.item_id) || {};
  const chips = [`score ${num(s.score, 3)}`];
  if (evidence) {  // the stored list's counts (admin route)
    chips.push(`support ${num(evidence.support, 1)}`,
               `confidence ${num(100 * evidence.confidence, 1)}%`,
               `lift ${num(evidence.lift)}`, `LLR ${num(evidence.llr, 1)}`);
  } else if (s.evidence) {  // what an answer carries of them, where it does
    if (s.evidence.shoppers != null) chips.push(`shoppers ${num(s.evidence.shoppers, 1)}`);
    if (s.evidence.share != null) chips.push(`share ${num(100 * s.evidence.share, 1)}%`);
  }
  if (s.anchor) chips.push(`because of ${s.anchor_name || nameOf(s.anchor)}`);
  if (s.price_ratio) chips.push(`${num(s.price_ratio)}× the price`);
  return el("li", { dataset: { item: s.item_id, kind: s.kind } },
    el("span", { className: "rank", textContent: `${n + 1}` }),
    el("div", { className: "what" },
      itemLink(s.item_id),
      el("span", { className: "muted", textContent:
        ` ${money(s.price ?? item.price)}${item.in_stock === false ? " · out of stock" : ""}` }),
      el("span", { className: `kind kind-${s.kind}`, textContent: KIND_WORDS[s.kind] || s.kind }),
      el("div", { className: "reason", textContent: s.reason || "" }),  // worded by the API
      el("div", { className: "chips" }, ...chips.map((c) => el("span", { textContent: c })))));
}

// -- a shopper -------------------------------------------------------------------------------

async function showUser(id) {
  $("item-view").hidden = true;
  $("matches").replaceChildren();
  const enc = encodeURIComponent(id);
  const [profile, raw, due] = await Promise.all([
    api(`/v1/users/${enc}/profile`).catch((err) => {
      if (err.status === 404) return null;
      throw err;
    }),
    optional(`/v1/users/${enc}/context`),
    dueFor(id),
  ]);
  // Without the raw route, the served answer (it counts toward a frequency cap, if set).
  const answer = raw ? null : await api(`/v1/users/${enc}/suggestions?placement=home&k=20`);
  $("user-name").replaceChildren("Shopper ", el("code", { textContent: id }));
  showSegment(profile);
  showContext(raw);
  showDue(due);
  const items = raw ? raw.items || [] : answer.items;
  const doc = raw || answer;
  $("user-fresh").textContent = doc.generated_at == null
    ? "No list for this shopper yet: they are shown popular items."
    : `List written ${ago(doc.generated_at)}, from events up to ${when(doc.as_of)}` +
      (raw ? " (as the worker stored it, before stock filters and your rules)." :
       " (as served now, after stock filters and your rules).");
  $("user-list").replaceChildren(...items.map((s, n) => row(s, n, null)));
  if (!items.length) $("user-list").append(el("li", { className: "empty",
                                                       textContent: "Nothing to show." }));
  $("user-view").hidden = false;
  say(`Showing shopper ${id}.`);
}

function showSegment(profile) {
  if (!profile) {
    facts($("user-segment"), [["segment", "none yet: no purchase, and no viewed product " +
                                          "with a category"]]);
    return;
  }
  const r = profile.rfm || {};
  const interest = profile.interest || {};
  const weights = Object.entries(interest.categories || {}).sort((a, b) => b[1] - a[1]);
  // One category is the cluster's name already; several are worth their shares.
  const cats = weights.length > 1
    ? weights.map(([c, w]) => `${c} ${num(100 * w, 0)}%`).join(", ") : "";
  facts($("user-segment"), [
    ["segment", (r.quadrant || "–").replaceAll("_", " ")],
    ["orders", `${num(r.frequency, 0)} in ${num(profile.segment_config.window_days, 0)} days`],
    ["spent", money(r.monetary)],
    ["last order", r.recency_days == null ? "none" : `${num(r.recency_days, 1)} days ago`],
    ["interest", interest.cluster ? `${interest.cluster}${cats ? ` (${cats})` : ""}` : "–"],
    ["bought", names(profile.bought || [])],
  ]);
}

function showContext(raw) {
  if (!raw) {
    facts($("user-context"), [["context", "not available from this API version (it lacks " +
                                          "GET /v1/users/{id}/context)"]]);
    return;
  }
  const ctx = raw.context || {};
  const cart = Object.entries(ctx.cart || {});
  facts($("user-context"), [
    ["looked at", names(ctx.recent || [])],
    ["cart", cart.length ? names(cart.map(([i]) => i), Object.fromEntries(cart)) : "empty"],
    ["bought", names(ctx.bought || [])],
    ["last seen", ago(ctx.last_ts)],
  ]);
}

function names(ids, qty = {}) {
  if (!ids.length) return "nothing";
  const span = el("span", { className: "names" });
  ids.slice(0, 12).forEach((id, n) => {
    if (n) span.append(", ");
    span.append(itemLink(id), qty[id] > 1 ? ` ×${qty[id]}` : "");
  });
  if (ids.length > 12) span.append(` and ${ids.length - 12} more`);
  return span;
}

async function dueFor(id) {
  const out = [];
  let cursor = 0;
  for (let page = 0; page < DUE_PAGES; page += 1) {
    const body = await api(`/v1/replenishment/due?within=90d&count=1000&cursor=${cursor}` +
                           `&user_id=${encodeURIComponent(id)}`);
    out.push(...body.due.filter((d) => d.user_id === id));
    if (body.next_cursor == null) return { due: out, complete: true };
    cursor = body.next_cursor;
  }
  return { due: out, complete: false };
}

function showDue({ due, complete }) {
  const rows = due.map((d) => el("li", { dataset: { item: d.item_id } }, itemLink(d.item_id),
    el("span", { className: "muted", textContent:
      ` due ${when(d.due_at)}, runs out ${when(d.expected_run_out)}` +
      (d.in_stock === false ? " · out of stock" : "") })));
  if (!rows.length) rows.push(el("li", { className: "empty", textContent:
    "Nothing due in the next 90 days." + (complete ? "" : " (only the first 10,000 " +
                                          "reminders were searched)") }));
  $("user-due").replaceChildren(...rows);
}

// -- wiring ----------------------------------------------------------------------------------

/** Show a product or a shopper; the address keeps it (back, reload, a link to share). */
function go(kind, id) {
  const hash = `#${kind}=${encodeURIComponent(id)}`;
  if (location.hash === hash) route();
  else location.hash = hash;
}

async function route() {
  const m = location.hash.match(/^#(item|user)=(.+)$/);
  if (!m || !sessionStorage.getItem(KEY)) return;
  const id = decodeURIComponent(m[2]);
  try {
    await loadCatalog();
    if (m[1] === "item") await showItem(id);
    else await showUser(id);
  } catch (err) {
    say(explain(err), true);
  }
}

function main() {
  $("key").value = sessionStorage.getItem(KEY) || "";
  $("key-form").onsubmit = async (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    state.catalogLoaded = false;
    try {
      await api("/v1/replenishment/due?count=1");  // any admin route: is it an admin key?
      await loadCatalog();
      say(`Key accepted: ${state.catalog.size} products loaded. Find a product or a shopper.`);
      route();
    } catch (err) {
      say(explain(err), true);
    }
  };
  $("item-form").onsubmit = async (e) => {
    e.preventDefault();
    try {
      await loadCatalog();
      await search($("item-query").value);
    } catch (err) {
      say(explain(err), true);
    }
  };
  $("user-form").onsubmit = (e) => {
    e.preventDefault();
    const id = $("user-query").value.trim();
    if (id) go("user", id);
  };
  window.addEventListener("hashchange", route);
  if (!sessionStorage.getItem(KEY)) say("Paste an admin key to start.");
  route();
}

main();
