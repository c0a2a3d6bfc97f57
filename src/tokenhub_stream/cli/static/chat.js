// The tokenhub chat page: plain JS, no build step.
//
// The request is the one the usual tutorial page sends:
//   fetch("/api/chat", {method: "POST", body: JSON.stringify({messages, model}), signal})
// with no content type (the browser labels it text/plain, which ChatProxy accepts and which
// needs no CORS preflight). The answer is read with a ReadableStream reader and a small
// server-sent-events parser (below). Model output only ever reaches the page through
// textContent / text nodes, never innerHTML.
//
// The page asks for a resumable stream (`X-Resumable: 1`): ChatProxy then tags each event with
// an `id:` and answers with `X-Stream-Id`. When the connection drops mid-answer (not after
// the user's Stop), the page fetches `/api/chat/streams/<id>?last_event_id=<last id seen>`
// and continues the same answer from there, a few times with growing pauses. Stop sends
// `DELETE /api/chat/streams/<id>`, since a closed connection no longer stops the upstream.
//
// When the server keeps the history (GET /api/conversations answers), each request also
// carries the conversation's id as `conversation_id` (the server's recorder takes it out
// before forwarding), the sidebar lists the past conversations, and one can be reopened
// and continued. A new chat's id is made here, before its first turn.


// --- Server-sent events -------------------------------------------------------------------

// Splits a text stream into event data, following the HTML spec's event-stream rules: lines
// end with CRLF, LF or CR (a CR at the end of a read may be half of a CRLF, so it waits for
// the next read); ":" lines are comments (keep-alives); "data:" lines of one event are
// joined with "\n"; a blank line ends the event. `id:` sets the id that `lastEventId` reports
// once its event is complete (what a resume starts after). Other fields (event, retry) are
// not used by chat completions and are ignored. An event without its blank line when the
// stream closes is incomplete and dropped, as the spec says.
export class SSEParser {
  constructor(lastEventId = "") {
    this.buffer = "";
    this.data = [];
    this.id = lastEventId;
    this.lastEventId = lastEventId;
  }

  // Feed decoded text; returns the data strings of the events it completed.
  feed(text) {
    this.buffer += text;
    const events = [];
    const eol = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = eol.exec(this.buffer)) !== null) {
      if (match[0] === "\r" && eol.lastIndex === this.buffer.length) break;
      this.line(this.buffer.slice(start, match.index), events);
      start = eol.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  // The stream closed: a trailing CR still ends its line.
  end() {
    const events = [];
    if (this.buffer.endsWith("\r")) this.line(this.buffer.slice(0, -1), events);
    this.buffer = "";
    this.data = [];
    return events;
  }

  line(line, events) {
    if (line === "") {
      this.lastEventId = this.id;
      if (this.data.length) events.push(this.data.join("\n"));
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment, e.g. ": keep-alive"
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = value;
  }
}

// --- One answer ---------------------------------------------------------------------------

// Reads the OpenAI chat-completion chunks of one answer into `turn` and the page.
export function applyFrame(data, turn, view) {
  if (data === "[DONE]") {
    turn.done = true;
    return;
  }
  let obj;
  try {
    obj = JSON.parse(data);
  } catch {
    turn.error = "The server sent a frame that is not JSON.";
    return;
  }
  if (obj === null || typeof obj !== "object") return;
  // An error after the stream began: ChatProxy's and OpenAI's {"error": {...}}, vLLM's
  // {"object": "error", "message": ...}. The answer is incomplete: say so, never drop it.
  if (obj.error) {
    const err = obj.error;
    turn.error = (typeof err === "object" && err.message) || String(err);
    return;
  }
  if (obj.object === "error") {
    turn.error = obj.message || "The upstream reported an error.";
    return;
  }
  if (typeof obj.model === "string" && obj.model) turn.model = obj.model;
  const usage = obj.usage || (obj.x_groq && obj.x_groq.usage);
  if (usage && typeof usage === "object") turn.usage = usage;
  const choice = Array.isArray(obj.choices) ? obj.choices[0] : undefined;
  if (!choice) return; // Azure's filter frames, the usage chunk
  const delta = choice.delta || {};
  const reasoning = delta.reasoning_content ?? delta.reasoning;
  if (typeof reasoning === "string" && reasoning) view.appendReasoning(reasoning);
  if (typeof delta.content === "string" && delta.content) {
    const now = performance.now();
    if (turn.firstAt === null) turn.firstAt = now;
    turn.lastAt = now;
    turn.deltas += 1;
    turn.content += delta.content;
    view.appendText(delta.content);
  }
  // OpenAI's structured-output refusal: the model declined, in words of its own.
  if (typeof delta.refusal === "string" && delta.refusal) {
    turn.refusal += delta.refusal;
    view.appendRefusal(delta.refusal);
  }
  if (choice.finish_reason) turn.finish = choice.finish_reason;
}

function metricsLine(turn) {
  const parts = [turn.model || "default model"];
  if (turn.firstAt !== null) {
    parts.push(`first token ${Math.round(turn.firstAt - turn.startedAt)} ms`);
    const seconds = (turn.lastAt - turn.firstAt) / 1000;
    const tokens = turn.usage && turn.usage.completion_tokens;
    if (seconds > 0 && typeof tokens === "number" && tokens > 1) {
      parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
    } else if (seconds > 0 && turn.deltas > 1) {
      parts.push(`${((turn.deltas - 1) / seconds).toFixed(1)} deltas/s`);
    }
  }
  if (turn.resumed) parts.push(turn.resumed === 1 ? "resumed" : `resumed ${turn.resumed}×`);
  if (turn.outcome === "stopped") parts.push("stopped");
  else if (turn.outcome === "error") parts.push("incomplete");
  else if (turn.finish && turn.finish !== "stop") parts.push(`finish: ${turn.finish}`);
  return parts.join(" · ");
}

// The message of an HTTP error answer: ChatProxy sends {"error": {"message": ...}}.
async function httpErrorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const obj = JSON.parse(text);
    const message = obj && obj.error && (obj.error.message || obj.error);
    if (message) return `HTTP ${response.status}: ${message}`;
  } catch {
    // not JSON: fall through to the raw text
  }
  const snippet = text.trim().slice(0, 300);
  return `HTTP ${response.status}${snippet ? `: ${snippet}` : ` ${response.statusText}`}`;
}

// --- Reading an answer, and resuming it -----------------------------------------------------

const MAX_RESUMES = 5;
const RESUME_PAUSE_MS = 250; // doubled after each failed attempt

// Reads one response body's events into the turn. Returns when the body ends or an error
// frame stopped it; throws when the connection fails.
async function readBody(response, parser, turn, view) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    const events = done
      ? parser.feed(decoder.decode()).concat(parser.end())
      : parser.feed(decoder.decode(value, { stream: true }));
    for (const data of events) {
      applyFrame(data, turn, view);
      if (turn.error) break;
    }
    if (done) return;
    if (turn.error) {
      await reader.cancel().catch(() => {});
      return;
    }
  }
}

function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}

// Reads the answer; if the connection drops before its end and the server made the stream
// resumable, fetches the rest after the last event seen, up to MAX_RESUMES times.
async function readAnswer(response, turn, view, signal) {
  const streamId = response.headers.get("x-stream-id");
  let parser = new SSEParser();
  let body = response;
  let failure = null;
  for (let attempt = 0; ; attempt += 1) {
    if (body !== null) {
      failure = null;
      try {
        await readBody(body, parser, turn, view);
      } catch (error) {
        if (signal.aborted) throw error;
        failure = error;
      }
      if (turn.error || turn.done || (turn.finish && !failure)) return;
      if (!failure && attempt > 0) return; // a resume that ended: the stream ended there
    }
    if (!streamId || attempt >= MAX_RESUMES) {
      if (failure) throw failure;
      return;
    }
    statusLine.textContent = "Connection lost: resuming the answer…";
    await pause(RESUME_PAUSE_MS * 2 ** attempt, signal);
    const last = parser.lastEventId || "0";
    parser = new SSEParser(last);
    body = null;
    try {
      const url = `/api/chat/streams/${encodeURIComponent(streamId)}?last_event_id=${encodeURIComponent(last)}`;
      const resumed = await fetch(url, { signal });
      if (resumed.ok) {
        body = resumed;
        turn.resumed += 1;
        statusLine.textContent = "Answering…";
      } else if (resumed.status < 500) {
        turn.error = `The answer could not be resumed (${await httpErrorMessage(resumed)}).`;
        return;
      } else {
        failure = new Error(await httpErrorMessage(resumed));
      }
    } catch (error) {
      if (signal.aborted) throw error;
      failure = error;
    }
  }
}

// --- The page -----------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const logBox = $("log");
const form = $("composer");
const promptBox = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const modelSelect = $("model");
const statusLine = $("status");

const conversation = []; // the conversation, sent with each request
let controller = null; // the AbortController of the answer streaming now
let streaming = null; // the X-Stream-Id of that answer, for Stop
let conversationId = null; // its id in the history (null: a new chat, named at its first turn)
// Bumped whenever the page switches conversation, so that the late end of an answer from
// the previous one leaves the new one alone.
let epoch = 0;

function nearBottom() {
  return logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 80;
}

function scrollDown(force) {
  if (force || nearBottom()) logBox.scrollTop = logBox.scrollHeight;
}

function addMessage(role, text) {
  const empty = $("empty");
  if (empty) empty.remove();
  const box = document.createElement("article");
  box.className = `msg ${role}`;
  box.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  const body = document.createElement("p");
  body.className = "text";
  const node = document.createTextNode(text);
  body.append(node);
  box.append(body);
  logBox.append(box);
  scrollDown(true);
  return { box, node };
}

function assistantView() {
  const { box, node } = addMessage("assistant", "");
  box.dataset.state = "waiting";
  box.setAttribute("aria-busy", "true");
  let reasoning = null;
  let refusal = null;
  return {
    box,
    appendText(text) {
      const follow = nearBottom();
      if (box.dataset.state === "waiting") box.dataset.state = "streaming";
      node.appendData(text);
      if (follow) scrollDown(true);
    },
    appendRefusal(text) {
      if (refusal === null) {
        const p = document.createElement("p");
        p.className = "refusal";
        p.setAttribute("role", "note");
        p.setAttribute("aria-label", "Refusal");
        refusal = document.createTextNode("");
        p.append(refusal);
        box.append(p);
      }
      if (box.dataset.state === "waiting") box.dataset.state = "streaming";
      refusal.appendData(text);
    },
    appendReasoning(text) {
      if (reasoning === null) {
        const details = document.createElement("details");
        details.className = "reasoning";
        const summary = document.createElement("summary");
        summary.textContent = "Reasoning";
        reasoning = document.createTextNode("");
        const pre = document.createElement("p");
        pre.className = "text";
        pre.append(reasoning);
        details.append(summary, pre);
        box.prepend(details);
      }
      reasoning.appendData(text);
    },
    showError(message) {
      const p = document.createElement("p");
      p.className = "error";
      p.setAttribute("role", "alert");
      p.textContent = message;
      box.append(p);
      scrollDown(false);
    },
    finish(state, meta) {
      box.dataset.state = state;
      box.setAttribute("aria-busy", "false");
      if (meta) {
        const p = document.createElement("p");
        p.className = "meta";
        p.textContent = meta;
        box.append(p);
      }
      scrollDown(false);
    },
  };
}

function setBusy(busy) {
  sendButton.disabled = busy;
  stopButton.disabled = !busy;
  if (!busy && document.activeElement === stopButton) promptBox.focus();
}

async function ask(text) {
  const model = modelSelect.value || undefined;
  const started = epoch;
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const view = assistantView();
  const turn = {
    model: model || "",
    startedAt: performance.now(),
    firstAt: null,
    lastAt: null,
    deltas: 0,
    content: "",
    refusal: "",
    done: false,
    finish: null,
    usage: null,
    error: null,
    outcome: "completed",
    resumed: 0,
  };
  controller = new AbortController();
  const { signal } = controller;
  setBusy(true);
  statusLine.textContent = "Answering…";
  let written = null; // the x-request-id of a turn the server records, to wait for its write
  try {
    const request = { messages: conversation, model };
    if (await historyReady) {
      conversationId = conversationId || newConversationId();
      request.conversation_id = conversationId;
    }
    const response = await fetch("/api/chat", {
      method: "POST",
      headers: { "X-Resumable": "1" },
      body: JSON.stringify(request),
      signal,
    });
    // 4xx answers come from the proxy before anything was forwarded: nothing is recorded.
    if (response.ok || response.status >= 500) written = response.headers.get("x-request-id");
    if (!response.ok) {
      turn.error = await httpErrorMessage(response);
    } else {
      streaming = response.headers.get("x-stream-id");
      await readAnswer(response, turn, view, signal);
      if (!turn.error && !turn.done && !turn.finish) {
        // A bare close after the finish chunk is a complete answer; without either, the
        // connection was cut and the answer may be incomplete.
        turn.error = "The connection closed before the answer finished.";
      }
    }
  } catch (error) {
    if (signal.aborted) turn.outcome = "stopped";
    else turn.error = `The connection failed: ${error.message || error}`;
  } finally {
    controller = null;
    streaming = null;
  }
  if (turn.error) {
    turn.outcome = "error";
    view.showError(turn.error);
  }
  view.finish(turn.outcome === "completed" ? "done" : turn.outcome, metricsLine(turn));
  if (started === epoch) {
    if (turn.content || turn.refusal) {
      // A refusal stays in the context as what the model said.
      conversation.push({ role: "assistant", content: turn.content || turn.refusal });
    } else if (turn.outcome !== "completed") {
      conversation.pop(); // no answer: this question is not part of the conversation
    }
    statusLine.textContent =
      turn.outcome === "completed" ? "Answer complete." : turn.outcome === "stopped" ? "Stopped." : `Error: ${turn.error}`;
  }
  setBusy(false);
  if (historyOn) refreshHistory(written);
  refreshStats();
}

function stopAnswer() {
  // A resumable stream outlives its connection: ask the server to stop the upstream too.
  if (streaming) {
    const url = `/api/chat/streams/${encodeURIComponent(streaming)}`;
    fetch(url, { method: "DELETE", keepalive: true }).catch(() => {});
    streaming = null;
  }
  if (controller) controller.abort();
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = promptBox.value.trim();
  if (!text || controller) return;
  promptBox.value = "";
  ask(text);
});

promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey &&
      !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && controller) {
    event.preventDefault();
    stopAnswer();
  } else if (event.key === "Escape" && historyBox.classList.contains("open")) {
    event.preventDefault();
    showHistory(false);
    historyToggle.focus();
  }
});

stopButton.addEventListener("click", stopAnswer);

// Leave the conversation on the page (stopping its answer) for an empty one.
function startOver(message) {
  stopAnswer();
  epoch += 1;
  conversation.length = 0;
  conversationId = null;
  logBox.replaceChildren();
  if (message) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.id = "empty";
    empty.textContent = message;
    logBox.append(empty);
  }
  markCurrent();
}

$("new-chat").addEventListener("click", () => {
  startOver("New conversation.");
  statusLine.textContent = "New conversation.";
  promptBox.focus();
});

// --- Past conversations -------------------------------------------------------------------

const historyBox = $("history");
const historyList = $("history-list");
const historyEmpty = $("history-empty");
const historyToggle = $("history-toggle");
let historyOn = false;
let listed = 0; // bumped per list request: only the latest one is drawn
let opening = 0; // likewise for reopening a conversation

// 128 random bits as hex. Not crypto.randomUUID: that needs a secure context, and the page
// is often opened over plain http from a phone on the same network.
function newConversationId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function showNotice(text) {
  const notice = $("notice");
  notice.textContent = text;
  notice.hidden = false;
}

// Phone width: the list is a panel opened from the header; wider, it is always shown.
function showHistory(open) {
  historyBox.classList.toggle("open", open);
  historyToggle.setAttribute("aria-expanded", String(open));
}

historyToggle.addEventListener("click", () => {
  const open = !historyBox.classList.contains("open");
  showHistory(open);
  if (open) (historyList.querySelector("button.open") || historyToggle).focus();
});

function markCurrent() {
  for (const button of historyList.querySelectorAll("button.open")) {
    if (button.dataset.id === conversationId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

function shortTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const today = new Date().toDateString() === date.toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { day: "numeric", month: "short", year: "numeric" });
}

function drawHistory(items) {
  // Keep the keyboard focus on the same conversation across the redraw.
  const focused = document.activeElement;
  const focusedId = historyList.contains(focused) ? focused.dataset.id : null;
  const focusedDelete = focused && focused.classList.contains("delete");
  historyList.replaceChildren();
  for (const item of items) {
    if (!item || typeof item.id !== "string") continue;
    const title = (typeof item.title === "string" && item.title) || "Untitled";
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.dataset.id = item.id;
    const name = document.createElement("span");
    name.className = "title";
    name.textContent = title;
    const time = document.createElement("time");
    time.dateTime = item.updated || "";
    time.textContent = shortTime(item.updated);
    open.append(name, time);
    open.addEventListener("click", () => openConversation(item.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete";
    remove.dataset.id = item.id;
    remove.textContent = "×";
    remove.title = "Delete";
    remove.setAttribute("aria-label", `Delete “${title}”`);
    remove.addEventListener("click", () => deleteConversation(item.id));
    li.append(open, remove);
    historyList.append(li);
  }
  historyEmpty.hidden = historyList.childElementCount > 0;
  markCurrent();
  if (focusedId) {
    const selector = focusedDelete ? "button.delete" : "button.open";
    const again = [...historyList.querySelectorAll(selector)].find((b) => b.dataset.id === focusedId);
    if (again) again.focus();
  }
}

// Redraws the list. `after`: the x-request-id of the turn that just ended; the server waits
// for that turn's write before it answers, so the new conversation is already listed.
async function refreshHistory(after) {
  const token = ++listed;
  const query = after ? `?after=${encodeURIComponent(after)}` : "";
  try {
    const response = await fetch(`/api/conversations${query}`);
    if (!response.ok) throw new Error(await httpErrorMessage(response));
    const body = await response.json();
    if (token === listed) drawHistory(Array.isArray(body.conversations) ? body.conversations : []);
  } catch (error) {
    if (token === listed) showNotice(`Could not list past conversations (${error.message || error}).`);
  }
}

// Does the server keep a history? Resolves to true or false, and draws the list.
async function loadHistory() {
  let response;
  try {
    response = await fetch("/api/conversations");
  } catch {
    return false;
  }
  if (response.status === 404) return false; // served without a store
  if (!response.ok) {
    showNotice(`No history: ${await httpErrorMessage(response)}`);
    return false;
  }
  const body = await response.json().catch(() => ({}));
  historyOn = true;
  document.body.classList.add("has-history");
  drawHistory(Array.isArray(body.conversations) ? body.conversations : []);
  return true;
}

// One stored message, drawn as if it had just been answered.
function drawStored(message) {
  const content = typeof message.content === "string" ? message.content : "";
  if (message.role === "user") {
    addMessage("user", content);
    conversation.push({ role: "user", content });
    return;
  }
  if (message.role !== "assistant") return; // system prompts and tool results: not shown
  const refusal = typeof message.refusal === "string" ? message.refusal : "";
  const view = assistantView();
  if (content) view.appendText(content);
  if (refusal) view.appendRefusal(refusal);
  if (message.error) view.showError(message.error);
  const outcome = message.outcome || "completed";
  const state = outcome === "completed" ? "done" : outcome === "client-disconnected" ? "stopped" : "error";
  const meta = [message.model || "assistant"];
  if (state === "stopped") meta.push("stopped");
  else if (state === "error") meta.push("incomplete");
  else if (message.finish_reason && message.finish_reason !== "stop") meta.push(`finish: ${message.finish_reason}`);
  view.finish(state, meta.join(" · "));
  // As during the chat: an answer that never came takes its question out of the context.
  if (content || refusal) conversation.push({ role: "assistant", content: content || refusal });
  else if (conversation.length && conversation[conversation.length - 1].role === "user") conversation.pop();
}

async function openConversation(id) {
  const token = ++opening;
  let body;
  try {
    const response = await fetch(`/api/conversations/${encodeURIComponent(id)}`);
    if (response.status === 404) {
      showNotice("That conversation no longer exists.");
      refreshHistory();
      return;
    }
    if (!response.ok) throw new Error(await httpErrorMessage(response));
    body = await response.json();
  } catch (error) {
    showNotice(`Could not open the conversation (${error.message || error}).`);
    return;
  }
  if (token !== opening) return; // another one was chosen meanwhile
  startOver(null);
  conversationId = body.id;
  for (const message of Array.isArray(body.messages) ? body.messages : []) drawStored(message);
  if (!logBox.childElementCount) startOver("This conversation is empty.");
  conversationId = body.id;
  markCurrent();
  showHistory(false);
  logBox.scrollTop = logBox.scrollHeight;
  statusLine.textContent = `Opened: ${body.title || "Untitled"}.`;
  promptBox.focus();
}

async function deleteConversation(id) {
  // Where the focus goes once the item is gone: the next item, else the previous one.
  const items = [...historyList.querySelectorAll("button.delete")];
  const index = items.findIndex((b) => b.dataset.id === id);
  const neighbour = items[index + 1] || items[index - 1];
  const nextId = neighbour ? neighbour.dataset.id : null;
  try {
    const response = await fetch(`/api/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (!response.ok && response.status !== 404) throw new Error(await httpErrorMessage(response));
  } catch (error) {
    showNotice(`Could not delete the conversation (${error.message || error}).`);
    return;
  }
  if (id === conversationId) startOver("New conversation.");
  statusLine.textContent = "Conversation deleted.";
  await refreshHistory();
  const next = [...historyList.querySelectorAll("button.delete")].find((b) => b.dataset.id === nextId);
  (next || promptBox).focus();
}

const historyReady = loadHistory();

async function loadModels() {
  const notice = $("notice");
  let config = { default_model: "", local: false };
  try {
    const response = await fetch("/config.json");
    if (response.ok) config = await response.json();
  } catch {
    // the page also works without it
  }
  if (config.local) {
    notice.textContent =
      "No TOKENHUB_KEY or base URL: answers come from the local test upstream (no network).";
    notice.hidden = false;
  }
  let ids = [];
  try {
    const response = await fetch("/api/chat/models");
    if (!response.ok) throw new Error(await httpErrorMessage(response));
    const body = await response.json();
    ids = (body.data || []).map((m) => m && m.id).filter((id) => typeof id === "string");
  } catch (error) {
    notice.textContent = `Could not list the models (${error.message || error}); using the default.`;
    notice.hidden = false;
  }
  modelSelect.replaceChildren();
  if (!ids.length) {
    const option = new Option(config.default_model || "default", "");
    modelSelect.append(option);
  }
  for (const id of ids) modelSelect.append(new Option(id, id));
  if (config.default_model && ids.includes(config.default_model)) {
    modelSelect.value = config.default_model;
  }
  modelSelect.disabled = false;
}

// --- What the server is doing now ----------------------------------------------------------

// GET /api/chat/stats (ChatProxy(stats=True)): open streams, the p50/p95 time to first
// token and the median tokens/s of the recent answers, all this server process's. Polled
// every few seconds while the page is visible, and after each answer; the panel stays
// hidden when the server does not offer it. Not a live region: it changes too often to be
// read out, and its numbers are there to look at.
const STATS_INTERVAL_MS = 5000;
const statsBox = $("stats");
let statsOn = true; // false once the server says it has no stats

function millis(seconds) {
  return typeof seconds === "number" ? `${Math.round(seconds * 1000)} ms` : "–";
}

export function drawStats(stats) {
  const ttft = stats.time_to_first_token || {};
  const rate = stats.tokens_per_second || {};
  $("stats-open").textContent = String(stats.open_streams ?? "–");
  $("stats-ttft").textContent = ttft.samples ? `${millis(ttft.p50)} / ${millis(ttft.p95)}` : "–";
  $("stats-rate").textContent = rate.samples ? String(Math.round(rate.p50)) : "–";
  statsBox.hidden = false;
}

async function refreshStats() {
  if (!statsOn || document.hidden) return;
  try {
    const response = await fetch("/api/chat/stats", { cache: "no-store" });
    if (response.status === 404) {
      statsOn = false; // this server does not count: no panel, no more polling
      return;
    }
    if (response.ok) drawStats(await response.json());
  } catch {
    // the server is restarting, or the network dropped: try again at the next tick
  }
}

refreshStats();
setInterval(refreshStats, STATS_INTERVAL_MS);
document.addEventListener("visibilitychange", refreshStats);

loadModels();
promptBox.focus();
