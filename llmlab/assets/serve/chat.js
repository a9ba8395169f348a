// llmlab chat page: streams /v1/chat/completions. No build step, no dependencies.
// Model output is NEVER inserted as HTML: the markdown renderer below builds DOM nodes and sets textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get: (k, d) => { try { return JSON.parse(localStorage.getItem("llmlab." + k)) ?? d; } catch { return d; } },
  set: (k, v) => localStorage.setItem("llmlab." + k, JSON.stringify(v)),
};
let conversations = store.get("conversations", []);
let current = store.get("current", null);
let controller = null;

// ------------------------------------------------------------------ safe markdown (DOM building only)
function inline(parent, text) {
  // `code`, **bold**, *italic*; everything else is plain text.
  const re = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    const tok = m[0];
    let el;
    if (tok.startsWith("`")) { el = document.createElement("code"); el.textContent = tok.slice(1, -1); }
    else if (tok.startsWith("**")) { el = document.createElement("strong"); el.textContent = tok.slice(2, -2); }
    else { el = document.createElement("em"); el.textContent = tok.slice(1, -1); }
    parent.appendChild(el);
    last = m.index + tok.length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function renderMarkdown(container, text) {
  container.replaceChildren();
  const lines = text.split("\n");
  let i = 0, para = [];
  const flush = () => {
    if (para.length) { const p = document.createElement("p"); inline(p, para.join("\n")); container.appendChild(p); }
    para = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^```\s*([\w+-]*)/);
    if (fence) {
      flush();
      const code = [];
      i++;
      while (i < lines.length && !lines[i].startsWith("```")) code.push(lines[i++]);
      i++;
      const pre = document.createElement("pre"), c = document.createElement("code");
      if (fence[1]) c.dataset.lang = fence[1];
      c.textContent = code.join("\n");
      pre.appendChild(c);
      container.appendChild(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*([-*+]|\d+\.)\s+(.*)$/);
    if (heading) {
      flush();
      const h = document.createElement("h" + Math.min(6, heading[1].length + 2));
      inline(h, heading[2]);
      container.appendChild(h);
    } else if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      let list = container.lastElementChild;
      if (!list || list.tagName !== (ordered ? "OL" : "UL")) {
        list = document.createElement(ordered ? "ol" : "ul");
        container.appendChild(list);
      }
      const li = document.createElement("li");
      inline(li, item[2]);
      list.appendChild(li);
    } else if (!line.trim()) {
      flush();
    } else {
      para.push(line);
    }
    i++;
  }
  flush();
}

// ------------------------------------------------------------------ conversations
function conversation() {
  let c = conversations.find((x) => x.id === current);
  if (!c) {
    c = { id: String(Date.now()), title: "New chat", messages: [] };
    conversations.unshift(c);
    current = c.id;
  }
  return c;
}
function save() { store.set("conversations", conversations.slice(0, 50)); store.set("current", current); }

function refreshConversationList() {
  const sel = $("conversations");
  sel.replaceChildren();
  for (const c of conversations) {
    const o = document.createElement("option");
    o.value = c.id;
    o.textContent = c.title;
    sel.appendChild(o);
  }
  sel.value = current;
}

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  div.appendChild(body);
  if (role === "assistant") {
    renderMarkdown(body, text);
    const copy = document.createElement("button");
    copy.className = "copy";
    copy.type = "button";
    copy.textContent = "copy";
    copy.addEventListener("click", () => navigator.clipboard?.writeText(div.dataset.raw || ""));
    div.appendChild(copy);
    div.dataset.raw = text;
  } else {
    body.textContent = text;
  }
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function showConversation() {
  $("messages").replaceChildren();
  for (const m of conversation().messages) addBubble(m.role, m.content);
  refreshConversationList();
}

// ------------------------------------------------------------------ server calls
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = store.get("apiKey", "");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, init, retried) {
  const r = await fetch(path, { ...init, headers: headers() });
  if (r.status === 401 && !retried) {
    const key = window.prompt("This server needs an API key:");
    if (key) { store.set("apiKey", key.trim()); return api(path, init, true); }
  }
  return r;
}

async function loadModels() {
  const r = await api("/v1/models", { method: "GET" });
  if (!r.ok) return;
  const sel = $("model");
  sel.replaceChildren();
  for (const m of (await r.json()).data) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = m.id;
    sel.appendChild(o);
  }
  const saved = store.get("model", null);
  if (saved && [...sel.options].some((o) => o.value === saved)) sel.value = saved;
  sel.hidden = sel.options.length < 2;  // a picker only when several models or adapters are served
}

async function generate() {
  const conv = conversation();
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(conv.messages);
  const body = {
    model: $("model").value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  const bubble = addBubble("assistant", "");
  let text = "", tokens = 0, chunks = 0, first = null;
  const start = performance.now();
  controller = new AbortController();
  $("stop").disabled = false;
  $("send").disabled = true;
  try {
    const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error?.message || r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data:")) continue;
        const data = event.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          if (first === null) first = performance.now();
          text += delta;
          chunks += 1;  // one engine step each; the final usage chunk gives the exact count
          bubble.dataset.raw = text;
          renderMarkdown(bubble.querySelector(".body"), text);
          $("messages").scrollTop = $("messages").scrollHeight;
          showStats(start, first, text, chunks);
        }
      }
    }
    showStats(start, first, text, tokens || chunks);
  } catch (e) {
    if (e.name !== "AbortError") addBubble("error", String(e.message || e));
  } finally {
    controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
    if (text) { conv.messages.push({ role: "assistant", content: text }); save(); }
    else bubble.remove();
  }
}

function showStats(start, first, text, tokens) {
  const now = performance.now();
  const ttft = first === null ? null : first - start;
  const parts = [];
  if (ttft !== null) parts.push(`TTFT ${ttft.toFixed(0)} ms`);
  if (tokens && first !== null && now > first) parts.push(`${tokens} tokens, ${(tokens / ((now - first) / 1000)).toFixed(1)} tok/s`);
  else parts.push(`${text.length} chars`);
  $("stats").textContent = parts.join(" · ");
}

function send() {
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  const conv = conversation();
  if (!conv.messages.length) conv.title = text.slice(0, 40);
  conv.messages.push({ role: "user", content: text });
  save();
  addBubble("user", text);
  refreshConversationList();
  $("prompt").value = "";
  generate();
}

function stop() { if (controller) controller.abort(); }

// ------------------------------------------------------------------ wiring
document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  $("stop").addEventListener("click", stop);
  $("regenerate").addEventListener("click", () => {
    const conv = conversation();
    if (controller || !conv.messages.length) return;
    if (conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
    save();
    showConversation();
    generate();
  });
  $("clear").addEventListener("click", () => { stop(); conversation().messages = []; save(); showConversation(); });
  $("new").addEventListener("click", () => { stop(); current = null; conversation(); save(); showConversation(); });
  $("conversations").addEventListener("change", (e) => { stop(); current = e.target.value; save(); showConversation(); });
  $("model").addEventListener("change", (e) => store.set("model", e.target.value));
  $("toggle-settings").addEventListener("click", (e) => {
    const s = $("settings");
    s.hidden = !s.hidden;
    e.target.setAttribute("aria-expanded", String(!s.hidden));
  });
  for (const id of ["system", "temperature", "top_p", "max_tokens"]) {
    const saved = store.get("setting." + id, null);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => store.set("setting." + id, $(id).value));
  }
  showConversation();
  loadModels();
});
