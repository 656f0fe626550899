// What both staff pages share: the REST helper, signing in and out, the
// connection badge, and a WebSocket client that reconnects and recovers.
//
// The session lives in the httpOnly cookie the server sets; nothing about it
// is kept in JavaScript storage. Writes echo the readable koinonia_csrf cookie
// in X-CSRF-Token (double submit), as PROTOCOL.md asks of cookie-authenticated
// writes.

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    // The envelope's field errors ([{field, message}]), for forms that show them.
    this.details = Array.isArray(details) ? details : [];
  }
}

function csrfToken() {
  const found = document.cookie.match(/(?:^|;\s*)koinonia_csrf=([^;]*)/);
  return found ? decodeURIComponent(found[1]) : "";
}

// One REST call. Resolves to the whole envelope ({data, meta}); rejects with an
// ApiError carrying the envelope's error code and details. `body` is sent as
// JSON, or as it is when it is FormData (a multipart upload: the browser sets
// its boundary).
export async function request(method, path, body) {
  const headers = { Accept: "application/json" };
  const multipart = body instanceof FormData;
  if (body !== undefined && !multipart) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  let answer;
  try {
    answer = await fetch(path, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined || multipart ? body : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "network", "cannot reach the server");
  }
  const envelope = await answer.json().catch(() => null);
  if (!answer.ok || !envelope || envelope.success === false) {
    const error = (envelope && envelope.error) || {};
    throw new ApiError(answer.status, error.code || "http_" + answer.status,
      error.message || answer.statusText || "the request failed", error.details);
  }
  return envelope;
}

// Just the data of a REST answer.
export async function api(method, path, body) {
  return (await request(method, path, body)).data;
}

export function $(selector) {
  return document.querySelector(selector);
}

// Show the page for a signed-in user: resolves to GET /v1/me's data, after the
// login form (shown when nobody is signed in) has been used if need be.
export async function signedIn() {
  const me = await api("GET", "/v1/me").catch((err) => {
    if (err.status === 401) return null;
    throw err;
  });
  if (me && me.user) return showApp(me);
  return showApp(await loginForm());
}

function loginForm() {
  const section = $("#login");
  const form = $("#login-form");
  const error = $("#login-error");
  section.hidden = false;
  form.elements.email.focus();
  return new Promise((resolve) => {
    form.addEventListener("submit", async (submit) => {
      submit.preventDefault();
      error.hidden = true;
      const button = form.querySelector("button");
      button.disabled = true;
      try {
        await api("POST", "/v1/auth/login", {
          email: form.elements.email.value,
          password: form.elements.password.value,
        });
        const me = await api("GET", "/v1/me");
        form.reset();
        section.hidden = true;
        resolve(me);
      } catch (err) {
        error.textContent = err.status === 401 ? "Wrong email or password." : err.message;
        error.hidden = false;
      } finally {
        button.disabled = false;
      }
    });
  });
}

function showApp(me) {
  $("#who").textContent = me.user.email;
  const signOut = $("#sign-out");
  signOut.hidden = false;
  signOut.addEventListener("click", async () => {
    await api("POST", "/v1/auth/logout").catch(() => {});
    location.reload();
  });
  // Links to what only owners may see (the operations page).
  for (const link of document.querySelectorAll("[data-owner-only]")) {
    link.hidden = me.user.role !== "owner";
  }
  $("#app").hidden = false;
  $("#connection").hidden = false;
  return me;
}

// The header badge: "live", "reconnecting…".
export function showConnection(state) {
  const badge = $("#connection");
  badge.dataset.state = state;
  badge.textContent = { live: "live", connecting: "connecting…", offline: "reconnecting…" }[state];
}

export function formatTime(iso) {
  const at = new Date(iso);
  const today = new Date().toDateString() === at.toDateString();
  return today
    ? at.toLocaleTimeString([], { hour: "numeric", minute: "2-digit" })
    : at.toLocaleDateString([], { month: "short", day: "numeric" });
}

// The WebSocket client of /v1/realtime.
//
// subscribe(channel, {onEvent, onReset}) keeps a channel subscribed across
// reconnects: after a drop it reconnects with a growing, jittered delay and
// resubscribes with `since` (the offset of the last event seen and the epoch
// its subscription reported). onReset() runs whenever the server answers
// `recovered: false` — the first subscription included — and is where a page
// (re)loads its state from REST. The subscription is live before the REST
// read starts, so nothing is missed: events that arrive while the promise
// onReset returned is pending are held and then handed to onEvent in order,
// on top of the fresh state (handlers must therefore be idempotent).
export class Realtime {
  constructor({ onState } = {}) {
    this.channels = new Map();
    this.pending = new Map(); // subscribe request id -> channel
    this.socket = null;
    this.ready = false; // welcomed: frames may be sent
    this.attempt = 0;
    this.nextId = 1;
    this.viewingId = null; // the conversation this page shows, told again on each connection
    this.onState = onState || (() => {});
    this.connect();
  }

  subscribe(channel, handlers) {
    this.channels.set(channel, { ...handlers, offset: null, epoch: null, held: null });
    this.sendSubscribe(channel);
  }

  unsubscribe(channel) {
    if (!this.channels.delete(channel)) return;
    this.send({ type: "unsubscribe", id: "u" + this.nextId++, channel });
  }

  typing(conversationId) {
    this.send({ type: "typing", conversation_id: conversationId });
  }

  // Who views what ends with the connection on the server, so it is kept here
  // and said again after every reconnect.
  viewing(conversationId) {
    this.viewingId = conversationId;
    this.send({ type: "viewing", conversation_id: conversationId });
  }

  connect() {
    this.onState(this.attempt === 0 ? "connecting" : "offline");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/v1/realtime`);
    this.socket = socket;
    socket.addEventListener("message", (message) => this.receive(JSON.parse(message.data)));
    socket.addEventListener("close", (close) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.ready = false;
      this.pending.clear();
      if (close.code === 4001) {
        location.reload(); // the session ended: back to the login form
        return;
      }
      this.onState("offline");
      const delay = Math.min(30000, 500 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt += 1;
      setTimeout(() => this.connect(), delay);
    });
  }

  receive(frame) {
    switch (frame.type) {
      case "welcome":
        this.attempt = 0;
        this.ready = true;
        this.onState("live");
        for (const channel of this.channels.keys()) this.sendSubscribe(channel);
        if (this.viewingId) this.send({ type: "viewing", conversation_id: this.viewingId });
        break;
      case "subscribed": {
        this.pending.delete(frame.id);
        const sub = this.channels.get(frame.channel);
        if (!sub) break;
        sub.offset = frame.offset;
        sub.epoch = frame.epoch;
        if (!frame.recovered && sub.onReset) this.reset(frame.channel, sub);
        break;
      }
      case "event": {
        const sub = this.channels.get(frame.channel);
        if (!sub) break;
        sub.offset = frame.offset;
        if (sub.held) sub.held.push(frame.event);
        else sub.onEvent(frame.event);
        break;
      }
      case "error": {
        console.warn("realtime:", frame.code, frame.message);
        const channel = this.pending.get(frame.id);
        this.pending.delete(frame.id);
        if (channel && frame.code === "unavailable") {
          setTimeout(() => this.channels.has(channel) && this.sendSubscribe(channel), 2000);
        }
        break;
      }
    }
  }

  reset(channel, sub) {
    const held = [];
    sub.held = held;
    Promise.resolve()
      .then(() => sub.onReset())
      .catch((err) => console.error("reload failed:", err))
      .finally(() => {
        if (sub.held !== held) return; // a newer reset took over
        sub.held = null;
        if (this.channels.get(channel) === sub) held.forEach((event) => sub.onEvent(event));
      });
  }

  sendSubscribe(channel) {
    const sub = this.channels.get(channel);
    const frame = { type: "subscribe", id: "s" + this.nextId++, channel };
    if (sub && sub.offset !== null && sub.epoch !== null) {
      frame.since = { offset: sub.offset, epoch: sub.epoch };
    }
    if (this.send(frame)) this.pending.set(frame.id, channel);
  }

  // Frames are sent only on a welcomed connection; the rest is dropped (the
  // subscriptions are sent again on the next welcome). True when sent.
  send(frame) {
    if (this.ready && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }
}
