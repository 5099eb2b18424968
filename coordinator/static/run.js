// The run page: polls /api/run and redraws (coordinator/runpage.py builds the document).
// No library, no CDN: plain DOM and SVG, so the page works offline.
"use strict";

const REFRESH_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const W = 600, H = 240, PAD = { left: 44, right: 12, top: 10, bottom: 26 };

function $(id) { return document.getElementById(id); }

function fmt(value, digits) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value.toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function ago(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  return `${Math.round(seconds / 60)} min ago`;
}

// A line chart of [[x, y], ...] series, plus optional dots; every series shares the axes.
function chart(svg, lines, dots) {
  svg.replaceChildren();
  const points = lines.flatMap(l => l.points).concat(dots ? dots.points : []);
  svg.dataset.points = String(points.length);
  if (points.length === 0) {
    svg.append(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
    return;
  }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 + 1e-3; y1 += Math.abs(y1) * 0.1 + 1e-3; }
  const margin = (y1 - y0) * 0.08; y0 -= margin; y1 += margin;
  const sx = x => PAD.left + (x - x0) / (x1 - x0) * (W - PAD.left - PAD.right);
  const sy = y => H - PAD.bottom - (y - y0) / (y1 - y0) * (H - PAD.top - PAD.bottom);
  svg.append(el("svg:line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: "axis" }));
  svg.append(el("svg:line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom, class: "axis" }));
  for (const y of [y0 + margin, (y0 + y1) / 2, y1 - margin]) {
    svg.append(el("svg:text", { x: PAD.left - 4, y: sy(y) + 4, "text-anchor": "end" }, fmt(y, y1 - y0 < 1 ? 3 : 1)));
  }
  svg.append(el("svg:text", { x: PAD.left, y: H - 8 }, `round ${Math.round(x0)}`));
  svg.append(el("svg:text", { x: W - PAD.right, y: H - 8, "text-anchor": "end" }, `round ${Math.round(x1)}`));
  for (const line of lines) {
    if (line.points.length === 0) continue;
    const d = line.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    svg.append(el("svg:path", { d, class: line.cls, "data-series": line.cls }));
  }
  if (dots) {
    for (const p of dots.points) {
      const dot = el("svg:circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 4, class: dots.cls });
      dot.append(el("svg:title", {}, `round ${p[0]}: ${fmt(p[1], 4)}`));
      svg.append(dot);
    }
  }
}

function rows(tbody, items, cells) {
  tbody.replaceChildren(...items.map(item => {
    const tr = el("tr");
    for (const cell of cells(item)) {
      const td = el("td");
      if (cell instanceof Node) td.append(cell); else td.textContent = cell;
      tr.append(td);
    }
    return tr;
  }));
}

function render(data) {
  const s = data.status;
  document.title = `${data.name}: round ${s.global_round} · Barnraise`;
  $("run-name").textContent = data.name;
  $("run-id").textContent = data.run_id;
  const last = s.last_checkpoint;
  $("summary").textContent = `${s.alive_peers} live peer${s.alive_peers === 1 ? "" : "s"}, ` +
    `${fmt(data.verified_samples, 0)} verified samples, ${s.rejected_records} records rejected at the last read` +
    (last ? `; last checkpoint: entry ${last.seq}, round ${last.round}` : "");
  // the live peers' median round, from records stored every 40 s, or the latest replayed round's next
  const replayed = data.throughput.length ? data.throughput[data.throughput.length - 1][0] + 1 : 0;
  $("card-round").textContent = fmt(Math.max(s.global_round, replayed), 0);
  $("card-peers").textContent = fmt(s.alive_peers, 0);
  const latest = data.throughput.length ? data.throughput[data.throughput.length - 1][1] : s.samples_per_second;
  $("card-rate").textContent = fmt(latest, 1);
  $("card-heldout").textContent = last ? fmt(last.heldout_loss, 3) : "–";
  $("card-ledger").textContent = fmt(data.ledger_entries, 0);

  chart($("loss-chart"), [{ points: data.training_loss, cls: "train" }], { points: data.heldout_loss, cls: "heldout" });
  chart($("rate-chart"), [{ points: data.throughput.map(p => [p[0], p[1]]), cls: "rate" }]);

  $("join-url").textContent = data.join.url;
  $("join-maddr-row").hidden = !data.join.multiaddr;
  $("join-maddr").textContent = data.join.multiaddr || "";
  $("private-note").hidden = !data.private;
  $("audit").textContent = data.audit;

  rows($("peers").tBodies[0], data.peers, p => {
    const reached = el("span", { class: p.relayed ? "relayed" : "" }, p.relayed ? "relayed" : "direct");
    return [el("code", { title: p.peer_id }, p.short_id), fmt(p.round, 0), fmt(p.samples_per_second, 1),
            fmt(p.group, 0), fmt(p.network_seconds, 2), reached, ago(p.last_seen)];
  });
  for (const [i, tr] of Array.from($("peers").tBodies[0].rows).entries()) tr.dataset.peerId = data.peers[i].peer_id;

  rows($("leaderboard").tBodies[0], data.leaderboard, r =>
    [String(r.rank), el("code", { title: r.peer_id }, r.peer_id), fmt(r.samples, 0), `${fmt(100 * r.share, 1)} %`]);
  $("ledger-count").textContent = `${data.ledger_entries} entries`;
  rows($("ledger").tBodies[0], data.ledger, e =>
    [String(e.seq), fmt(e.round, 0), el("code", { title: e.root }, e.root.slice(0, 16)), fmt(e.heldout_loss, 3),
     fmt(e.samples, 0)]);
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function refresh() {
  try {
    const response = await fetch("/api/run", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${(await response.text()).slice(0, 200)}`);
    render(await response.json());
    $("problem").hidden = true;
  } catch (error) {
    $("problem").textContent = `cannot read the run (retrying): ${error.message}`;
    $("problem").hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

function copy(button) {
  const text = $(button.dataset.copy).textContent;
  const done = () => { button.textContent = "copied"; setTimeout(() => { button.textContent = "copy"; }, 1500); };
  const select = () => {  // no clipboard (plain http, or refused): select the text for Ctrl+C
    const range = document.createRange();
    range.selectNodeContents($(button.dataset.copy));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = "selected";
  };
  if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, select);
  else select();
}

document.addEventListener("click", event => {
  const button = event.target.closest("button[data-copy]");
  if (button) copy(button);
});
refresh();
