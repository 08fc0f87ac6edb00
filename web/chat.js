// The web chat page: no framework, no build step. The session is an HttpOnly cookie
// (POST /chat/session); messages go to POST /chat/messages with an id of their own, resent
// with the same id after a network error (answered once). The answer streams back in that
// response (Server-Sent Events: `delta` pieces, then `done` with the JSON body), so it grows
// on the page as the language model writes it; every reply (deferred ones too) also arrives
// over GET /chat/events, which the browser resumes from the last event id it got.
// Bot text is only ever set as textContent, never parsed as HTML.
"use strict";

(() => {
  const log = document.getElementById("log");
  const statusEl = document.getElementById("status");
  const form = document.getElementById("send");
  const input = document.getElementById("text");
  const STORE = "bot-chat-sent"; // the user's own lines, kept in this browser for the history
  const KEEP = 200;
  const WAITING = "Waiting for an answer…";
  const exchanges = new Map(); // message id -> {bot line, kind of reply shown}
  let sent = load();
  let source = null;
  let lastId = "";

  function load() {
    try {
      const value = JSON.parse(localStorage.getItem(STORE) || "[]");
      return Array.isArray(value) ? value : [];
    } catch {
      return [];
    }
  }

  function save() {
    sent = sent.slice(-KEEP);
    try {
      localStorage.setItem(STORE, JSON.stringify(sent));
    } catch {
      // storage full or refused: the conversation goes on, only the reload loses lines
    }
  }

  function setStatus(state, text) {
    statusEl.dataset.state = state;
    if (statusEl.textContent !== text) statusEl.textContent = text;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function newId() {
    const bytes = crypto.getRandomValues(new Uint8Array(12));
    return "w-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function line(who, text) {
    const p = document.createElement("p");
    p.className = "line " + who;
    const name = document.createElement("span");
    name.className = "who";
    name.textContent = who === "you" ? "You: " : "Bot: ";
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    p.append(name, body);
    return p;
  }

  function scrollDown() {
    log.scrollTop = log.scrollHeight;
  }

  // One exchange per message id: the user's line (when this browser sent it), then the bot's.
  function exchange(id, text) {
    let entry = exchanges.get(id);
    if (entry) return entry;
    const item = document.createElement("div");
    item.className = "exchange";
    item.dataset.messageId = id;
    if (text !== undefined) item.append(line("you", text));
    const bot = line("bot", "");
    bot.hidden = true;
    item.append(bot);
    log.append(item);
    entry = { bot, kind: "" };
    exchanges.set(id, entry);
    scrollDown();
    return entry;
  }

  function showState(entry, text, error = false) {
    if (entry.kind) return; // an answer is already shown
    entry.bot.hidden = false;
    entry.bot.classList.remove("streaming");
    entry.bot.classList.add("pending");
    entry.bot.classList.toggle("error", error);
    entry.bot.querySelector(".text").textContent = text;
    scrollDown();
  }

  // An apology (attempts used up) never replaces an answer; an answer replaces anything.
  function showReply(entry, reply, kind) {
    if (entry.kind === "answer" || (entry.kind && kind !== "answer")) return;
    entry.kind = kind;
    entry.bot.hidden = false;
    entry.bot.classList.remove("pending", "error", "streaming");
    entry.bot.querySelector(".text").textContent = reply;
    scrollDown();
  }

  // The answer so far, while it streams: still pending until the whole of it is there.
  function showGrowing(entry, text) {
    if (entry.kind) return;
    entry.bot.hidden = false;
    entry.bot.classList.remove("error");
    entry.bot.classList.add("pending", "streaming");
    entry.bot.querySelector(".text").textContent = text;
    scrollDown();
  }

  function parseEvent(block) {
    let name = "message";
    const data = [];
    for (const field of block.split("\n")) {
      if (field.startsWith("event:")) name = field.slice(6).trim();
      else if (field.startsWith("data:")) data.push(field.slice(5).replace(/^ /, ""));
    }
    try {
      return { name, data: JSON.parse(data.join("\n")) };
    } catch {
      return null; // a comment, or not ours
    }
  }

  // Reads a streamed answer, showing it as it grows; the body of its `done` event, or null
  // when the stream broke (or failed) before it: the caller sends the message again.
  async function readAnswer(r, entry) {
    const decoder = new TextDecoder();
    let buffer = "";
    let text = "";
    try {
      const reader = r.body.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return null;
        buffer += decoder.decode(value, { stream: true }).replace(/\r/g, "");
        for (let cut = buffer.indexOf("\n\n"); cut >= 0; cut = buffer.indexOf("\n\n")) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!event) continue;
          if (event.name !== "delta") return event.name === "done" ? event.data : null;
          text += String(event.data.text);
          showGrowing(entry, text);
        }
      }
    } catch {
      return null; // the connection broke midway
    }
  }

  function record(id, state) {
    const rec = sent.find((r) => r.id === id);
    if (rec && rec.state !== state) {
      rec.state = state;
      save();
    }
  }

  async function startSession() {
    for (let delay = 1000; ; delay = Math.min(delay * 2, 15000)) {
      try {
        const r = await fetch("/chat/session", { method: "POST", credentials: "same-origin" });
        if (r.ok) return;
      } catch {
        // the network or the stack is away: try again
      }
      setStatus(navigator.onLine ? "reconnecting" : "offline", navigator.onLine ? "Reconnecting…" : "Offline");
      await sleep(delay);
    }
  }

  async function send(rec) {
    const entry = exchange(rec.id, rec.text);
    showState(entry, "Sending…");
    for (let delay = 1000; ; delay = Math.min(delay * 2, 15000)) {
      let r = null;
      try {
        r = await fetch("/chat/messages", {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
          body: JSON.stringify({ text: rec.text, message_id: rec.id }),
        });
      } catch {
        r = null; // a network error: the same message id again, so it is answered once
      }
      if (r && r.status === 401) {
        await startSession();
        continue;
      }
      let body = null;
      if (r && r.ok) {
        const streamed = (r.headers.get("Content-Type") || "").startsWith("text/event-stream");
        body = streamed ? await readAnswer(r, entry) : await r.json().catch(() => null);
        if (!body) r = null; // cut before its end: the same message id again
      }
      if (body) {
        if (body.status === "replied") {
          showReply(entry, body.reply, "answer");
          record(rec.id, "answered");
        } else {
          showState(entry, WAITING); // queued: the answer arrives over the event stream
          record(rec.id, "queued");
        }
        return;
      }
      if (r && r.status >= 400 && r.status < 500 && r.status !== 408 && r.status !== 429) {
        let why = "not sent";
        try {
          why = "Not sent: " + (await r.json()).error.message;
        } catch {
          // not our JSON: keep the plain words
        }
        showState(entry, why, true);
        record(rec.id, "failed");
        return;
      }
      const retryAfter = r ? Number(r.headers.get("Retry-After")) : 0;
      // A stream that broke midway keeps what it showed until the answer comes whole.
      if (!entry.bot.classList.contains("streaming")) showState(entry, "Not sent yet: trying again…");
      await sleep(retryAfter > 0 ? retryAfter * 1000 : delay);
    }
  }

  function connect() {
    setStatus(lastId || source ? "reconnecting" : "connecting", lastId || source ? "Reconnecting…" : "Connecting…");
    const url = "/chat/events" + (lastId ? "?after=" + encodeURIComponent(lastId) : "");
    source = new EventSource(url);
    source.onopen = () => setStatus("online", "Connected");
    source.addEventListener("reply", (ev) => {
      if (ev.lastEventId) lastId = ev.lastEventId;
      let data;
      try {
        data = JSON.parse(ev.data);
      } catch {
        return;
      }
      showReply(exchange(data.message_id), String(data.reply), data.kind || "answer");
      record(data.message_id, "answered");
    });
    source.onerror = () => {
      if (!navigator.onLine) setStatus("offline", "Offline");
      else setStatus("reconnecting", "Reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        // Refused (no session any more, every replica full): start over in a while, from
        // the last event seen. The browser reconnects by itself otherwise.
        source = null;
        setTimeout(async () => {
          await startSession();
          if (!source) connect();
        }, 2000);
      }
    };
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    const rec = { id: newId(), text, state: "sending" };
    sent.push(rec);
    save();
    send(rec);
  });

  window.addEventListener("offline", () => setStatus("offline", "Offline"));
  window.addEventListener("online", () => {
    if (source && source.readyState === EventSource.OPEN) setStatus("online", "Connected");
  });

  async function start() {
    // The history: this browser's own lines now, the bot's as the event stream replays them.
    for (const rec of sent) {
      const entry = exchange(rec.id, rec.text);
      if (rec.state === "queued" || rec.state === "answered") showState(entry, WAITING);
    }
    await startSession();
    connect();
    // What never reached the stack before the page closed goes again, with its own id.
    for (const rec of sent) if (rec.state === "sending") send(rec);
  }

  start();
})();
