// The lucidlm chat page: streams /v1/chat/completions and colours every token by its hallucination
// score (the server's `token_scores` extension). No framework, no CDN: everything is served locally.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, probe: false, messages: [], controller: null };

function colour(score) {
  // 0 -> green, 0.5 -> yellow, 1 -> red (hue 120 -> 0)
  return `hsl(${Math.round(120 * (1 - score))} 70% 85%)`;
}

function threshold() { return parseFloat($("threshold").value); }

async function loadModel() {
  try {
    const res = await fetch("/v1/models");
    const card = (await res.json()).data[0];
    state.model = card.id;
    state.probe = card.probe;
    $("model").textContent = `${card.id} · context ${card.max_model_len}`;
    $("probe-status").textContent = card.probe
      ? `probe on block ${card.probe_layer}: hover a token for its score`
      : "no probe loaded (start the server with --probe DIR to see scores)";
  } catch (e) {
    $("model").textContent = `cannot reach the server: ${e}`;
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  div.append(label);
  if (text) div.append(document.createTextNode(text));
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function addToken(div, text, score) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = text;
  if (score !== null && score !== undefined) {
    span.dataset.score = score.toFixed(3);
    span.style.background = colour(score);
    span.classList.toggle("flagged", score >= threshold());
  }
  div.append(span);
  $("log").scrollTop = $("log").scrollHeight;
}

function refreshFlags() {
  const t = threshold();
  $("threshold-value").textContent = t.toFixed(2);
  const list = $("flagged");
  list.replaceChildren();
  for (const message of document.querySelectorAll(".message.assistant")) {
    let span = null;
    for (const tok of message.querySelectorAll(".token")) {
      const score = tok.dataset.score === undefined ? null : parseFloat(tok.dataset.score);
      const flagged = score !== null && score >= t;
      tok.classList.toggle("flagged", flagged);
      if (flagged) {
        if (!span) span = { text: "", max: 0 };
        span.text += tok.textContent;
        span.max = Math.max(span.max, score);
      } else if (span) {
        pushSpan(list, span);
        span = null;
      }
    }
    if (span) pushSpan(list, span);
  }
}

function pushSpan(list, span) {
  if (!span.text.trim()) return;
  const li = document.createElement("li");
  li.textContent = `“${span.text.trim()}” (max ${span.max.toFixed(2)})`;
  list.append(li);
}

async function send(prompt) {
  state.messages.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const div = addMessage("assistant", "");
  const body = {
    model: state.model, messages: state.messages, stream: true,
    max_tokens: parseInt($("max-tokens").value, 10) || 64,
    temperature: parseFloat($("temperature").value) || 0,
  };
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let reply = "";
  let finish = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!res.ok) throw new Error((await res.json()).error.message);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        if (!choice) continue;
        if (choice.finish_reason) finish = choice.finish_reason;
        const text = choice.delta && choice.delta.content;
        if (text === undefined || choice.delta.role) continue;
        const scores = choice.token_scores;
        const score = scores && scores.length ? scores[0].score : null;
        if (text) addToken(div, text, score);
        reply += text;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") addMessage("error", String(e.message || e));
    finish = finish || "stopped";
  } finally {
    state.messages.push({ role: "assistant", content: reply });
    const end = document.createElement("span");
    end.className = "finish";
    end.textContent = `finish: ${finish}`;
    div.append(end);
    $("send").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
    refreshFlags();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.controller) return;
  $("prompt").value = "";
  send(prompt);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  state.messages = [];
  $("log").replaceChildren();
  refreshFlags();
});
$("threshold").addEventListener("input", refreshFlags);

// Hover: show the token's score next to the pointer
$("log").addEventListener("mouseover", (e) => {
  const tok = e.target.closest(".token");
  const tip = $("tooltip");
  if (!tok || tok.dataset.score === undefined) { tip.hidden = true; return; }
  tip.textContent = `score ${tok.dataset.score}`;
  const r = tok.getBoundingClientRect();
  tip.style.left = `${r.left}px`;
  tip.style.top = `${r.bottom + 4}px`;
  tip.hidden = false;
});
$("log").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });

loadModel();
