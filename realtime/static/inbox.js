// The live inbox: conversation list with unread counts, one thread at a time,
// a reply box and a typing indicator.
//
// The list follows the `inbox` channel; the open thread follows
// `conversation:<id>`. Each channel's onReset loads its state from REST, and
// every event handler is idempotent (state is keyed by id), so a replayed or
// duplicated event changes nothing.

import { $, api, formatTime, Realtime, request, showConnection, signedIn } from "./app.js";

const TYPING_SHOWN_MS = 4000; // how long "typing…" stays after the last signal
const TYPING_EVERY_MS = 2000; // at most one typing frame per this interval
const THREAD_PAGE = 100;

const conversations = new Map(); // id -> {id, member_id, status, unread_count, last_message_at}
const rows = new Map(); // conversation id -> <li>
const names = new Map(); // member id -> Promise<string>
const thread = {
  id: null, // the open conversation
  messages: new Map(), // message id -> message
  older: null, // cursor of the earlier page, if any
  typingTimer: 0,
  typingSentAt: 0,
  markingRead: false,
  readAgain: false,
};

const me = await signedIn();
const realtime = new Realtime({ onState: showConnection });
realtime.subscribe("inbox", { onReset: loadConversations, onEvent: inboxEvent });
wireThread();

// -- the conversation list ------------------------------------------------------

async function loadConversations() {
  const items = await api("GET", "/v1/conversations?limit=200");
  conversations.clear();
  for (const item of items) conversations.set(item.id, pick(item, item.id));
  renderList();
}

function pick(source, id) {
  return {
    id,
    member_id: source.member_id,
    status: source.status,
    unread_count: source.unread_count,
    last_message_at: source.last_message_at,
  };
}

function inboxEvent(event) {
  const data = event.data;
  switch (event.type) {
    case "conversation.created":
    case "conversation.updated":
      conversations.set(data.conversation_id, pick(data, data.conversation_id));
      renderList();
      if (data.conversation_id === thread.id) renderThreadHead();
      break;
    case "conversation.message.created": {
      const known = conversations.get(data.conversation_id);
      if (known && data.created_at > known.last_message_at) {
        known.last_message_at = data.created_at;
        renderList();
      }
      break;
    }
    case "conversation.typing":
      typingSeen(data);
      break;
  }
}

function memberName(memberId) {
  if (!names.has(memberId)) {
    names.set(memberId, api("GET", `/v1/members/${memberId}`).then(
      (m) => `${m.first_name} ${m.last_name}`.trim() || m.phone,
      () => "Unknown member",
    ));
  }
  return names.get(memberId);
}

function renderList() {
  const list = $("#conversations");
  const sorted = [...conversations.values()].sort((a, b) =>
    a.last_message_at < b.last_message_at ? 1 : a.last_message_at > b.last_message_at ? -1 : 0);
  $("#no-conversations").hidden = sorted.length > 0;
  for (const conversation of sorted) {
    const row = rows.get(conversation.id) || newRow(conversation);
    fillRow(row, conversation);
    list.appendChild(row); // moves existing rows into order
  }
  for (const [id, row] of rows) {
    if (!conversations.has(id)) {
      row.remove();
      rows.delete(id);
    }
  }
}

function newRow(conversation) {
  const row = document.createElement("li");
  row.dataset.conversationId = conversation.id;
  const button = document.createElement("button");
  button.type = "button";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = "…";
  memberName(conversation.member_id).then((text) => { name.textContent = text; });
  const time = document.createElement("time");
  const badge = document.createElement("span");
  badge.className = "badge";
  button.append(name, time, badge);
  button.addEventListener("click", () => openThread(conversation.id));
  row.append(button);
  rows.set(conversation.id, row);
  return row;
}

function fillRow(row, conversation) {
  row.dataset.unread = String(conversation.unread_count);
  row.dataset.status = conversation.status;
  row.classList.toggle("current", conversation.id === thread.id);
  const time = row.querySelector("time");
  time.dateTime = conversation.last_message_at;
  time.textContent = formatTime(conversation.last_message_at);
  const badge = row.querySelector(".badge");
  badge.textContent = String(conversation.unread_count);
  badge.hidden = conversation.unread_count === 0;
  badge.setAttribute("aria-label", `${conversation.unread_count} unread`);
}

// -- the open thread ------------------------------------------------------------

function openThread(id) {
  if (thread.id === id) return;
  if (thread.id) realtime.unsubscribe(`conversation:${thread.id}`);
  thread.id = id;
  thread.messages.clear();
  thread.older = null;
  hideTyping();
  $("#no-thread").hidden = true;
  $("#thread").hidden = false;
  $("#messages").replaceChildren();
  $("#reply-error").hidden = true;
  renderThreadHead();
  renderList();
  const conversation = conversations.get(id);
  $("#thread-title").textContent = "…";
  memberName(conversation.member_id).then((text) => {
    if (thread.id === id) $("#thread-title").textContent = text;
  });
  realtime.subscribe(`conversation:${id}`, {
    onReset: () => loadThread(id),
    onEvent: (event) => threadEvent(id, event),
  });
  $("#reply-body").focus();
}

async function loadThread(id) {
  const page = await request("GET", `/v1/conversations/${id}/messages?limit=${THREAD_PAGE}`);
  if (thread.id !== id) return;
  thread.messages.clear();
  for (const message of page.data) thread.messages.set(message.id, message);
  thread.older = page.meta.next_cursor || null;
  renderMessages();
  markRead();
}

async function loadOlder() {
  const id = thread.id;
  const cursor = encodeURIComponent(thread.older);
  const page = await request(
    "GET", `/v1/conversations/${id}/messages?limit=${THREAD_PAGE}&cursor=${cursor}`);
  if (thread.id !== id) return;
  for (const message of page.data) thread.messages.set(message.id, message);
  thread.older = page.meta.next_cursor || null;
  renderMessages({ keepScroll: true });
}

function threadEvent(id, event) {
  if (thread.id !== id) return;
  const data = event.data;
  switch (event.type) {
    case "conversation.message.created":
      if (!thread.messages.has(data.message_id)) {
        thread.messages.set(data.message_id, {
          id: data.message_id,
          direction: data.direction,
          body: data.body,
          status: data.direction === "inbound" ? "received" : "queued",
          created_at: data.created_at,
        });
        if (data.direction === "inbound") hideTyping();
        renderMessages();
      }
      break;
    case "conversation.message.status": {
      const message = thread.messages.get(data.message_id);
      if (message) {
        message.status = data.status;
        renderMessages();
      }
      break;
    }
    case "conversation.updated":
    case "conversation.created":
      inboxEvent(event); // the inbox channel carries it too; applying it twice is harmless
      markRead();
      break;
    case "conversation.typing":
      typingSeen(data);
      break;
  }
}

function renderThreadHead() {
  const conversation = conversations.get(thread.id);
  if (!conversation) return;
  $("#thread-status").textContent = conversation.status;
  $("#thread-status").dataset.status = conversation.status;
  $("#toggle-status").textContent = conversation.status === "open" ? "Close" : "Reopen";
}

function renderMessages({ keepScroll = false } = {}) {
  const list = $("#messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const sorted = [...thread.messages.values()].sort((a, b) =>
    a.created_at < b.created_at ? -1 : a.created_at > b.created_at ? 1 : a.id < b.id ? -1 : 1);
  list.replaceChildren(...sorted.map(messageItem));
  $("#older").hidden = !thread.older;
  if (!keepScroll || atBottom) list.scrollTop = list.scrollHeight;
}

function messageItem(message) {
  const item = document.createElement("li");
  item.dataset.messageId = message.id;
  item.dataset.direction = message.direction;
  item.dataset.status = message.status;
  const body = document.createElement("p");
  body.className = "body";
  body.textContent = message.body;
  const meta = document.createElement("small");
  const time = document.createElement("time");
  time.dateTime = message.created_at;
  time.textContent = formatTime(message.created_at);
  meta.append(time);
  if (message.direction === "outbound") meta.append(` · ${message.status}`);
  item.append(body, meta);
  return item;
}

// Read what is on screen: once the thread is loaded, and again whenever more
// unread messages arrive while it is open.
async function markRead() {
  const id = thread.id;
  const conversation = conversations.get(id);
  if (!conversation || conversation.unread_count === 0) return;
  if (thread.markingRead) {
    thread.readAgain = true;
    return;
  }
  thread.markingRead = true;
  thread.readAgain = false;
  try {
    const updated = await api("POST", `/v1/conversations/${id}/read`);
    conversations.set(id, pick(updated, id));
    renderList();
  } catch (err) {
    console.warn("mark read failed:", err.message);
  } finally {
    thread.markingRead = false;
    if (thread.readAgain && thread.id === id) markRead();
  }
}

// -- replying, typing, closing ------------------------------------------------

function wireThread() {
  const form = $("#reply");
  const box = $("#reply-body");
  form.addEventListener("submit", (submit) => {
    submit.preventDefault();
    sendReply();
  });
  box.addEventListener("keydown", (key) => {
    if (key.key === "Enter" && !key.shiftKey && !key.isComposing) {
      key.preventDefault();
      sendReply();
    }
  });
  box.addEventListener("input", () => {
    const now = Date.now();
    if (thread.id && box.value && now - thread.typingSentAt >= TYPING_EVERY_MS) {
      thread.typingSentAt = now;
      realtime.typing(thread.id);
    }
  });
  $("#toggle-status").addEventListener("click", toggleStatus);
  $("#older").addEventListener("click", loadOlder);
}

async function sendReply() {
  const box = $("#reply-body");
  const button = $("#reply button");
  const error = $("#reply-error");
  const body = box.value.trim();
  const id = thread.id;
  if (!body || !id || button.disabled) return;
  button.disabled = true;
  error.hidden = true;
  try {
    const message = await api("POST", `/v1/conversations/${id}/messages`, { body });
    box.value = "";
    thread.typingSentAt = 0;
    if (thread.id === id && !thread.messages.has(message.id)) {
      thread.messages.set(message.id, message);
      renderMessages();
    }
  } catch (err) {
    error.textContent = `Not sent: ${err.message}`;
    error.hidden = false;
  } finally {
    button.disabled = false;
    box.focus();
  }
}

async function toggleStatus() {
  const id = thread.id;
  const conversation = conversations.get(id);
  if (!conversation) return;
  const status = conversation.status === "open" ? "closed" : "open";
  try {
    const updated = await api("PATCH", `/v1/conversations/${id}`, { status });
    conversations.set(id, pick(updated, id));
    renderList();
    renderThreadHead();
  } catch (err) {
    console.warn("status change failed:", err.message);
  }
}

// Another staff member is typing in the open thread. This tab's own typing,
// should the server echo it back to the sender, is not shown.
function typingSeen(data) {
  if (data.conversation_id !== thread.id) return;
  const own = data.user_id === me.user.id && Date.now() - thread.typingSentAt < 1000;
  if (own) return;
  $("#typing").hidden = false;
  clearTimeout(thread.typingTimer);
  thread.typingTimer = setTimeout(hideTyping, TYPING_SHOWN_MS);
}

function hideTyping() {
  clearTimeout(thread.typingTimer);
  $("#typing").hidden = true;
}
