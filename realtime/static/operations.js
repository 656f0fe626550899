// The operations page (owners): live operating figures as small inline SVG charts.
//
// GET /v1/operations/stats every 2 s. Its `deployment` figures (queues, sends,
// deliveries) are the whole deployment's, read from Redis and Postgres; its `node`
// figures (API rate, p95, errors, connected clients) are those of the web process
// that answered (`node.hostname`, `node.pid`). Behind a load balancer another
// node may answer the next poll: its figures are its own, so the node charts
// start over when the answering node changes. Each chart keeps the last POINTS
// readings; a null reading (a store that did not answer, metrics off) is left out.

import { $, request, showConnection, signedIn } from "./app.js";

const EVERY_MS = 2000;
const POINTS = 60;
const BACKOFF_MS = 10000;
const WIDTH = 240;
const HEIGHT = 64;
const PAD = 3;
// The least top of each chart's scale, so that small noise is not drawn full height.
const FLOOR = { rate: 1, count: 1, seconds: 1, ms: 10, percent: 0.01 };

const charts = [...document.querySelectorAll("figure.chart")].map((figure) => ({
  figure,
  scope: figure.closest("[data-scope]").dataset.scope,
  format: figure.dataset.format,
  output: figure.querySelector("output"),
  series: [...figure.querySelectorAll("polyline")].map((line) => ({
    name: line.dataset.series,
    line,
    values: [],
  })),
}));
let node = null; // "hostname/pid" of the node whose figures the node charts hold

const me = await signedIn();
if (me.user.role !== "owner") {
  forbidden();
} else {
  poll();
}

async function poll() {
  let wait = EVERY_MS;
  if (!document.hidden) {
    try {
      const envelope = await request("GET", "/v1/operations/stats");
      showConnection("live");
      show(envelope.data);
    } catch (err) {
      if (err.status === 401) {
        location.reload(); // the session ended: back to the login form
        return;
      }
      if (err.status === 403) {
        forbidden();
        return;
      }
      showConnection("offline");
      if (err.status === 429) wait = BACKOFF_MS;
      else console.warn("operations figures:", err.message);
    }
  }
  setTimeout(poll, wait);
}

function forbidden() {
  $("#forbidden").hidden = false;
  for (const section of document.querySelectorAll("section.scope")) section.hidden = true;
}

function show(stats) {
  const { deployment, node: here } = stats;
  const unavailable = deployment.unavailable || [];
  const note = $("#deployment-note");
  note.hidden = unavailable.length === 0;
  note.textContent = unavailable.length
    ? `Not answering: ${unavailable.join(" and ")}; those figures are missing.`
    : "";
  setExtra("dead_letters", deployment.dead_letters);
  setExtra("provider_circuit", deployment.provider_circuit);

  const name = `${here.hostname}/${here.pid}`;
  if (node !== null && node !== name) {
    for (const chart of charts) if (chart.scope === "node") chart.series.forEach((s) => (s.values = []));
    const changed = $("#node-changed");
    changed.hidden = false;
    changed.textContent = `Another node answered (${node} before): its own figures from here on.`;
  }
  node = name;
  $("#node-name").textContent = `${here.hostname}, pid ${here.pid}`;
  $("#metrics-off").hidden = here.metrics !== false;
  setExtra("websocket_clients", here.websocket_clients);
  setExtra("sse_clients", here.sse_clients);

  for (const chart of charts) {
    const figures = chart.scope === "node" ? here : deployment;
    for (const series of chart.series) {
      series.values.push(figures[series.name] ?? null);
      if (series.values.length > POINTS) series.values.shift();
    }
    draw(chart);
  }
}

function setExtra(name, value) {
  for (const el of document.querySelectorAll(`[data-extra="${name}"]`)) {
    el.textContent = value === null || value === undefined ? "—" : String(value);
  }
}

function draw(chart) {
  const known = chart.series.flatMap((s) => s.values.filter((v) => v !== null));
  const top = niceCeil(Math.max(FLOOR[chart.format] || 1, ...known));
  const step = WIDTH / (POINTS - 1);
  let plotted = 0;
  for (const series of chart.series) {
    const offset = POINTS - series.values.length;
    const points = [];
    series.values.forEach((value, i) => {
      if (value === null) return;
      const x = (offset + i) * step;
      const y = HEIGHT - PAD - (value / top) * (HEIGHT - 2 * PAD);
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    });
    series.line.setAttribute("points", points.join(" "));
    plotted = Math.max(plotted, points.length);
  }
  const latest = chart.series.map((s) => s.values.at(-1) ?? null);
  const current = latest.every((v) => v === null)
    ? null
    : latest.reduce((sum, v) => sum + (v ?? 0), 0);
  chart.figure.dataset.points = String(plotted);
  chart.figure.dataset.latest = current === null ? "" : String(current);
  chart.figure.dataset.top = String(top);
  chart.output.textContent = format(current, chart.format);
  chart.figure.title = `scale 0 to ${format(top, chart.format)}`;
}

// 1, 2 or 5 times a power of ten, at least `value`.
function niceCeil(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 5, 10]) if (m * power >= value) return m * power;
  return 10 * power;
}

function format(value, kind) {
  if (value === null) return "—";
  switch (kind) {
    case "rate":
      return `${round(value)} /s`;
    case "seconds":
      return value < 60 ? `${round(value)} s` : `${Math.round(value / 60)} min`;
    case "ms":
      return `${round(value)} ms`;
    case "percent":
      return `${round(value * 100)} %`;
    default:
      return String(Math.round(value));
  }
}

function round(value) {
  if (value === 0) return "0";
  if (Math.abs(value) >= 100) return String(Math.round(value));
  if (Math.abs(value) >= 10) return value.toFixed(1);
  return value.toFixed(2);
}
