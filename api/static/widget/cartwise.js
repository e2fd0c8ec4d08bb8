// <cartwise-suggestions>: suggestions on any storefront page with one script tag
// (docs/widget.md). It reads an answer from the API (an item's lists, a cart's or a
// shopper's), renders it in a shadow root the shop styles with CSS custom properties and
// ::part(), and reports what it showed (impression, once per list, when it is on screen)
// and what was clicked (click), with the answer's request_id (docs/experiments.md).
"use strict";

(() => {
  if (customElements.get("cartwise-suggestions")) return;

  // The API base defaults to where this script came from: one tag, no configuration.
  const SCRIPT = document.currentScript;
  const SCRIPT_ORIGIN = SCRIPT && SCRIPT.src ? new URL(SCRIPT.src, location.href).origin : "";

  const HEADINGS = {
    cross_sell: "Frequently bought together",
    alternatives: "You may also like",
    next: "Shoppers went on to pick",
    upsell: "A step up",
    cart: "Complete your order",
    user: "You may also need",
  };

  const STYLE = `
    :host { display: block; margin: 0 0 1.5em; font: var(--cartwise-font, inherit);
            color: var(--cartwise-color, inherit); }
    :host([hidden]), :host([data-state="empty"]), :host([data-state="error"]) { display: none; }
    h2 { font-size: var(--cartwise-heading-size, 1.1em); margin: 0 0 .6em; }
    ol { list-style: none; margin: 0; padding: 0; display: grid;
         gap: var(--cartwise-gap, .75em);
         grid-template-columns: repeat(auto-fill, minmax(var(--cartwise-min-width, 9em), 1fr)); }
    li { margin: 0; }
    a { display: flex; flex-direction: column; gap: .25em; height: 100%; box-sizing: border-box;
        padding: var(--cartwise-padding, .75em); text-decoration: none; color: inherit;
        background: var(--cartwise-card-background, transparent);
        border: 1px solid var(--cartwise-border, #ddd);
        border-radius: var(--cartwise-radius, .5em); cursor: pointer; }
    a:hover, a:focus-visible { border-color: var(--cartwise-accent, #1f6feb); }
    .name { font-weight: 600; overflow-wrap: anywhere; }
    .price { color: var(--cartwise-accent, #1f6feb); }
    .reason { color: var(--cartwise-muted, #666); font-size: .85em; }
  `;

  function eventId() {
    if (crypto.randomUUID) return crypto.randomUUID();  // secure contexts only
    return Array.from(crypto.getRandomValues(new Uint8Array(16)),
                      (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function list(value) {
    return (value || "").split(",").map((s) => s.trim()).filter(Boolean);
  }

  class CartwiseSuggestions extends HTMLElement {
    static get observedAttributes() {
      return ["item", "kind", "cart", "user", "placement", "k", "key", "api", "heading",
              "show-reasons", "exclude"];
    }

    constructor() {
      super();
      this.answer = null;
      this._root = this.attachShadow({ mode: "open" });
      this._seen = "";           // the list an impression was sent for
      this._pending = false;
      this._timer = null;
      this._observer = null;
    }

    connectedCallback() {
      this._schedule();
      const every = Number(this.getAttribute("refresh") || 0);
      if (every > 0) this._timer = setInterval(() => this.refresh(), every * 1000);
    }

    disconnectedCallback() {
      clearInterval(this._timer);
      if (this._observer) this._observer.disconnect();
    }

    attributeChangedCallback() {
      if (this.isConnected) this._schedule();
    }

    // Several attributes set in one task (a cart change) cause one request.
    _schedule() {
      if (this._pending) return;
      this._pending = true;
      queueMicrotask(() => { this._pending = false; this.refresh(); });
    }

    get mode() {
      if (this.getAttribute("item")) return "item";
      if (this.hasAttribute("cart")) return "cart";
      return this.getAttribute("user") ? "user" : null;
    }

    get placement() {
      const mode = this.mode;
      return this.getAttribute("placement")
        || (mode === "item" ? "product" : mode === "cart" ? "cart" : "home");
    }

    _base() {
      return (this.getAttribute("api") || SCRIPT_ORIGIN || location.origin).replace(/\/+$/, "");
    }

    async _call(path, key, init = {}) {
      const res = await fetch(this._base() + path, { ...init,
        headers: { "X-API-Key": key, "Content-Type": "application/json" } });
      const body = await res.json().catch(() => ({}));
      if (!res.ok) {
        const e = body.error || {};
        throw new Error(`${res.status} ${e.reason || ""}: ${e.detail || res.statusText}`);
      }
      return body;
    }

    _request() {
      const k = Math.max(1, Math.min(50, Number(this.getAttribute("k") || 4)));
      const user = this.getAttribute("user");
      const enc = encodeURIComponent;
      if (this.mode === "item") {
        const kind = this.getAttribute("kind") || "cross_sell";
        const who = user ? `&user_id=${enc(user)}` : "";
        return [`/v1/items/${enc(this.getAttribute("item"))}/suggestions?kind=${enc(kind)}` +
                `&k=${k}${who}`, {}];
      }
      if (this.mode === "cart") {
        const items = list(this.getAttribute("cart"));
        if (!items.length) return null;  // an empty cart has nothing to complete
        const body = { items, k, exclude: list(this.getAttribute("exclude")) };
        if (user) body.user_id = user;
        return ["/v1/cart/suggestions", { method: "POST", body: JSON.stringify(body) }];
      }
      if (this.mode === "user") {
        return [`/v1/users/${enc(user)}/suggestions?k=${k}&placement=${enc(this.placement)}`,
                {}];
      }
      return null;
    }

    /** Fetch and render the answer now (also called on every attribute change). */
    async refresh() {
      const key = this.getAttribute("key");
      const request = this._request();
      if (!key || !request) {
        if (!key) this._fail(new Error("set the key attribute to a read API key"));
        else this._show(null);
        return;
      }
      try {
        const answer = await this._call(request[0], key, request[1]);
        const skip = new Set([...list(this.getAttribute("exclude")),
                              this.getAttribute("item")]);
        answer.items = answer.items.filter((s) => !skip.has(s.item_id));
        this._show(answer);
      } catch (err) {
        this._fail(err);
      }
    }

    _fail(err) {
      this.dataset.state = "error";
      console.warn(`cartwise-suggestions: ${err.message}`);
      this.dispatchEvent(new CustomEvent("cartwise-error", { detail: { error: err },
                                                             bubbles: true }));
    }

    _money(price) {
      if (price == null) return "";
      const currency = this.getAttribute("currency") || "EUR";
      const locale = this.getAttribute("locale") || undefined;
      return new Intl.NumberFormat(locale, { style: "currency", currency }).format(price);
    }

    _show(answer) {
      this.answer = answer;
      const items = answer ? answer.items : [];
      this.dataset.state = items.length ? "ready" : "empty";
      const style = document.createElement("style");
      style.textContent = STYLE;
      const mode = this.mode === "item" ? (this.getAttribute("kind") || "cross_sell")
        : this.mode;
      const h = document.createElement("h2");
      h.part = "heading";
      h.textContent = this.getAttribute("heading") || HEADINGS[mode] || "";
      const ol = document.createElement("ol");
      ol.part = "list";
      ol.append(...items.map((s) => this._card(s)));
      this._root.replaceChildren(style, h, ol);
      this._watch(items);
      if (answer) {
        this.dispatchEvent(new CustomEvent("cartwise-load", { detail: { answer },
                                                              bubbles: true }));
      }
    }

    _card(s) {
      const li = document.createElement("li");
      li.part = "item";
      li.dataset.item = s.item_id;
      li.dataset.kind = s.kind;
      const a = document.createElement("a");
      a.part = "link";
      const href = this.getAttribute("href");
      if (href) a.href = href.replaceAll("{item_id}", encodeURIComponent(s.item_id));
      else Object.assign(a, { tabIndex: 0, role: "link" });
      const name = document.createElement("span");
      name.part = "name";
      name.className = "name";
      name.textContent = s.name || s.item_id;
      const price = document.createElement("span");
      price.part = "price";
      price.className = "price";
      price.textContent = this._money(s.price);
      a.append(name, price);
      if (this.hasAttribute("show-reasons") && s.reason) {
        const why = document.createElement("span");
        why.part = "reason";
        why.className = "reason";
        why.textContent = s.reason;  // worded by the API, with names
        a.append(why);
      }
      a.addEventListener("click", (e) => this._clicked(e, s));
      a.addEventListener("keydown", (e) => { if (e.key === "Enter" && !href) this._clicked(e, s); });
      li.append(a);
      return li;
    }

    _clicked(e, s) {
      this._feedback("click", { item_id: s.item_id });
      const go = this.dispatchEvent(new CustomEvent("cartwise-click", {
        detail: { item: s, answer: this.answer }, bubbles: true, cancelable: true }));
      if (!go) e.preventDefault();  // the shop handles it (a single-page storefront)
    }

    // An impression counts a list the shopper could see: sent once half of it is on
    // screen, and once per distinct list (a refresh that changes nothing is not news).
    _watch(items) {
      if (this._observer) this._observer.disconnect();
      const shown = items.map((s) => s.item_id).join(",");
      if (!shown || shown === this._seen) return;
      const answer = this.answer;
      this._observer = new IntersectionObserver((entries) => {
        if (!entries.some((e) => e.isIntersecting) || answer !== this.answer) return;
        this._observer.disconnect();
        this._seen = shown;
        this._feedback("impression", { placement: this.placement,
                                       items: items.map((s) => ({ item_id: s.item_id })) });
      }, { threshold: 0.5 });
      this._observer.observe(this);
    }

    _feedback(type, fields) {
      const key = this.getAttribute("ingest-key");
      const user = this.getAttribute("user");
      const answer = this.answer;
      if (!key || !user || !answer) return;  // feedback needs an ingest key and a shopper
      const event = { event_id: eventId(), type, user_id: user, request_id: answer.request_id,
                      ...fields };
      if (type === "click") event.placement = this.placement;
      const session = this.getAttribute("session");
      if (session) event.session_id = session;
      if (answer.experiment) {
        event.experiment_id = answer.experiment.id;
        event.variant = answer.experiment.variant;
      }
      // keepalive: a click that navigates away is still delivered.
      this._call("/v1/events", key, { method: "POST", body: JSON.stringify(event),
                                      keepalive: true })
        .then(() => this.dispatchEvent(new CustomEvent("cartwise-feedback", {
          detail: { event }, bubbles: true })))
        .catch((err) => console.warn(`cartwise-suggestions: ${type} not sent: ${err.message}`));
    }
  }

  customElements.define("cartwise-suggestions", CartwiseSuggestions);
})();
