// Reads GET /v1/experiments and /v1/experiments/{id}/report with the admin key typed in;
// draws each variant's value of the chosen metric with its 95% interval.
"use strict";
const $ = (id) => document.getElementById(id);
const key = () => sessionStorage.getItem("cw-admin-key") || "";
let report = null;

async function api(path) {
  const r = await fetch(path, { headers: { "X-API-Key": key() } });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? `${body.error.reason}: ${body.error.detail}` : r.status);
  return body;
}

function fmt(v, metric) {
  if (v === null || v === undefined) return "–";
  return metric.endsWith("rate") || metric === "ctr" ? (100 * v).toFixed(1) + "%" : v.toFixed(2);
}

function chart(metric) {
  const rows = report.variants.map((r) => ({ name: r.variant, ...r[metric] }));
  const hi = Math.max(1e-9, ...rows.map((r) => r.ci95[1] ?? r.value ?? 0));
  const W = 640, H = 40 + 44 * rows.length, left = 140, width = W - left - 80;
  const x = (v) => left + width * Math.max(0, v) / hi;
  let svg = `<svg width="${W}" height="${H}" role="img" aria-label="${metric} by variant">`;
  rows.forEach((r, n) => {
    const y = 20 + 44 * n;
    svg += `<text x="0" y="${y + 18}">${r.name}</text>`;
    if (r.value !== null && r.value !== undefined) {
      svg += `<rect x="${left}" y="${y + 4}" width="${x(r.value) - left}" height="20" fill="#7aa6d8"/>`;
      if (r.ci95[0] !== null) {
        svg += `<line x1="${x(r.ci95[0])}" x2="${x(r.ci95[1])}" y1="${y + 14}" y2="${y + 14}" stroke="#222" stroke-width="2"/>`;
      }
      svg += `<text x="${x(r.ci95[1] ?? r.value) + 6}" y="${y + 18}">${fmt(r.value, metric)}</text>`;
    }
  });
  $("chart").innerHTML = svg + "</svg>";
}

function table() {
  const cols = ["shoppers", "impressions", "clicks", "conversions", "orders"];
  const rates = ["ctr", "conversion_rate", "cross_sell_rate", "average_order_value", "revenue_per_shopper"];
  let html = "<tr><th>variant</th>" + cols.concat(rates).map((c) => `<th>${c.replaceAll("_", " ")}</th>`).join("") + "<th>p (vs control)</th></tr>";
  for (const r of report.variants) {
    const p = r.vs_control ? r.vs_control[report.metric].p_value : null;
    html += `<tr><td>${r.variant}</td>` + cols.map((c) => `<td>${r[c]}</td>`).join("") +
      rates.map((m) => `<td>${fmt(r[m].value, m)}</td>`).join("") +
      `<td>${p === null ? "–" : p.toPrecision(2)}</td></tr>`;
  }
  $("table").innerHTML = html;
}

async function show() {
  const id = $("experiment").value;
  if (!id) return;
  try {
    const got = await api(`/v1/experiments/${encodeURIComponent(id)}/report`);
    if ($("experiment").value !== id) return;  // another experiment was chosen meanwhile
    report = got;
    $("chart").dataset.experiment = id;
    $("verdict").textContent = `${report.status}: ${report.verdict}`;
    chart($("metric").value);
    table();
    $("status").textContent = "";
  } catch (e) { $("status").innerHTML = `<span class="error">${e.message}</span>`; }
}

async function load() {
  sessionStorage.setItem("cw-admin-key", $("key").value || key());
  try {
    const { experiments } = await api("/v1/experiments");
    $("experiment").innerHTML = experiments.map((e) => `<option>${e.id}</option>`).join("");
    if (!experiments.length) $("status").textContent = "no experiments defined";
    await show();
  } catch (e) { $("status").innerHTML = `<span class="error">${e.message}</span>`; }
}

$("load").onclick = load;
$("experiment").onchange = show;
$("metric").onchange = () => report && chart($("metric").value);
if (key()) load();
