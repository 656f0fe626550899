// The dashboard: a composer (audience, body with a live segment counter,
// media, schedule, the estimate before sending), recent broadcasts with live
// progress, their estimate and a delivery-over-time chart, and the keywords.
//
// /v1/events?channel=dashboard carries message.created, message.progress and
// message.completed. EventSource reconnects by itself and resumes with
// Last-Event-ID; the state is (re)loaded from REST when the stream first opens
// and whenever the server says it could not recover the channel.

import { $, api, formatTime, showConnection, signedIn } from "./app.js";
import { countSegments, nonGsmCharacters } from "./segments.js";

const SHOWN = 20;
const FINAL = ["delivered", "failed", "undelivered", "skipped"];
// Recipients only move forward (queued → sending → sent → final), so the sum of
// their stages never decreases: of two snapshots of counts, the larger is newer.
const STAGE = { queued: 0, sending: 1, sent: 2, delivered: 3, failed: 3, undelivered: 3, skipped: 3 };
const MAX_MEDIA = 10;
const ESTIMATE_DELAY_MS = 400;
// Progress events come up to 10 a second per broadcast; the estimate and the
// chart are read again at most this often while it runs.
const REFRESH_MS = 2000;

const broadcasts = new Map(); // message id -> {id, body, status, recipient_count, counts, created_at, estimate, ...}
const rows = new Map(); // message id -> <li>
let held = null; // events that arrive while REST is loading

const groups = new Map(); // id -> {id, name, member_count}
const branches = new Map(); // id -> {id, name}
const templates = new Map(); // id -> {id, name, body}
const chosenMembers = new Map(); // id -> label
const attachments = []; // {id, content_type, size, url, name}

function showError(box, err) {
  const prefix = box.id;
  $(`#${prefix}-message`).textContent = err.message;
  const list = $(`#${prefix}-details`);
  list.replaceChildren(...err.details.map((detail) => {
    const item = document.createElement("li");
    item.textContent = detail.field ? `${fieldName(detail.field)}: ${detail.message}` : detail.message;
    return item;
  }));
  box.hidden = false;
}

// "target.group_ids" -> "Audience": the form's name for the field.
function fieldName(field) {
  const top = String(field).split(/[.[]/)[0];
  return { target: "Audience", body: "Message", media_ids: "Media", send_at: "Send at",
    template_id: "Template", keyword: "Keyword", group_id: "Group", reply: "Reply" }[top] || field;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function number(n) {
  return Number(n || 0).toLocaleString();
}

function plural(n, one, many) {
  return `${number(n)} ${n === 1 ? one : many}`;
}

// "14:32" today, "Dec 4, 14:32" on another day; with seconds for short spans.
function clock(iso, seconds = false) {
  const at = new Date(iso);
  const time = at.toLocaleTimeString([], {
    hour: "numeric", minute: "2-digit", ...(seconds ? { second: "2-digit" } : {}),
  });
  if (new Date().toDateString() === at.toDateString()) return time;
  return `${at.toLocaleDateString([], { month: "short", day: "numeric" })}, ${time}`;
}

function bytes(size) {
  if (size < 1024) return `${size} B`;
  if (size < 1024 * 1024) return `${Math.round(size / 1024)} KB`;
  return `${(size / 1024 / 1024).toFixed(1)} MB`;
}

// ---------------------------------------------------------------- broadcasts

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
    for (const message of detailed) refreshSoon(message.id);
  } catch (err) {
    console.warn("reload failed:", err.message);
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
      refreshSoon(data.message_id);
      break;
    case "message.completed":
      merge(data.message_id, { counts: data.counts, status: "completed" });
      refreshSoon(data.message_id, true);
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
  if (known.completed_at !== undefined) entry.completed_at = known.completed_at;
  if (known.send_at !== undefined) entry.send_at = known.send_at;
  if (known.estimate !== undefined) entry.estimate = known.estimate;
  if (known.media_ids !== undefined) entry.media_ids = known.media_ids;
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
  newest.forEach((entry, index) => {
    const row = rows.get(entry.id) || newRow(entry.id);
    fillRow(row, entry);
    if (list.children[index] !== row) list.insertBefore(row, list.children[index] || null);
  });
  for (const [id, row] of rows) {
    if (!broadcasts.has(id)) {
      row.remove();
      rows.delete(id);
      charts.delete(id);
    }
  }
}

function newRow(id) {
  const bar = el("div", {
    class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
    "aria-label": "Delivery progress",
  }, el("div", { class: "sent" }), el("div", { class: "done" }));
  const row = el("li", { data: { messageId: id } },
    el("div", { class: "row-head" },
      el("span", { class: "body" }),
      el("time", { class: "created" }),
      el("span", { class: "pill" })),
    bar,
    el("div", { class: "row-facts" },
      el("p", { class: "summary" }),
      el("p", { class: "eta" })),
    el("figure", { class: "chart" },
      chartSvg(),
      el("span", { class: "chart-empty" }),
      el("figcaption", { class: "chart-axis" },
        el("span", { class: "from" }), el("span", { class: "to" }))));
  rows.set(id, row);
  visible.observe(row);
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
  row.querySelector(".body").textContent = entry.body || (entry.media_ids && entry.media_ids.length ? "(picture)" : "(loading…)");
  row.querySelector(".body").title = entry.body || "";
  const time = row.querySelector("time.created");
  if (entry.created_at) {
    time.dateTime = entry.created_at;
    time.textContent = formatTime(entry.created_at);
  }
  const pill = row.querySelector(".pill");
  pill.textContent = entry.status;
  pill.dataset.status = entry.status;
  const bar = row.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(value));
  bar.setAttribute("aria-valuetext", `${value} %`);
  bar.querySelector(".done").style.width = `${value}%`;
  bar.querySelector(".sent").style.width = `${Math.max(value, sentShare)}%`;
  row.querySelector(".summary").textContent =
    `${value} % · ${finished} of ${total} done · ${counts.delivered || 0} delivered · ` +
    `${(counts.failed || 0) + (counts.undelivered || 0)} failed · ${counts.skipped || 0} skipped`;
  const eta = row.querySelector(".eta");
  const finishes = entry.estimate && entry.estimate.finishes_at;
  if (entry.status === "completed") {
    eta.textContent = entry.completed_at ? `finished ${clock(entry.completed_at)}` : "finished";
    eta.dataset.kind = "finished";
  } else if (entry.status === "canceled") {
    eta.textContent = "canceled";
    eta.dataset.kind = "canceled";
  } else if (finishes) {
    eta.textContent = entry.status === "scheduled" && entry.send_at
      ? `starts ${clock(entry.send_at)} · done by ${clock(finishes)}`
      : `done by ${clock(finishes)}`;
    eta.dataset.kind = "estimate";
    eta.title = `Estimated: every recipient handed to the carrier by ${new Date(finishes).toLocaleString()}`;
  } else {
    eta.textContent = "";
    eta.dataset.kind = "none";
  }
  drawChart(row, entry);
}

// ---------------------------------------------------------------- estimate and chart refresh

// Rows on screen get their chart; the others wait until scrolled to.
const onScreen = new Set();
const visible = new IntersectionObserver((seen) => {
  for (const item of seen) {
    const id = item.target.dataset.messageId;
    if (item.isIntersecting) {
      onScreen.add(id);
      if (!charts.has(id)) refreshSoon(id, true);
    } else {
      onScreen.delete(id);
    }
  }
});

const charts = new Map(); // message id -> {timeline, recipient_count}
const refreshing = new Map(); // message id -> {timer, last, again}

// Read the broadcast's estimate and analytics again, at most every REFRESH_MS
// per broadcast; `now` skips the wait (the final state of a completed one).
function refreshSoon(id, now = false) {
  const state = refreshing.get(id) || { timer: null, last: 0, busy: false, again: false };
  refreshing.set(id, state);
  if (state.busy) {
    state.again = true;
    return;
  }
  if (state.timer) {
    if (!now) return;
    clearTimeout(state.timer);
  }
  const wait = now ? 0 : Math.max(0, state.last + REFRESH_MS - Date.now());
  state.timer = setTimeout(() => refresh(id, state), wait);
}

async function refresh(id, state) {
  state.timer = null;
  state.busy = true;
  state.last = Date.now();
  try {
    if (!broadcasts.has(id)) return;
    const entry = broadcasts.get(id);
    const running = entry.status !== "completed" || !entry.completed_at;
    const [detail, analytics] = await Promise.all([
      running ? api("GET", `/v1/messages/${id}`).catch(() => null) : null,
      onScreen.has(id) || charts.has(id)
        ? api("GET", `/v1/messages/${id}/analytics`).catch(() => null)
        : null,
    ]);
    if (detail) merge(id, detail);
    if (analytics) charts.set(id, { timeline: analytics.timeline || null });
    if (broadcasts.has(id)) fillRow(rows.get(id), broadcasts.get(id));
  } finally {
    state.busy = false;
    if (state.again) {
      state.again = false;
      // A row that came on screen meanwhile gets its chart at once.
      refreshSoon(id, onScreen.has(id) && !charts.has(id));
    }
  }
}

// ---------------------------------------------------------------- the chart

const CHART_W = 320;
const CHART_H = 64;
const SERIES = ["sent", "delivered", "failed"];

// Fixed markup, parsed as HTML: the parser puts <svg> in the SVG namespace.
function chartSvg() {
  const grid = [0.5, 1].map((share) => {
    const y = CHART_H - share * (CHART_H - 4);
    return `<line class="grid" x1="0" x2="${CHART_W}" y1="${y}" y2="${y}"></line>`;
  }).join("");
  const lines = SERIES.map((name) =>
    `<polyline class="series ${name}" data-series="${name}" points=""></polyline>`).join("");
  const holder = document.createElement("div");
  holder.innerHTML =
    `<svg class="timeline" viewBox="0 0 ${CHART_W} ${CHART_H}" preserveAspectRatio="none" ` +
    `role="img"><title></title>${grid}${lines}</svg>`;
  return holder.firstElementChild;
}

// The timeline's points as running totals. storage/pg/analytics.py gives each
// bucket's own counts (what happened within it), so they are summed here.
function cumulative(points) {
  const total = { sent: 0, delivered: 0, failed: 0 };
  return points.map((point) => {
    for (const name of SERIES) total[name] += point[name] || 0;
    return { at: point.at, ...total };
  });
}

function drawChart(row, entry) {
  const svg = row.querySelector("svg.timeline");
  const known = charts.get(entry.id);
  const points = known && known.timeline ? cumulative(known.timeline.points || []) : [];
  // Text outside the SVG: the drawing stretches to the row's width, text must not.
  const empty = row.querySelector(".chart-empty");
  row.querySelector(".chart").dataset.points = String(points.length);
  const from = row.querySelector(".chart-axis .from");
  const to = row.querySelector(".chart-axis .to");
  if (points.length === 0) {
    for (const line of svg.querySelectorAll("polyline")) line.setAttribute("points", "");
    empty.textContent = !known ? "" : entry.status === "scheduled" ? "Not started" : "No sends yet";
    svg.querySelector("title").textContent = "Delivery over time: nothing sent yet";
    from.textContent = "";
    to.textContent = "";
    return;
  }
  empty.textContent = "";
  const first = Date.parse(points[0].at);
  const bucket = (known.timeline.bucket_s || 1) * 1000;
  const lastPoint = Date.parse(points[points.length - 1].at) + bucket;
  // While it runs, the time axis reaches to the estimate, so the lines grow
  // towards the right edge as the broadcast nears its end.
  const running = entry.status !== "completed" && entry.status !== "canceled";
  const finishes = running && entry.estimate && entry.estimate.finishes_at
    ? Date.parse(entry.estimate.finishes_at) : 0;
  const last = Math.max(lastPoint, finishes, first + bucket);
  const top = Math.max(entry.recipient_count || 0, ...points.map((p) => p.sent + p.failed), 1);
  const x = (ms) => (((ms - first) / (last - first)) * CHART_W).toFixed(1);
  const y = (value) => (CHART_H - 2 - (value / top) * (CHART_H - 4)).toFixed(1);
  for (const name of SERIES) {
    const line = svg.querySelector(`polyline.${name}`);
    const coords = [`0,${y(0)}`];
    // A bucket's running total holds at its end.
    for (const point of points) coords.push(`${x(Date.parse(point.at) + bucket)},${y(point[name])}`);
    line.setAttribute("points", coords.join(" "));
  }
  const end = points[points.length - 1];
  svg.querySelector("title").textContent =
    `Delivery over time: ${number(end.sent)} sent, ${number(end.delivered)} delivered, ` +
    `${number(end.failed)} failed`;
  const short = last - first < 10 * 60 * 1000;
  from.textContent = clock(points[0].at, short);
  to.textContent = clock(new Date(last).toISOString(), short);
}

// ---------------------------------------------------------------- composer

function setUpComposer() {
  const form = $("#composer");
  for (const radio of form.elements.audience) {
    radio.addEventListener("change", () => {
      showPicker();
      composerChanged();
    });
  }
  $("#body").addEventListener("input", () => {
    updateCounter();
    const template = templates.get($("#template").value);
    if (template && template.body !== $("#body").value) $("#template").value = "";
    composerChanged();
  });
  $("#template").addEventListener("change", () => {
    const template = templates.get($("#template").value);
    if (template) $("#body").value = template.body;
    updateCounter();
    composerChanged();
  });
  $("#attach").addEventListener("change", async (change) => {
    const files = [...change.target.files];
    change.target.value = "";
    await attach(files);
  });
  $("#schedule-on").addEventListener("change", () => {
    const input = $("#send-at");
    input.hidden = !$("#schedule-on").checked;
    if (!input.hidden && !input.value) {
      // Tomorrow at 9, a sensible first guess for a church notice.
      const at = new Date(Date.now() + 86400000);
      at.setHours(9, 0, 0, 0);
      input.value = localInput(at);
    }
    updateSendLabel();
    composerChanged();
  });
  $("#send-at").addEventListener("input", composerChanged);
  let searchTimer = null;
  $("#member-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(searchMembers, 250);
  });
  form.addEventListener("submit", (submit) => {
    submit.preventDefault();
    send();
  });
  updateCounter();
  updateSendLabel();
}

function localInput(at) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())}T${pad(at.getHours())}:${pad(at.getMinutes())}`;
}

async function loadChoices() {
  const [groupList, branchList, templateList] = await Promise.all([
    api("GET", "/v1/groups?limit=200").catch(() => []),
    api("GET", "/v1/branches?limit=200").catch(() => []),
    api("GET", "/v1/templates?limit=200").catch(() => []),
  ]);
  for (const group of groupList) groups.set(group.id, group);
  for (const branch of branchList) branches.set(branch.id, branch);
  for (const template of templateList) templates.set(template.id, template);
  fillOptions("#group-options", "#no-groups", groupList, "group_ids",
    (group) => `${group.name}`, (group) => plural(group.member_count, "member", "members"));
  fillOptions("#branch-options", "#no-branches", branchList, "branch_ids", (branch) => branch.name, () => "");
  $("#template").append(...templateList.map((t) => el("option", { value: t.id }, t.name)));
  $("#template").closest(".template-pick").hidden = templateList.length === 0;
  const keywordGroup = $("#keyword-group");
  keywordGroup.replaceChildren(...groupList.map((g) => el("option", { value: g.id }, g.name)));
  renderKeywords();
  loadKeywords();
}

function fillOptions(listSelector, emptySelector, items, name, label, note) {
  const list = $(listSelector);
  list.replaceChildren(...items.map((item) => el("li", {},
    el("label", {},
      el("input", { type: "checkbox", name, value: item.id, onchange: composerChanged }),
      el("span", { class: "name" }, label(item)),
      el("span", { class: "muted count" }, note(item))))));
  $(emptySelector).hidden = items.length > 0;
}

function audience() {
  return $("#composer").elements.audience.value;
}

function showPicker() {
  const kind = audience();
  for (const picker of document.querySelectorAll(".picker")) {
    picker.hidden = picker.dataset.kind !== kind;
  }
  if (kind === "members") $("#member-search").focus();
}

async function searchMembers() {
  const q = $("#member-search").value.trim();
  const list = $("#member-options");
  if (!q) {
    list.replaceChildren();
    return;
  }
  const found = await api("GET", `/v1/members?limit=8&q=${encodeURIComponent(q)}`).catch(() => []);
  if ($("#member-search").value.trim() !== q) return; // a newer search is on its way
  list.replaceChildren(...found.map((member) => {
    const name = [member.first_name, member.last_name].filter(Boolean).join(" ") || member.phone;
    return el("li", {}, el("button", {
      type: "button", class: "option",
      onclick: () => {
        chosenMembers.set(member.id, name);
        renderChosen();
        composerChanged();
      },
    }, name, el("span", { class: "muted" }, member.phone || "")));
  }));
}

function renderChosen() {
  $("#member-chosen").replaceChildren(...[...chosenMembers].map(([id, name]) => el("li", { class: "chip" },
    name,
    el("button", {
      type: "button", class: "remove", "aria-label": `Remove ${name}`,
      onclick: () => {
        chosenMembers.delete(id);
        renderChosen();
        composerChanged();
      },
    }, "×"))));
}

function checked(name) {
  return [...$("#composer").querySelectorAll(`input[name=${name}]:checked`)].map((box) => box.value);
}

function target() {
  switch (audience()) {
    case "groups": return { group_ids: checked("group_ids") };
    case "branches": return { branch_ids: checked("branch_ids") };
    case "members": return { member_ids: [...chosenMembers.keys()] };
    default: return { all: true };
  }
}

function targetChosen(chosen) {
  return chosen.all || Object.values(chosen).some((ids) => ids.length > 0);
}

// The body of POST /v1/messages (and of the estimate) as the form stands.
function request() {
  const out = { target: target() };
  const text = $("#body").value;
  const template = templates.get($("#template").value);
  if (template && template.body === text) out.template_id = template.id;
  else if (text.length > 0 || attachments.length === 0) out.body = text;
  if (attachments.length > 0) out.media_ids = attachments.map((a) => a.id);
  if ($("#schedule-on").checked && $("#send-at").value) {
    out.send_at = new Date($("#send-at").value).toISOString();
  }
  return out;
}

function updateCounter() {
  const text = $("#body").value;
  const info = countSegments(text);
  const counter = $("#counter");
  counter.dataset.encoding = info.encoding;
  counter.dataset.segments = String(info.segments);
  counter.dataset.units = String(info.units);
  const limit = info.segments === 1 ? info.perPart : info.perPart * info.segments;
  $("#counter-units").textContent = info.segments === 1
    ? `${info.units} / ${info.perPart}`
    : `${info.units} · ${info.left} left in part ${info.segments}`;
  $("#counter-units").title = `${info.encoding === "GSM-7" ? "septets" : "UTF-16 units"}; ${limit} fit in ${plural(info.segments, "part", "parts")}`;
  $("#counter-encoding").textContent = info.encoding;
  $("#counter-segments").textContent = plural(info.segments, "part", "parts");
  counter.classList.toggle("multi", info.segments > 1);
  const note = $("#ucs2-note");
  if (info.encoding === "UCS-2" && text.length > 0) {
    const odd = nonGsmCharacters(text);
    note.textContent = `${odd.slice(0, 5).join(" ")} ${odd.length > 1 ? "are" : "is"} not in the ` +
      `GSM alphabet: the text goes as UCS-2, ${info.segments === 1 ? 70 : 67} characters a part.`;
    note.hidden = false;
  } else {
    note.hidden = true;
  }
}

function updateSendLabel() {
  $("#send").textContent = $("#schedule-on").checked ? "Schedule" : "Send";
}

// ---------------------------------------------------------------- the estimate

let estimateTimer = null;
let estimateSeq = 0;

function composerChanged() {
  $("#composer-done").hidden = true;
  clearTimeout(estimateTimer);
  const body = request();
  const estimate = $("#estimate");
  if (!targetChosen(body.target)) {
    estimateSeq += 1;
    estimate.dataset.state = "idle";
    $("#estimate-text").textContent = "Choose who to send to.";
    $("#estimate-text").className = "muted";
    return;
  }
  if (!body.template_id && !body.body && !body.media_ids) {
    estimateSeq += 1;
    estimate.dataset.state = "idle";
    $("#estimate-text").textContent = "Write a message to see who it reaches and when it will be done.";
    $("#estimate-text").className = "muted";
    return;
  }
  estimate.dataset.state = "loading";
  estimateTimer = setTimeout(() => runEstimate(body), ESTIMATE_DELAY_MS);
}

async function runEstimate(body) {
  const mine = ++estimateSeq;
  let answer;
  try {
    answer = await api("POST", "/v1/messages/estimate", body);
  } catch (err) {
    if (mine !== estimateSeq) return;
    const estimate = $("#estimate");
    estimate.dataset.state = "error";
    const first = err.details[0];
    $("#estimate-text").textContent = err.status === 404 && err.code === "not_found" && !first
      ? "No estimate available."
      : first ? `${fieldName(first.field)}: ${first.message}` : err.message;
    $("#estimate-text").className = "muted";
    return;
  }
  if (mine !== estimateSeq) return; // the form changed meanwhile
  const estimate = $("#estimate");
  estimate.dataset.state = "ready";
  estimate.dataset.recipients = String(answer.recipient_count);
  estimate.dataset.segments = String(answer.estimate.segments_total);
  const text = $("#estimate-text");
  text.className = "";
  const finishes = answer.estimate.finishes_at;
  text.replaceChildren(
    el("strong", { class: "recipients" }, plural(answer.recipient_count, "person", "people")),
    el("span", { class: "sep" }, " · "),
    el("span", { class: "segments" }, plural(answer.estimate.segments_total, "segment", "segments")),
    el("span", { class: "sep" }, " · "),
    el("span", { class: "finishes" }, finishes ? `done by ${clock(finishes)}` : "nobody to send to"));
  if (!$("#schedule-on").checked) {
    $("#send").textContent = answer.recipient_count > 0
      ? `Send to ${plural(answer.recipient_count, "person", "people")}` : "Send";
  }
}

// ---------------------------------------------------------------- media

async function attach(files) {
  const error = $("#media-error");
  error.hidden = true;
  const problems = [];
  for (const file of files) {
    if (attachments.length >= MAX_MEDIA) {
      problems.push(`At most ${MAX_MEDIA} files go with one message.`);
      break;
    }
    const slot = el("li", { class: "attachment uploading" }, el("span", { class: "file-name" }, file.name), el("span", { class: "muted" }, "uploading…"));
    $("#attachments").append(slot);
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const media = await api("POST", "/v1/media", form);
      attachments.push({ ...media, name: file.name });
    } catch (err) {
      problems.push(`${file.name}: ${err.message}`);
    } finally {
      slot.remove();
    }
  }
  renderAttachments();
  if (problems.length) {
    error.textContent = problems.join(" ");
    error.hidden = false;
  }
  composerChanged();
}

function renderAttachments() {
  $("#attachments").replaceChildren(...attachments.map((media, index) => {
    const preview = media.content_type.startsWith("image/")
      ? el("img", { src: sameOrigin(media.url), alt: media.name, class: "thumb" })
      : el("span", { class: "thumb file", "aria-hidden": "true" }, kindLabel(media.content_type));
    return el("li", { class: "attachment", data: { mediaId: media.id } },
      preview,
      el("span", { class: "file-name", title: media.name }, media.name),
      el("span", { class: "muted size" }, bytes(media.size)),
      el("button", {
        type: "button", class: "remove", "aria-label": `Remove ${media.name}`,
        onclick: () => {
          attachments.splice(index, 1);
          renderAttachments();
          composerChanged();
        },
      }, "×"));
  }));
  $("#attach").disabled = attachments.length >= MAX_MEDIA;
  $("#attach-label").classList.toggle("disabled", attachments.length >= MAX_MEDIA);
}

// The file's URL is absolute (the server's public URL); the page may have been
// opened under another name of the same server, and its policy loads images
// from its own origin only.
function sameOrigin(url) {
  const parsed = new URL(url, location.href);
  return parsed.pathname + parsed.search;
}

function kindLabel(type) {
  return { "video/mp4": "MP4", "audio/mpeg": "MP3", "application/pdf": "PDF" }[type]
    || (type.includes("vcard") ? "vCard" : "FILE");
}

// ---------------------------------------------------------------- send

async function send() {
  const box = $("#composer-error");
  box.hidden = true;
  $("#composer-done").hidden = true;
  const button = $("#send");
  button.disabled = true;
  try {
    const accepted = await api("POST", "/v1/messages", request());
    merge(accepted.id, { ...accepted, body: $("#body").value });
    render();
    refreshSoon(accepted.id, true);
    const done = $("#composer-done");
    done.textContent = accepted.status === "scheduled"
      ? `Scheduled for ${clock(accepted.send_at)}: ${plural(accepted.recipient_count, "person", "people")}.`
      : `On its way to ${plural(accepted.recipient_count, "person", "people")}.`;
    resetComposer();
    done.hidden = false;
  } catch (err) {
    showError(box, err);
  } finally {
    button.disabled = false;
  }
}

function resetComposer() {
  $("#body").value = "";
  $("#template").value = "";
  attachments.length = 0;
  renderAttachments();
  $("#schedule-on").checked = false;
  $("#send-at").hidden = true;
  $("#send-at").value = "";
  updateCounter();
  updateSendLabel();
  estimateSeq += 1;
  clearTimeout(estimateTimer);
  $("#estimate").dataset.state = "idle";
  $("#estimate-text").className = "muted";
  $("#estimate-text").textContent = "Write a message to see who it reaches and when it will be done.";
}

// ---------------------------------------------------------------- keywords

let keywords = [];

function setUpKeywords() {
  $("#keyword-form").addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const form = submit.target;
    const box = $("#keyword-error");
    box.hidden = true;
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const made = await api("POST", "/v1/keywords", {
        keyword: form.elements.keyword.value.trim(),
        group_id: form.elements.group_id.value,
        reply: form.elements.reply.value,
      });
      keywords = [made, ...keywords.filter((k) => k.id !== made.id)];
      renderKeywords();
      form.elements.keyword.value = "";
      form.elements.reply.value = "";
    } catch (err) {
      showError(box, err);
    } finally {
      button.disabled = false;
    }
  });
}

async function loadKeywords() {
  keywords = await api("GET", "/v1/keywords?limit=200").catch(() => []);
  renderKeywords();
}

function renderKeywords() {
  const list = $("#keywords");
  list.replaceChildren(...keywords.map((keyword) => {
    const group = groups.get(keyword.group_id);
    return el("li", { data: { keywordId: keyword.id } },
      el("span", { class: "word" }, keyword.keyword.toUpperCase()),
      el("span", { class: "group" }, group ? `joins ${group.name}` : "joins a group"),
      el("span", { class: "reply muted", title: keyword.reply }, keyword.reply),
      el("button", {
        type: "button", class: "link delete", "aria-label": `Delete keyword ${keyword.keyword}`,
        onclick: () => removeKeyword(keyword),
      }, "Delete"));
  }));
  $("#no-keywords").hidden = keywords.length > 0;
  $("#keyword-form").querySelector("button[type=submit]").disabled = groups.size === 0;
}

async function removeKeyword(keyword) {
  const box = $("#keyword-error");
  box.hidden = true;
  try {
    await api("DELETE", `/v1/keywords/${keyword.id}`);
    keywords = keywords.filter((k) => k.id !== keyword.id);
    renderKeywords();
  } catch (err) {
    showError(box, err);
  }
}

// ---------------------------------------------------------------- start
// Last, so that every binding above is initialized before anything runs.

await signedIn();
setUpComposer();
setUpKeywords();
loadChoices();
listen();
