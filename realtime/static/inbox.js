// The live inbox: conversation list with unread counts, search and assignees,
// one thread at a time with its notes and pictures, a composer (reply or note,
// canned replies after `/`, files attached, pasted or dropped), who else views
// or answers it, and the member's contact panel with the broadcasts they got.
//
// The list follows the `inbox` channel; the open thread follows
// `conversation:<id>`. Each channel's onReset loads its state from REST, and
// every event handler is idempotent (state is keyed by id), so a replayed or
// duplicated event changes nothing. Viewers and presence are realtime only
// (never replayed), so they are read again from GET /v1/presence whenever the
// connection comes back.

import { $, api, formatTime, Realtime, request, showConnection, signedIn } from "./app.js";

const TYPING_SHOWN_MS = 4000; // how long "typing…" stays after the last signal
const TYPING_EVERY_MS = 2000; // at most one typing frame per this interval
const THREAD_PAGE = 100;
const SEARCH_AFTER_MS = 250; // search once typing pauses this long
const RECEIVED_PAGE = 10; // broadcasts shown in the contact panel, and per "More"
const MAX_FILES = 10; // files per text (the server's limit, MAX_MEDIA_PER_MESSAGE)
// The server judges every file (type by content, size: 413 above 1 MiB) and its
// answer is what the page shows; only a file far beyond any carrier's limit is
// refused here, so the browser does not send megabytes to be turned away.
const MAX_UPLOAD_BYTES = 8 * 1024 * 1024;
const TYPE_NAMES = {
  "image/jpeg": "JPEG",
  "image/png": "PNG",
  "image/gif": "GIF",
  "video/mp4": "MP4 video",
  "audio/mpeg": "MP3 audio",
  "text/vcard": "vCard",
  "application/pdf": "PDF",
};

const conversations = new Map(); // id -> {id, member_id, status, unread_count, assignee_id, last_message_at}
const rows = new Map(); // conversation id -> <li>
const names = new Map(); // member id -> Promise<string>
const staff = new Map(); // user id -> display name
const viewers = new Map(); // conversation id -> [user id]
const online = new Set(); // user ids of staff online
const search = {
  q: null, // the words searched, null when the list is the live inbox
  found: new Map(), // id -> conversation, in the server's order
  timer: 0,
  seq: 0, // answers to older searches are dropped
};
const thread = {
  id: null, // the open conversation
  messages: new Map(), // message id -> message
  older: null, // cursor of the earlier page, if any
  typingTimer: 0,
  typingSentAt: 0,
  markingRead: false,
  readAgain: false,
  othersTyping: new Map(), // user id -> when their last typing signal came
  collisionTimer: 0,
  refreshTimer: 0,
};
const composer = {
  mode: "reply", // or "note"
  canned: null, // the canned reply chosen, sent by id (filled server-side)
  cannedList: null, // Promise of the church's canned replies, read once
  matches: [],
  active: 0,
  files: [], // attachments of the reply: {key, file, name, size, media, upload}
  fileSeq: 0,
};
const received = {
  memberId: null, // whose broadcasts the contact panel lists
  items: [],
  cursor: null, // of the next page, if any
  seq: 0, // answers for an earlier member are dropped
};
const mediaNodes = new Map(); // "message id/media id" -> element: re-rendering keeps pictures loaded
let groupNames = null; // Promise<Map group id -> name>
let staffReadAt = 0; // when the staff list was last read

const me = await signedIn();
const realtime = new Realtime({
  onState: (state) => {
    showConnection(state);
    if (state === "live") loadPresence();
  },
});
realtime.subscribe("inbox", { onReset: loadInbox, onEvent: inboxEvent });
wireThread();
wireSearch();
wireComposer();
wireAttachments();
wireMedia();
loadStaff();

// -- staff and presence -----------------------------------------------------------

async function loadStaff() {
  staffReadAt = Date.now();
  try {
    const users = await api("GET", "/v1/staff?limit=200");
    for (const user of users) staff.set(user.id, user.name || user.email);
  } catch (err) {
    console.warn("staff list unavailable:", err.message);
  }
  if (!staff.has(me.user.id)) staff.set(me.user.id, me.user.name || me.user.email);
  renderList();
  renderAssignees();
  renderViewers();
}

// A colleague who joined after the page loaded is not yet known: read the list
// again, at most every 30 s.
function staffName(userId) {
  if (!staff.has(userId) && Date.now() - staffReadAt > 30000) loadStaff();
  return staff.get(userId) || "A colleague";
}

function listOfNames(userIds) {
  const named = userIds.map(staffName);
  if (named.length <= 1) return named.join("");
  return `${named.slice(0, -1).join(", ")} and ${named[named.length - 1]}`;
}

async function loadPresence() {
  try {
    const snapshot = await api("GET", "/v1/presence");
    online.clear();
    for (const user of snapshot.online) online.add(user);
    viewers.clear();
    for (const [id, users] of Object.entries(snapshot.viewers)) viewers.set(id, users);
    renderList();
    renderViewers();
    renderAssignees();
  } catch (err) {
    console.warn("presence unavailable:", err.message);
  }
}

function viewersSeen(data) {
  const users = [...new Set(data.viewers.map((viewer) => viewer.user_id))];
  if (users.length) viewers.set(data.conversation_id, users);
  else viewers.delete(data.conversation_id);
  const row = rows.get(data.conversation_id);
  const conversation = known(data.conversation_id);
  if (row && conversation) fillRow(row, conversation);
  if (data.conversation_id === thread.id) renderViewers();
}

function othersViewing(conversationId) {
  return (viewers.get(conversationId) || []).filter((user) => user !== me.user.id);
}

function renderViewers() {
  const line = $("#viewers");
  const others = thread.id ? othersViewing(thread.id) : [];
  line.hidden = others.length === 0;
  line.textContent = others.length === 0 ? ""
    : `${listOfNames(others)} ${others.length === 1 ? "is" : "are"} viewing`;
}

// -- the conversation list ------------------------------------------------------

async function loadInbox() {
  const items = await api("GET", "/v1/conversations?limit=200");
  conversations.clear();
  for (const item of items) conversations.set(item.id, pick(item, item.id));
  renderList();
  if (thread.id) renderThreadHead();
}

function pick(source, id) {
  return {
    id,
    member_id: source.member_id,
    status: source.status,
    unread_count: source.unread_count,
    assignee_id: source.assignee_id || null,
    last_message_at: source.last_message_at,
  };
}

function known(id) {
  return conversations.get(id) || search.found.get(id);
}

function inboxEvent(event) {
  const data = event.data;
  switch (event.type) {
    case "conversation.created":
    case "conversation.updated": {
      const conversation = pick(data, data.conversation_id);
      conversations.set(data.conversation_id, conversation);
      if (search.found.has(data.conversation_id)) search.found.set(data.conversation_id, conversation);
      renderList();
      if (data.conversation_id === thread.id) renderThreadHead();
      break;
    }
    case "conversation.message.created": {
      if (data.direction === "note") break; // staff's own words, not activity of the member
      const conversation = conversations.get(data.conversation_id);
      if (conversation && data.created_at > conversation.last_message_at) {
        conversation.last_message_at = data.created_at;
        renderList();
      }
      break;
    }
    case "conversation.typing":
      typingSeen(data);
      break;
    case "conversation.viewers":
      viewersSeen(data);
      break;
    case "staff.presence":
      if (data.status === "online") online.add(data.user_id);
      else online.delete(data.user_id);
      renderAssignees();
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

function byActivity(a, b) {
  return a.last_message_at < b.last_message_at ? 1 : a.last_message_at > b.last_message_at ? -1 : 0;
}

function renderList() {
  const list = $("#conversations");
  // Search results keep the server's order; the live inbox is most recent first.
  const shown = search.q === null
    ? [...conversations.values()].sort(byActivity)
    : [...search.found.keys()].map((id) => conversations.get(id) || search.found.get(id));
  $("#no-conversations").hidden = shown.length > 0 || search.q !== null;
  const ids = new Set();
  for (const conversation of shown) {
    ids.add(conversation.id);
    const row = rows.get(conversation.id) || newRow(conversation);
    fillRow(row, conversation);
    list.appendChild(row); // moves existing rows into order
  }
  for (const [id, row] of rows) {
    if (!ids.has(id)) {
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
  const meta = document.createElement("span");
  meta.className = "row-meta";
  const assignee = document.createElement("span");
  assignee.className = "assignee";
  const watching = document.createElement("span");
  watching.className = "watching";
  meta.append(assignee, watching);
  button.append(name, time, badge, meta);
  button.addEventListener("click", () => openThread(conversation.id));
  row.append(button);
  rows.set(conversation.id, row);
  return row;
}

function fillRow(row, conversation) {
  row.dataset.unread = String(conversation.unread_count);
  row.dataset.status = conversation.status;
  row.dataset.assignee = conversation.assignee_id || "";
  row.classList.toggle("current", conversation.id === thread.id);
  const time = row.querySelector("time");
  time.dateTime = conversation.last_message_at;
  time.textContent = formatTime(conversation.last_message_at);
  const badge = row.querySelector(".badge");
  badge.textContent = String(conversation.unread_count);
  badge.hidden = conversation.unread_count === 0;
  badge.setAttribute("aria-label", `${conversation.unread_count} unread`);
  const assignee = row.querySelector(".assignee");
  assignee.hidden = !conversation.assignee_id;
  assignee.textContent = conversation.assignee_id
    ? `Assigned to ${conversation.assignee_id === me.user.id ? "me" : staffName(conversation.assignee_id)}`
    : "";
  const others = othersViewing(conversation.id);
  const watching = row.querySelector(".watching");
  watching.hidden = others.length === 0;
  watching.textContent = others.length ? `${listOfNames(others)} viewing` : "";
}

// -- search -------------------------------------------------------------------------

function wireSearch() {
  const box = $("#search-box");
  $("#search").addEventListener("submit", (submit) => {
    submit.preventDefault();
    clearTimeout(search.timer);
    runSearch(box.value);
  });
  box.addEventListener("input", () => {
    clearTimeout(search.timer);
    search.timer = setTimeout(() => runSearch(box.value), SEARCH_AFTER_MS);
  });
}

async function runSearch(text) {
  const q = text.trim();
  const seq = ++search.seq;
  const status = $("#search-status");
  if (!q) {
    search.q = null;
    search.found.clear();
    status.hidden = true;
    renderList();
    return;
  }
  try {
    const found = await api("GET", `/v1/conversations?limit=50&q=${encodeURIComponent(q)}`);
    if (seq !== search.seq) return;
    search.q = q;
    search.found = new Map(found.map((item) => [item.id, pick(item, item.id)]));
    status.textContent = found.length === 0 ? `No conversations match “${q}”.`
      : `${found.length} ${found.length === 1 ? "conversation matches" : "conversations match"} “${q}”.`;
    status.hidden = false;
    renderList();
  } catch (err) {
    if (seq !== search.seq) return;
    status.textContent = `Search failed: ${err.message}`;
    status.hidden = false;
  }
}

// -- the open thread ------------------------------------------------------------

function openThread(id) {
  if (thread.id === id) return;
  if (thread.id) realtime.unsubscribe(`conversation:${thread.id}`);
  thread.id = id;
  thread.messages.clear();
  thread.older = null;
  thread.othersTyping.clear();
  mediaNodes.clear();
  hideTyping();
  renderCollision();
  chooseCanned(null);
  closePicker();
  clearFiles(); // files chosen for one member never go to another
  $("#no-thread").hidden = true;
  $("#thread").hidden = false;
  $("#messages").replaceChildren();
  $("#reply-error").hidden = true;
  renderThreadHead();
  renderViewers();
  renderList();
  const conversation = known(id);
  $("#thread-title").textContent = "…";
  memberName(conversation.member_id).then((text) => {
    if (thread.id === id) $("#thread-title").textContent = text;
  });
  loadContact(id, conversation.member_id);
  realtime.viewing(id);
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

// The event of a colleague's note does not say who wrote it: the newest page
// of the thread, read again, does.
function refreshSoon(id) {
  clearTimeout(thread.refreshTimer);
  thread.refreshTimer = setTimeout(async () => {
    try {
      const page = await request("GET", `/v1/conversations/${id}/messages?limit=${THREAD_PAGE}`);
      if (thread.id !== id) return;
      for (const message of page.data) thread.messages.set(message.id, message);
      renderMessages();
    } catch (err) {
      console.warn("thread refresh failed:", err.message);
    }
  }, 200);
}

function threadEvent(id, event) {
  if (thread.id !== id) return;
  const data = event.data;
  switch (event.type) {
    case "conversation.message.created": {
      const shown = thread.messages.get(data.message_id);
      if (shown && !(shown.media || []).length && (data.media || []).length) {
        shown.media = data.media; // the POST's answer was drawn first
        renderMessages();
      }
      if (!shown) {
        const note = data.direction === "note";
        thread.messages.set(data.message_id, {
          id: data.message_id,
          direction: data.direction,
          body: data.body,
          media: data.media || [],
          status: data.direction === "inbound" ? "received" : note ? "saved" : "queued",
          created_at: data.created_at,
          author_id: null,
        });
        if (data.direction === "inbound") {
          hideTyping();
          // STOP, START and keywords arrive as texts: the contact's state may have changed.
          const conversation = known(id);
          if (conversation) loadContact(id, conversation.member_id);
        }
        if (note) refreshSoon(id);
        renderMessages();
      }
      break;
    }
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
    case "conversation.viewers":
      viewersSeen(data);
      break;
  }
}

function renderThreadHead() {
  const conversation = known(thread.id);
  if (!conversation) return;
  $("#thread-status").textContent = conversation.status;
  $("#thread-status").dataset.status = conversation.status;
  $("#toggle-status").textContent = conversation.status === "open" ? "Close" : "Reopen";
  renderAssignees();
}

// The assignee picker: unassigned, me, then each colleague (online ones marked).
function renderAssignees() {
  const select = $("#assignee");
  const conversation = thread.id ? known(thread.id) : null;
  const current = (conversation && conversation.assignee_id) || "";
  const options = [["", "Nobody"], [me.user.id, `Me (${staffName(me.user.id)})`]];
  const colleagues = [...staff.keys()].filter((id) => id !== me.user.id)
    .sort((a, b) => staffName(a).localeCompare(staffName(b)));
  for (const id of colleagues) options.push([id, staffName(id) + (online.has(id) ? " · online" : "")]);
  if (current && !staff.has(current)) options.push([current, "A colleague"]);
  select.replaceChildren(...options.map(([value, label]) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label;
    return option;
  }));
  select.value = current;
  select.disabled = !conversation;
}

async function assign() {
  const id = thread.id;
  const select = $("#assignee");
  const assignee = select.value || null;
  select.disabled = true;
  try {
    const updated = await api("PATCH", `/v1/conversations/${id}`, { assignee_id: assignee });
    conversations.set(id, pick(updated, id));
    if (search.found.has(id)) search.found.set(id, pick(updated, id));
    renderList();
  } catch (err) {
    $("#reply-error").textContent = `Not assigned: ${err.message}`;
    $("#reply-error").hidden = false;
  } finally {
    if (thread.id === id) renderThreadHead();
  }
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
  if (message.direction === "note") {
    // A note is for colleagues only: labelled, with its author, never "sent".
    const label = document.createElement("p");
    label.className = "note-label";
    const strong = document.createElement("strong");
    strong.textContent = "Note";
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = message.author_id ? staffName(message.author_id) : "";
    label.append(strong, " ", author);
    item.append(label);
  }
  const media = message.media || [];
  if (message.body || !media.length) {
    const body = document.createElement("p");
    body.className = "body";
    body.textContent = message.body;
    item.append(body);
  }
  if (media.length) {
    const files = document.createElement("div");
    files.className = "media";
    files.append(...media.map((file) => mediaNode(message.id, file)));
    item.append(files);
  }
  const meta = document.createElement("small");
  const time = document.createElement("time");
  time.dateTime = message.created_at;
  time.textContent = formatTime(message.created_at);
  meta.append(time);
  if (message.direction === "outbound") meta.append(` · ${message.status}`);
  item.append(meta);
  return item;
}

// -- media in the thread ------------------------------------------------------------

// A file's address on this page's origin. The server gives absolute URLs (its
// public address); the session cookie that opens them goes only to this origin.
function mediaSrc(item) {
  try {
    const url = new URL(item.url, location.href);
    return url.origin === location.origin ? url.href : url.pathname + url.search;
  } catch {
    return `/v1/media/${encodeURIComponent(item.id)}/content`;
  }
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(bytes < 10240 ? 1 : 0)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

function typeName(contentType) {
  return TYPE_NAMES[contentType] || contentType || "File";
}

// A picture as a thumbnail that opens full size; any other file as a chip with
// its type and size that opens (or downloads) it.
function mediaNode(messageId, item) {
  // By message too: a file sent twice is drawn in both messages.
  const key = `${messageId}/${item.id}`;
  if (mediaNodes.has(key)) return mediaNodes.get(key);
  const src = mediaSrc(item);
  const link = document.createElement("a");
  link.href = src;
  link.target = "_blank";
  link.rel = "noopener";
  link.dataset.mediaId = item.id;
  link.dataset.contentType = item.content_type;
  const described = `${typeName(item.content_type)}, ${formatSize(item.size)}`;
  if (item.content_type.startsWith("image/")) {
    link.className = "media-thumb";
    link.title = `${described}: open full size`;
    const img = document.createElement("img");
    img.src = src;
    img.alt = `Picture (${described})`;
    img.loading = "lazy";
    link.append(img);
    link.addEventListener("click", (click) => {
      if (click.ctrlKey || click.metaKey || click.shiftKey || click.button !== 0) return;
      click.preventDefault();
      showPicture(src, img.alt);
    });
  } else {
    link.className = "file-chip";
    const kind = document.createElement("strong");
    kind.textContent = typeName(item.content_type);
    const size = document.createElement("span");
    size.className = "file-size";
    size.textContent = formatSize(item.size);
    link.append(kind, " ", size);
    link.title = `Open the ${described} file`;
  }
  mediaNodes.set(key, link);
  return link;
}

function wireMedia() {
  const viewer = $("#media-viewer");
  // A click on the backdrop (the dialog itself, outside its content) closes it.
  viewer.addEventListener("click", (click) => {
    if (click.target === viewer) viewer.close();
  });
  viewer.addEventListener("close", () => viewer.querySelector("img").removeAttribute("src"));
}

function showPicture(src, alt) {
  const viewer = $("#media-viewer");
  const img = viewer.querySelector("img");
  img.src = src;
  img.alt = alt;
  viewer.querySelector("a.open").href = src;
  if (!viewer.open) viewer.showModal();
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

// -- the contact panel ----------------------------------------------------------

const SOURCES = {
  keyword: "by keyword",
  staff: "by staff",
  api: "through the API",
  import: "by import",
  inbound: "texted in first",
};

function loadGroups() {
  if (!groupNames) {
    groupNames = api("GET", "/v1/groups?limit=200").then(
      (groups) => new Map(groups.map((group) => [group.id, group.name])),
      (err) => {
        groupNames = null;
        throw err;
      },
    );
  }
  return groupNames;
}

async function loadContact(conversationId, memberId) {
  $("#contact").hidden = false;
  loadReceived(conversationId, memberId);
  try {
    const member = await api("GET", `/v1/members/${memberId}`);
    let groups = await loadGroups();
    if (member.group_ids.some((id) => !groups.has(id))) {
      groupNames = null; // a group made since the page loaded
      groups = await loadGroups();
    }
    if (thread.id !== conversationId) return;
    $("#contact-name").textContent = `${member.first_name} ${member.last_name}`.trim() || "—";
    $("#contact-phone").textContent = member.phone;
    const optin = $("#contact-optin");
    optin.dataset.optedIn = String(member.opted_in);
    const when = new Date(member.opt_changed_at).toLocaleString([], {
      year: "numeric", month: "short", day: "numeric", hour: "numeric", minute: "2-digit",
    });
    optin.textContent = `${member.opted_in ? "Opted in" : "Opted out"} · `
      + `${SOURCES[member.opt_source] || member.opt_source} · ${when}`;
    const list = $("#contact-groups");
    list.replaceChildren(...member.group_ids.map((id) => {
      const item = document.createElement("li");
      item.textContent = groups.get(id) || "A group";
      return item;
    }));
    $("#contact-no-groups").hidden = member.group_ids.length > 0;
  } catch (err) {
    if (thread.id === conversationId) $("#contact-name").textContent = `Unavailable: ${err.message}`;
  }
}

// The broadcasts the member received, newest first: the latest page, then "More".
// Each is the text as it was written (merge fields not filled in).

const STATUS_NAMES = {
  queued: "Queued",
  sending: "Sending",
  sent: "Sent",
  delivered: "Delivered",
  failed: "Failed",
  undelivered: "Undelivered",
  skipped: "Skipped (opted out)",
};

async function loadReceived(conversationId, memberId) {
  const seq = ++received.seq;
  if (received.memberId !== memberId) {
    received.memberId = memberId;
    received.items = [];
    received.cursor = null;
    renderReceived(false);
  }
  // Read again (a text came in): as many as "More" had shown.
  const limit = Math.min(200, Math.max(RECEIVED_PAGE, received.items.length));
  try {
    const page = await request("GET", `/v1/members/${memberId}/messages?limit=${limit}`);
    if (seq !== received.seq || thread.id !== conversationId) return;
    received.items = page.data;
    received.cursor = page.meta.next_cursor || null;
    $("#received-error").hidden = true;
    renderReceived(true);
  } catch (err) {
    if (seq !== received.seq || thread.id !== conversationId) return;
    $("#received-error").textContent = `Unavailable: ${err.message}`;
    $("#received-error").hidden = false;
  }
}

async function moreReceived() {
  const { seq, memberId, cursor } = received;
  if (!cursor) return;
  const button = $("#received-more");
  button.disabled = true;
  try {
    const page = await request(
      "GET",
      `/v1/members/${memberId}/messages?limit=${RECEIVED_PAGE}&cursor=${encodeURIComponent(cursor)}`,
    );
    if (seq !== received.seq) return;
    const shown = new Set(received.items.map((item) => item.message_id));
    received.items.push(...page.data.filter((item) => !shown.has(item.message_id)));
    received.cursor = page.meta.next_cursor || null;
    renderReceived(true);
  } catch (err) {
    if (seq !== received.seq) return;
    $("#received-error").textContent = `More unavailable: ${err.message}`;
    $("#received-error").hidden = false;
  } finally {
    button.disabled = false;
  }
}

function renderReceived(loaded) {
  $("#received").replaceChildren(...received.items.map(receivedItem));
  $("#received-none").hidden = !loaded || received.items.length > 0;
  $("#received-more").hidden = !received.cursor;
}

function receivedItem(item) {
  const entry = document.createElement("li");
  entry.dataset.messageId = item.message_id;
  entry.dataset.status = item.status;
  const body = document.createElement("p");
  body.className = "received-body";
  body.textContent = item.body;
  body.title = item.body;
  const meta = document.createElement("p");
  meta.className = "received-meta";
  const chip = document.createElement("span");
  chip.className = "status-chip";
  chip.dataset.status = item.status;
  chip.textContent = STATUS_NAMES[item.status] || item.status;
  if (item.error_code) chip.title = `Provider error ${item.error_code}`;
  const time = document.createElement("time");
  time.dateTime = item.created_at;
  const at = new Date(item.created_at);
  const thisYear = at.getFullYear() === new Date().getFullYear();
  time.textContent = at.toLocaleDateString([], {
    month: "short", day: "numeric", year: thisYear ? undefined : "numeric",
  });
  time.title = at.toLocaleString();
  meta.append(chip, " ", time);
  entry.append(body, meta);
  return entry;
}

// -- attachments: chosen, pasted or dropped; uploaded at once ----------------------

function wireAttachments() {
  const input = $("#attach-input");
  input.addEventListener("change", () => {
    attachFiles([...input.files]);
    input.value = ""; // the same file may be chosen again after a removal
  });
  $("#reply-body").addEventListener("paste", (paste) => {
    const files = [...((paste.clipboardData && paste.clipboardData.files) || [])];
    if (!files.length || composer.mode !== "reply") return;
    paste.preventDefault();
    attachFiles(files);
  });
  const zone = document.querySelector(".thread");
  const carriesFiles = (drag) => drag.dataTransfer && [...drag.dataTransfer.types].includes("Files");
  zone.addEventListener("dragover", (drag) => {
    if (!carriesFiles(drag) || !thread.id || composer.mode !== "reply") return;
    drag.preventDefault();
    drag.dataTransfer.dropEffect = "copy";
    zone.classList.add("dropping");
  });
  zone.addEventListener("dragleave", (drag) => {
    if (!zone.contains(drag.relatedTarget)) zone.classList.remove("dropping");
  });
  zone.addEventListener("drop", (drop) => {
    zone.classList.remove("dropping");
    if (!carriesFiles(drop)) return;
    drop.preventDefault();
    if (thread.id && composer.mode === "reply") attachFiles([...drop.dataTransfer.files]);
  });
  // A file dropped anywhere else would replace the page with it.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (drag) => {
      if (carriesFiles(drag) && !zone.contains(drag.target)) drag.preventDefault();
    });
  }
}

function attachFiles(files) {
  const problems = [];
  for (const file of files) {
    const name = file.name || "pasted file";
    if (composer.files.length >= MAX_FILES) {
      problems.push(`At most ${MAX_FILES} files go with one text.`);
      break;
    }
    if (file.size > MAX_UPLOAD_BYTES) {
      problems.push(`“${name}” not attached: ${formatSize(file.size)} is far beyond the 1 MB a carrier takes.`);
      continue;
    }
    const entry = {
      key: ++composer.fileSeq,
      file,
      name,
      size: file.size,
      media: null, // the server's {id, content_type, size, url} once kept
      upload: null,
    };
    composer.files.push(entry);
    entry.upload = uploadFile(entry);
  }
  showReplyError(problems.join(" "));
  renderFiles();
}

// POST /v1/media (multipart, field `file`). Never rejects: a refused file is
// taken off the list and the server's reason (415, 413...) is shown.
async function uploadFile(entry) {
  const form = new FormData();
  form.append("file", entry.file, entry.name);
  try {
    entry.media = await api("POST", "/v1/media", form);
  } catch (err) {
    if (!composer.files.includes(entry)) return; // removed meanwhile
    dropFile(entry);
    showReplyError(`“${entry.name}” not attached: ${err.message}`);
    return;
  }
  if (composer.files.includes(entry)) renderFiles();
}

function dropFile(entry) {
  composer.files = composer.files.filter((other) => other !== entry);
  renderFiles();
}

function clearFiles() {
  composer.files = [];
  renderFiles();
}

function renderFiles() {
  const list = $("#pending-files");
  list.replaceChildren(...composer.files.map(fileItem));
  list.hidden = composer.files.length === 0;
  updateRequired();
}

function fileItem(entry) {
  const item = document.createElement("li");
  item.className = "pending-file";
  item.dataset.state = entry.media ? "ready" : "uploading";
  const type = entry.media ? entry.media.content_type : entry.file.type;
  // The preview is the kept file, as the member will get it: the page's policy
  // loads pictures from this origin only (no blob: or data: URLs).
  if (entry.media && type.startsWith("image/")) {
    const img = document.createElement("img");
    img.src = mediaSrc(entry.media);
    img.alt = "";
    item.append(img);
  } else {
    const kind = document.createElement("span");
    kind.className = "file-kind";
    kind.textContent = (TYPE_NAMES[type] || "File").split(" ")[0];
    item.append(kind);
  }
  const text = document.createElement("span");
  text.className = "file-text";
  const name = document.createElement("span");
  name.className = "file-name";
  name.textContent = entry.name;
  const size = document.createElement("span");
  size.className = "file-size";
  size.textContent = entry.media ? formatSize(entry.media.size) : `${formatSize(entry.size)} · uploading…`;
  text.append(name, size);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "file-remove";
  remove.textContent = "×";
  remove.setAttribute("aria-label", `Remove ${entry.name}`);
  remove.addEventListener("click", () => {
    dropFile(entry);
    $("#reply-body").focus();
  });
  item.append(text, remove);
  return item;
}

// The text box may stay empty when a canned reply or a file is what is sent.
function updateRequired() {
  $("#reply-body").required = !composer.canned && composer.files.length === 0;
}

function showReplyError(text) {
  const error = $("#reply-error");
  error.textContent = text;
  error.hidden = !text;
}

// -- replying, notes, typing, closing ----------------------------------------------

function wireThread() {
  const form = $("#reply");
  const box = $("#reply-body");
  form.addEventListener("submit", (submit) => {
    submit.preventDefault();
    sendReply();
  });
  box.addEventListener("keydown", (key) => {
    if (!$("#canned").hidden && pickerKey(key)) return;
    if (key.key === "Enter" && !key.shiftKey && !key.isComposing) {
      key.preventDefault();
      sendReply();
    }
  });
  box.addEventListener("input", () => {
    const now = Date.now();
    if (box.value && composer.canned) chooseCanned(null); // typing replaces the canned reply
    if (composer.mode === "reply" && thread.id && box.value
        && now - thread.typingSentAt >= TYPING_EVERY_MS) {
      thread.typingSentAt = now;
      realtime.typing(thread.id);
    }
    updatePicker();
    renderCollision();
  });
  $("#toggle-status").addEventListener("click", toggleStatus);
  $("#older").addEventListener("click", loadOlder);
  $("#received-more").addEventListener("click", moreReceived);
  $("#assignee").addEventListener("change", assign);
}

function wireComposer() {
  for (const radio of document.querySelectorAll("#reply input[name=mode]")) {
    radio.addEventListener("change", () => {
      if (radio.checked) setMode(radio.value);
    });
  }
  $("#canned-clear").addEventListener("click", () => {
    chooseCanned(null);
    $("#reply-body").focus();
  });
}

function setMode(mode) {
  composer.mode = mode;
  const form = $("#reply");
  form.dataset.mode = mode;
  const box = $("#reply-body");
  const note = mode === "note";
  $("#reply-label").textContent = note ? "Note" : "Reply";
  box.placeholder = note
    ? "Write a note for colleagues… (never texted)"
    : "Write a reply… (Enter sends, Shift+Enter for a new line, / for canned replies)";
  $("#reply button[type=submit]").textContent = note ? "Add note" : "Send";
  if (note) {
    chooseCanned(null);
    closePicker();
  }
  renderCollision();
  box.focus();
}

async function sendReply() {
  const box = $("#reply-body");
  const button = $("#reply button[type=submit]");
  const error = $("#reply-error");
  const body = box.value.trim();
  const id = thread.id;
  const reply = composer.mode === "reply";
  const canned = reply ? composer.canned : null;
  if ((!body && !canned && !(reply && composer.files.length)) || !id || button.disabled) return;
  button.disabled = true;
  error.hidden = true;
  let files = [];
  if (reply && composer.files.length) {
    // Files still uploading go with the text once kept; refused ones have left the list.
    await Promise.all(composer.files.map((entry) => entry.upload));
    files = composer.files.filter((entry) => entry.media);
    if (thread.id !== id || (!body && !canned && !files.length)) {
      button.disabled = false;
      return;
    }
  }
  const text = canned ? { canned_reply_id: canned.id } : body ? { body } : {};
  const [path, payload] = reply
    ? [`/v1/conversations/${id}/messages`,
      files.length ? { ...text, media_ids: files.map((entry) => entry.media.id) } : text]
    : [`/v1/conversations/${id}/notes`, { body }];
  try {
    const message = await api("POST", path, payload);
    box.value = "";
    chooseCanned(null);
    if (files.length) clearFiles();
    thread.typingSentAt = 0;
    renderCollision();
    if (thread.id === id) {
      const sent = { ...thread.messages.get(message.id), ...message };
      if (!(sent.media || []).length && files.length) sent.media = files.map((entry) => entry.media);
      thread.messages.set(message.id, sent);
      renderMessages();
    }
  } catch (err) {
    error.textContent = `${composer.mode === "note" ? "Note not saved" : "Not sent"}: ${err.message}`;
    error.hidden = false;
  } finally {
    button.disabled = false;
    box.focus();
  }
}

async function toggleStatus() {
  const id = thread.id;
  const conversation = known(id);
  if (!conversation) return;
  const status = conversation.status === "open" ? "closed" : "open";
  try {
    const updated = await api("PATCH", `/v1/conversations/${id}`, { status });
    conversations.set(id, pick(updated, id));
    if (search.found.has(id)) search.found.set(id, pick(updated, id));
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
  const typing = $("#typing");
  typing.textContent = `${data.user_id === me.user.id ? "Someone" : staffName(data.user_id)} is typing…`;
  typing.hidden = false;
  clearTimeout(thread.typingTimer);
  thread.typingTimer = setTimeout(hideTyping, TYPING_SHOWN_MS);
  if (data.user_id !== me.user.id) {
    thread.othersTyping.set(data.user_id, Date.now());
    renderCollision();
  }
}

function hideTyping() {
  clearTimeout(thread.typingTimer);
  $("#typing").hidden = true;
}

// Two people answering the same member at once: warn while this user has a
// reply under way and a colleague has typed in the same thread recently.
function renderCollision() {
  clearTimeout(thread.collisionTimer);
  const now = Date.now();
  for (const [user, at] of thread.othersTyping) {
    if (now - at >= TYPING_SHOWN_MS) thread.othersTyping.delete(user);
  }
  const replying = composer.mode === "reply"
    && ($("#reply-body").value.trim() !== "" || composer.canned !== null);
  const others = [...thread.othersTyping.keys()];
  const warning = $("#collision");
  const show = replying && others.length > 0;
  warning.hidden = !show;
  warning.textContent = show ? `${listOfNames(others)} ${others.length === 1 ? "is" : "are"} also replying` : "";
  if (others.length) {
    const next = Math.min(...others.map((user) => thread.othersTyping.get(user))) + TYPING_SHOWN_MS;
    thread.collisionTimer = setTimeout(renderCollision, Math.max(50, next - now));
  }
}

// -- the canned-reply picker (`/` at the start of the reply box) ---------------------

function cannedReplies() {
  if (!composer.cannedList) {
    composer.cannedList = api("GET", "/v1/canned-replies?limit=200").catch((err) => {
      composer.cannedList = null;
      throw err;
    });
  }
  return composer.cannedList;
}

async function updatePicker() {
  const box = $("#reply-body");
  if (composer.mode !== "reply" || !box.value.startsWith("/")) {
    closePicker();
    return;
  }
  let all;
  try {
    all = await cannedReplies();
  } catch (err) {
    $("#reply-error").textContent = `Canned replies unavailable: ${err.message}`;
    $("#reply-error").hidden = false;
    return;
  }
  if (!box.value.startsWith("/")) return; // changed while the list loaded
  const words = box.value.slice(1).trim().toLowerCase();
  composer.matches = all.filter((canned) =>
    canned.name.toLowerCase().includes(words) || canned.body.toLowerCase().includes(words));
  composer.active = 0;
  renderPicker();
}

function renderPicker() {
  const picker = $("#canned");
  const box = $("#reply-body");
  if (composer.matches.length === 0) {
    const empty = document.createElement("li");
    empty.className = "muted";
    empty.textContent = "No canned reply matches.";
    picker.replaceChildren(empty);
    box.removeAttribute("aria-activedescendant");
  } else {
    picker.replaceChildren(...composer.matches.map((canned, index) => {
      const option = document.createElement("li");
      option.id = `canned-${index}`;
      option.setAttribute("role", "option");
      option.setAttribute("aria-selected", String(index === composer.active));
      option.dataset.cannedReplyId = canned.id;
      const name = document.createElement("strong");
      name.textContent = canned.name;
      const body = document.createElement("span");
      body.className = "muted";
      body.textContent = canned.body;
      option.append(name, " ", body);
      // mousedown, not click: the box keeps its focus.
      option.addEventListener("mousedown", (down) => {
        down.preventDefault();
        chooseCanned(canned);
      });
      return option;
    }));
    box.setAttribute("aria-activedescendant", `canned-${composer.active}`);
  }
  picker.hidden = false;
}

function closePicker() {
  composer.matches = [];
  $("#canned").hidden = true;
  const box = $("#reply-body");
  box.removeAttribute("aria-activedescendant");
}

// Keys the open picker takes; true when the key was used.
function pickerKey(key) {
  const count = composer.matches.length;
  switch (key.key) {
    case "ArrowDown":
    case "ArrowUp":
      if (!count) return false;
      key.preventDefault();
      composer.active = (composer.active + (key.key === "ArrowDown" ? 1 : count - 1)) % count;
      renderPicker();
      return true;
    case "Enter":
      if (!count || key.shiftKey) return false;
      key.preventDefault();
      chooseCanned(composer.matches[composer.active]);
      return true;
    case "Escape":
      key.preventDefault();
      closePicker();
      return true;
  }
  return false;
}

// Choose (or with null, drop) the canned reply the next Send texts; it is sent
// by id so that its merge fields are filled for the member by the server.
function chooseCanned(canned) {
  composer.canned = canned;
  const box = $("#reply-body");
  const chosen = $("#canned-chosen");
  updateRequired();
  if (canned) {
    box.value = "";
    closePicker();
    chosen.querySelector(".name").textContent = canned.name;
    chosen.querySelector(".body").textContent = canned.body;
    box.focus();
    renderCollision();
  }
  chosen.hidden = !canned;
}
