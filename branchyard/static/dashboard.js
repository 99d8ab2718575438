// branchyard dashboard: follows the event stream and swaps in the server-rendered
// part of the page that changed; actions, env edit and live logs on a service's page.
// No build step, no dependencies. The server renders everything; this only fetches.
"use strict";

(() => {
  const body = document.body;
  const page = body.dataset.page;
  if (page !== "overview" && page !== "service") return;

  const csrf = document.querySelector('meta[name="branchyard-csrf"]').content;
  const root = body.dataset.root; // the session's /d/KEY: its cookie is sent only under it
  const namespace = body.dataset.namespace || null;
  const service = body.dataset.service || null;
  const main = document.getElementById("main");
  const announcer = document.getElementById("announce");
  const conn = document.getElementById("conn");

  // -- ages ("4s", "3m") tick without a round trip --------------------------------------

  function age(since) {
    const seconds = Math.max(0, Math.floor(Date.now() / 1000 - since));
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (seconds >= size) return Math.floor(seconds / size) + unit;
    }
    return seconds + "s";
  }

  function tick() {
    for (const el of document.querySelectorAll("time[data-since]")) {
      const since = parseFloat(el.dataset.since);
      if (!Number.isNaN(since)) el.textContent = age(since);
    }
  }
  setInterval(tick, 5000);

  // -- the changing parts: fetched as HTML (?part=live), swapped in by id when changed -

  let refreshing = false;
  let again = false;
  let timer = null;
  const afterRefresh = [];

  const shown = new Map(); // part id -> what it shows, ages left out (they tick here)
  const withoutAges = (html) => html.replace(/(<time[^>]*>)[^<]*(<\/time>)/g, "$1$2");
  for (const part of document.querySelectorAll("[data-part][id]")) {
    shown.set(part.id, withoutAges(part.innerHTML));
  }

  function swap(fresh) {
    const focused = document.activeElement && document.activeElement.id;
    let changed = false;
    for (const part of fresh.querySelectorAll("[data-part][id]")) {
      const old = document.getElementById(part.id);
      const html = withoutAges(part.innerHTML);
      if (!old || shown.get(part.id) === html) continue;
      const open = [...old.querySelectorAll("details[id]")].filter((d) => d.open).map((d) => d.id);
      old.innerHTML = part.innerHTML;
      shown.set(part.id, html);
      for (const id of open) {
        const details = document.getElementById(id);
        if (details) details.open = true;
      }
      changed = true;
    }
    if (changed && focused && document.activeElement !== document.getElementById(focused)) {
      const target = document.getElementById(focused);
      if (target) target.focus();
    }
    return changed;
  }

  async function refresh() {
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    try {
      const url = new URL(location.href);
      url.hash = "";
      url.searchParams.set("part", "live");
      const answer = await fetch(url, { cache: "no-store", credentials: "same-origin" });
      if (answer.status === 401) {
        say("Your session ended; reload the page to log in again.", true);
        return;
      }
      if (answer.status === 404) {
        say(`${service} is no longer in ${namespace}.`, true);
        return;
      }
      if (!answer.ok) return;
      const fresh = document.createElement("template");
      fresh.innerHTML = await answer.text();
      if (swap(fresh.content)) {
        tick();
        for (const hook of afterRefresh) hook();
      }
    } catch (error) {
      // the daemon went away for a moment: the event stream reconnects and refreshes
    } finally {
      refreshing = false;
      if (again) {
        again = false;
        schedule(0);
      }
    }
  }

  function schedule(delay = 120) {
    clearTimeout(timer);
    timer = setTimeout(refresh, delay);
  }

  function clear() {
    say("");
    say("", true);
  }

  function say(text, problem = false) {
    const target = document.getElementById(problem ? "problem" : "notice");
    if (target) {
      target.textContent = text;
    } else {
      announcer.textContent = text;
    }
  }

  // -- the event stream (server-sent events, read with fetch to resume by id) ----------

  let after = parseInt(body.dataset.after || "0", 10);
  const eventHooks = [];

  async function readStream(url, onText, signal) {
    const answer = await fetch(url, { cache: "no-store", credentials: "same-origin", signal });
    if (!answer.ok || !answer.body) {
      const error = new Error(`HTTP ${answer.status}`);
      error.status = answer.status;
      throw error;
    }
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      onText(decoder.decode(value, { stream: true }));
    }
  }

  function onEvent(event) {
    after = Math.max(after, event.id);
    if (namespace && (event.namespace !== namespace || event.service !== service)) return;
    if (event.namespace && ["live", "failed", "crashed", "rollback", "promote"].includes(event.kind)) {
      announcer.textContent = `${event.namespace}:${event.service} ${event.message}`;
    }
    for (const hook of eventHooks) hook(event);
    schedule();
  }

  async function followEvents() {
    for (;;) {
      let pending = "";
      const query = new URLSearchParams({ after: String(after) });
      if (namespace) query.set("namespace", namespace);
      try {
        await readStream(`${root}/events?${query}`, (text) => {
          conn.hidden = true;
          pending += text;
          let end;
          while ((end = pending.indexOf("\n\n")) >= 0) {
            const block = pending.slice(0, end);
            pending = pending.slice(end + 2);
            const data = block.split("\n").filter((l) => l.startsWith("data: "))
              .map((l) => l.slice(6)).join("\n");
            if (data) onEvent(JSON.parse(data));
          }
        });
      } catch (error) {
        if (error.status === 401) {
          say("Your session ended; reload the page to log in again.", true);
          return;
        }
      }
      conn.hidden = false;
      await new Promise((resolve) => setTimeout(resolve, 2000));
      schedule(0);
    }
  }

  // Some changes make no event (a build turning into a start); look now and then too.
  setInterval(() => schedule(0), 15000);
  followEvents();

  // -- the overview grid: arrow keys move between cells --------------------------------

  if (page === "overview") {
    main.addEventListener("keydown", (event) => {
      const link = event.target.closest && event.target.closest("a.cell-link");
      const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
      if (!link || !(event.key in moves) || event.altKey || event.ctrlKey || event.metaKey) return;
      const [dr, dc] = moves[event.key];
      const cell = link.closest("td");
      const row = cell.parentElement;
      const rows = [...row.parentElement.children];
      let r = rows.indexOf(row);
      let c = [...row.children].indexOf(cell);
      for (;;) {
        r += dr;
        c += dc;
        const next = rows[r] && rows[r].children[c];
        if (!next || c < 1) return;
        const target = next.querySelector("a.cell-link");
        if (target) {
          event.preventDefault();
          target.focus();
          return;
        }
      }
    });
    return;
  }

  // -- a service's page: actions, env edit, live logs ----------------------------------

  const base = `${root}/api/namespaces/${encodeURIComponent(namespace)}/services/${encodeURIComponent(service)}`;

  async function call(method, path, payload) {
    const answer = await fetch(base + path, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Branchyard-CSRF": csrf },
      body: payload === undefined ? undefined : JSON.stringify(payload),
    });
    let data = null;
    try {
      data = await answer.json();
    } catch (error) {
      data = null;
    }
    if (!answer.ok) {
      const error = new Error(data && data.message ? data.message : `HTTP ${answer.status}`);
      error.code = data && data.error;
      throw error;
    }
    return data;
  }

  const actions = {
    rollback: () => call("POST", "/rollback", { ordinal: null }),
    promote: (ordinal) => call("POST", "/promote", { ordinal }),
    unpin: () => call("POST", "/unpin"),
    restart: () => call("POST", "/restart"),
  };

  function describe(kind, done) {
    if (kind === "unpin") {
      if (done.live) return `Unpinned; v${done.live} goes live.`;
      if (done.building) return `Unpinned; building the head of ${done.branch} (${done.head.slice(0, 7)}).`;
      return "Unpinned.";
    }
    if (kind === "restart") return "Restarting.";
    return `${service} in ${namespace} is on v${done.live}, pinned.`;
  }

  main.addEventListener("click", async (event) => {
    const button = event.target.closest && event.target.closest("button[data-action]");
    if (!button) return;
    const kind = button.dataset.action;
    const ordinal = button.dataset.ordinal ? parseInt(button.dataset.ordinal, 10) : null;
    button.disabled = true;
    clear();
    say(`Working: ${button.textContent.trim()}…`);
    try {
      const done = await actions[kind](ordinal);
      say(describe(kind, done));
    } catch (error) {
      say("");
      say(error.message, true);
    } finally {
      button.disabled = false;
      schedule(0);
    }
  });

  // env edit: KEY=VALUE lines. A value with a line break (or that starts with a quote) is
  // written as a JSON string, KEY="one\ntwo", so that every value survives a round trip.
  // Saving sends the settings version the text was made from; if the env changed since,
  // the daemon refuses (409) and the latest is shown instead, nothing overwritten.
  const form = document.getElementById("env-form");
  const text = document.getElementById("env-text");
  let startedFrom = "";

  function renderEnv(env) {
    return Object.keys(env)
      .sort()
      .map((key) => {
        const value = env[key];
        const quoted = /[\r\n]/.test(value) || value.startsWith('"');
        return `${key}=${quoted ? JSON.stringify(value) : value}\n`;
      })
      .join("");
  }

  function showEnv(env, version) {
    text.value = text.defaultValue = renderEnv(env);
    startedFrom = version;
  }

  function showCurrentEnv() {
    const status = document.getElementById("status");
    showEnv(JSON.parse(status.dataset.env || "{}"), status.dataset.version || "");
  }

  function parseValue(value, number) {
    if (!value.startsWith('"')) return value;
    try {
      return JSON.parse(value);
    } catch (error) {
      throw new Error(`line ${number}: a value that starts with " is a JSON string, like "one\\ntwo"`);
    }
  }

  function parseEnv(value) {
    const env = {};
    value.split("\n").forEach((line, index) => {
      const trimmed = line.trim();
      if (!trimmed || trimmed.startsWith("#")) return;
      const at = line.indexOf("=");
      if (at < 1) throw new Error(`line ${index + 1} is not KEY=VALUE: ${trimmed}`);
      env[line.slice(0, at).trim()] = parseValue(line.slice(at + 1), index + 1);
    });
    return env;
  }

  showCurrentEnv();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clear();
    let env;
    try {
      env = parseEnv(text.value);
    } catch (error) {
      say(error.message, true);
      text.focus();
      return;
    }
    const message = document.getElementById("env-message").value.trim();
    const save = document.getElementById("env-save");
    save.disabled = true;
    try {
      const done = await call("PUT", "/env", { env, version: startedFrom, author: "dashboard", message });
      showEnv(done.env, done.version);
      document.getElementById("env-message").value = "";
      say(done.changed ? `Saved as settings ${done.version}; rolling out a new revision.` : "No change to the env; nothing was saved.");
    } catch (error) {
      if (error.code === "stale_version") {
        const latest = await call("GET", "/env");
        showEnv(latest.env, latest.version);
        say(`${error.message}. Nothing was saved; the editor now shows the latest.`, true);
      } else {
        say(error.message, true);
      }
    } finally {
      save.disabled = false;
      schedule(0);
    }
  });

  // Someone else changed the env: follow, unless a person is editing it here.
  afterRefresh.push(() => {
    if (text.value === text.defaultValue && document.activeElement !== text) showCurrentEnv();
  });

  // live logs: the live revision's output, restarted when another revision goes live
  const logs = document.getElementById("logs");
  const pause = document.getElementById("logs-pause");
  const logsState = document.getElementById("logs-state");
  const MAX_LOG_CHARS = 200000;
  let paused = false;
  let held = "";
  let stream = null;

  // Colours and other terminal escapes are left out (as the server does for the build
  // log); one cut in two by a chunk's end waits for the rest in `partial`.
  const ESCAPES = /\x1b(?:\[[0-?]*[ -\/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -\/]*[0-~])/g;
  let partial = "";

  function withoutEscapes(chunk) {
    let text = (partial + chunk).replace(ESCAPES, "");
    partial = "";
    const cut = text.lastIndexOf("\x1b");
    if (cut >= 0 && text.length - cut < 256) {
      partial = text.slice(cut);
      text = text.slice(0, cut);
    }
    return text;
  }

  function append(raw) {
    const chunk = withoutEscapes(raw);
    if (paused) {
      held = (held + chunk).slice(-MAX_LOG_CHARS);
      return;
    }
    const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 8;
    let value = logs.textContent + chunk;
    if (value.length > MAX_LOG_CHARS) value = value.slice(value.length - MAX_LOG_CHARS);
    logs.textContent = value;
    if (atBottom) logs.scrollTop = logs.scrollHeight;
  }

  async function followLogs() {
    if (stream) stream.abort();
    const mine = new AbortController();
    stream = mine;
    logs.textContent = "";
    held = "";
    partial = "";
    logsState.textContent = paused ? "paused" : "following its output";
    while (!mine.signal.aborted) {
      try {
        await readStream(`${base}/logs?follow=true&tail=2000`, append, mine.signal);
      } catch (error) {
        if (mine.signal.aborted) return;
        logsState.textContent = "no output to follow yet; trying again";
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    logsState.textContent = paused ? "paused" : "following its output";
    if (!paused && held) {
      const chunk = held;
      held = "";
      append(chunk);
    }
  });

  eventHooks.push((event) => {
    if (event.kind === "live") followLogs();
  });
  window.addEventListener("pagehide", () => stream && stream.abort());
  followLogs();
})();
