// The dashboard: recent broadcasts with live progress bars, over SSE.
//
// /v1/events?channel=dashboard carries message.created, message.progress and
// message.completed. EventSource reconnects by itself and resumes with
// Last-Event-ID; the state is (re)loaded from REST when the stream first opens
// and whenever the server says it could not recover the channel.

import { $, api, formatTime, showConnection, signedIn } from "./app.js";

const SHOWN = 20;
const FINAL = ["delivered", "failed", "undelivered", "skipped"];
// Recipients only move forward (queued → sending → sent → final), so the sum of
// their stages never decreases: of two snapshots of counts, the larger is newer.
const STAGE = { queued: 0, sending: 1, sent: 2, delivered: 3, failed: 3, undelivered: 3, skipped: 3 };

const broadcasts = new Map(); // message id -> {id, body, status, recipient_count, counts, created_at}
const rows = new Map(); // message id -> <li>
let held = null; // events that arrive while REST is loading

await signedIn();
listen();

function listen() {
  const stream = new EventSource("/v1/events?channel=dashboard");
  let loaded = false;
  stream.addEventListener("open", () => showConnection("live"));
  stream.addEventListener("ready", () => {
    if (!loaded) {
      loaded = true;
      reload();
    }
  });
  stream.addEventListener("recovery_failed", reload);
  for (const type of ["message.created", "message.progress", "message.completed"]) {
    stream.addEventListener(type, (message) => {
      const event = JSON.parse(message.data).event;
      if (held) held.push(event);
      else apply(event);
    });
  }
  stream.addEventListener("error", async () => {
    showConnection("offline");
    if (stream.readyState !== EventSource.CLOSED) return; // the browser retries by itself
    // Refused outright (signed out, or the server answered with an error): check
    // the session, then start over.
    const me = await api("GET", "/v1/me").catch((err) => err);
    if (me.status === 401) {
      location.reload();
      return;
    }
    setTimeout(listen, 3000);
  });
}

async function reload() {
  const mine = [];
  held = mine;
  try {
    const recent = await api("GET", `/v1/messages?limit=${SHOWN}`);
    const detailed = await Promise.all(
      recent.map((m) => api("GET", `/v1/messages/${m.id}`).catch(() => m)));
    broadcasts.clear();
    for (const message of detailed) merge(message.id, message);
    render();
  } catch (err) {
    console.error("reload failed:", err.message);
  } finally {
    if (held === mine) {
      held = null;
      mine.forEach(apply);
    }
  }
}

function apply(event) {
  const data = event.data;
  switch (event.type) {
    case "message.created":
      merge(data.message_id, { status: data.status, recipient_count: data.recipient_count });
      api("GET", `/v1/messages/${data.message_id}`).then(
        (message) => { merge(message.id, message); render(); },
        () => {});
      break;
    case "message.progress":
      merge(data.message_id, { counts: data.counts, recipient_count: data.recipient_count });
      break;
    case "message.completed":
      merge(data.message_id, { counts: data.counts, status: "completed" });
      break;
    default:
      return;
  }
  render();
}

// Fold what is known about a broadcast into its entry, never going backwards.
function merge(id, known) {
  const entry = broadcasts.get(id) || { id, body: "", status: "queued", recipient_count: 0 };
  if (known.body !== undefined) entry.body = known.body;
  if (known.created_at !== undefined) entry.created_at = known.created_at;
  if (known.recipient_count !== undefined) entry.recipient_count = known.recipient_count;
  if (known.status !== undefined && entry.status !== "completed") entry.status = known.status;
  if (known.counts && (!entry.counts || stage(known.counts) >= stage(entry.counts))) {
    entry.counts = known.counts;
  }
  broadcasts.set(id, entry);
}

function stage(counts) {
  return Object.entries(STAGE).reduce((sum, [status, weight]) => sum + (counts[status] || 0) * weight, 0);
}

function percent(entry) {
  if (entry.status === "completed") return 100;
  const total = entry.recipient_count;
  if (!total || !entry.counts) return 0;
  const done = FINAL.reduce((sum, status) => sum + (entry.counts[status] || 0), 0);
  return Math.min(100, Math.floor((done * 100) / total));
}

function render() {
  // Message ids are UUIDv7: in string order they are in time order.
  const newest = [...broadcasts.values()].sort((a, b) => (a.id < b.id ? 1 : -1));
  for (const dropped of newest.splice(SHOWN)) broadcasts.delete(dropped.id);
  const list = $("#broadcasts");
  $("#no-broadcasts").hidden = newest.length > 0;
  for (const entry of newest) {
    const row = rows.get(entry.id) || newRow(entry.id);
    fillRow(row, entry);
    list.appendChild(row);
  }
  for (const [id, row] of rows) {
    if (!broadcasts.has(id)) {
      row.remove();
      rows.delete(id);
    }
  }
}

function newRow(id) {
  const row = document.createElement("li");
  row.dataset.messageId = id;
  const head = document.createElement("div");
  head.className = "row-head";
  const body = document.createElement("span");
  body.className = "body";
  const time = document.createElement("time");
  const status = document.createElement("span");
  status.className = "pill";
  head.append(body, time, status);
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.setAttribute("aria-label", "Delivery progress");
  const sent = document.createElement("div");
  sent.className = "sent";
  const done = document.createElement("div");
  done.className = "done";
  bar.append(sent, done);
  const summary = document.createElement("p");
  summary.className = "summary";
  row.append(head, bar, summary);
  rows.set(id, row);
  return row;
}

function fillRow(row, entry) {
  const value = percent(entry);
  const counts = entry.counts || {};
  const total = entry.recipient_count;
  const finished = FINAL.reduce((sum, status) => sum + (counts[status] || 0), 0);
  const sentShare = total ? Math.min(100, ((finished + (counts.sent || 0)) * 100) / total) : value;
  row.dataset.status = entry.status;
  row.dataset.percent = String(value);
  row.querySelector(".body").textContent = entry.body || "(loading…)";
  const time = row.querySelector("time");
  if (entry.created_at) {
    time.dateTime = entry.created_at;
    time.textContent = formatTime(entry.created_at);
  }
  row.querySelector(".pill").textContent = entry.status;
  row.querySelector(".pill").dataset.status = entry.status;
  const bar = row.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(value));
  bar.setAttribute("aria-valuetext", `${value} %`);
  bar.querySelector(".done").style.width = `${value}%`;
  bar.querySelector(".sent").style.width = `${Math.max(value, sentShare)}%`;
  row.querySelector(".summary").textContent =
    `${value} % · ${finished} of ${total} done · ${counts.delivered || 0} delivered · ` +
    `${(counts.failed || 0) + (counts.undelivered || 0)} failed · ${counts.skipped || 0} skipped`;
}
