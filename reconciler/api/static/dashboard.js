// The Reconciler dashboard: tasks from GET /tasks, live updates from GET /events/stream,
// settlement figures and lag from GET /stats. No framework and no build step. All data is
// put into the page with textContent, never as HTML: task fields come from providers.
"use strict";

(() => {
  const query = new URLSearchParams(location.search);
  const token = query.get("access_token");
  const EVENT_TYPES = ["registered", "submitted", "processing", "completed", "failed", "expired"]
    .map((word) => "task." + word);
  const SETTLED = ["callback", "poll", "failed", "expired", "open"];
  const PAGE = 100;
  const LAG_SAMPLES = 60;

  const state = {
    tasks: new Map(), // "provider/task_id" -> task JSON (the newest version seen)
    rows: new Map(), // same key -> <tr>
    details: new Map(), // same key -> its details <tr>, while shown
    open: new Set(), // keys whose details row is shown
    filter: { status: query.get("status") || "", provider: query.get("provider") || "", text: "" },
    cursor: null,
    lastSeq: 0,
    lag: [],
    stream: null,
    generation: 0, // bumps on each filter change so that late answers are ignored
  };

  const $ = (id) => document.getElementById(id);
  const keyOf = (task) => task.provider + "/" + task.task_id;

  // --- talking to the API ------------------------------------------------------------

  function withToken(path) {
    if (!token) return path;
    return path + (path.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(token);
  }

  async function getJSON(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch(path, { headers, cache: "no-store" });
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).error.message; } catch (_) { /* keep status */ }
      throw new Error(message);
    }
    return response.json();
  }

  function setConnection(kind, text) {
    const pill = $("connection");
    pill.className = "pill pill-" + kind;
    pill.textContent = text;
  }

  // --- tasks -------------------------------------------------------------------------

  function matches(task) {
    const f = state.filter;
    if (f.status && task.status !== f.status) return false;
    if (f.provider && task.provider !== f.provider) return false;
    if (f.text && !task.task_id.toLowerCase().includes(f.text.toLowerCase())) return false;
    return true;
  }

  // Keep the newest version: a page fetched before an event may arrive after it.
  function upsert(task) {
    const key = keyOf(task);
    const known = state.tasks.get(key);
    if (known && known.version > task.version) return false;
    state.tasks.set(key, task);
    return true;
  }

  function safeUrl(url) {
    try {
      const parsed = new URL(url);
      return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : null;
    } catch (_) {
      return null;
    }
  }

  function age(iso) {
    const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (seconds < 60) return Math.floor(seconds) + "s";
    if (seconds < 3600) return Math.floor(seconds / 60) + "m";
    if (seconds < 86400) return Math.floor(seconds / 3600) + "h " + Math.floor((seconds % 3600) / 60) + "m";
    return Math.floor(seconds / 86400) + "d";
  }

  function resultCell(cell, task) {
    cell.replaceChildren();
    const video = task.videos.find((v) => safeUrl(v.url));
    if (!video) {
      cell.append(span("—", "muted"));
      return;
    }
    const link = document.createElement("a");
    link.href = safeUrl(video.url);
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.title = video.url;
    const cover = video.cover_url && safeUrl(video.cover_url);
    if (cover) {
      const img = document.createElement("img");
      img.src = cover;
      img.alt = "";
      img.loading = "lazy";
      img.referrerPolicy = "no-referrer";
      link.append(img);
    }
    const seconds = typeof video.duration === "number" ? " " + video.duration.toFixed(1) + "s" : "";
    link.append("▶ video" + seconds);
    cell.append(link);
    if (task.videos.length > 1) cell.append(span(" +" + (task.videos.length - 1), "muted"));
  }

  function span(text, cls) {
    const el = document.createElement("span");
    el.textContent = text;
    if (cls) el.className = cls;
    return el;
  }

  function buildRow(task) {
    const tr = $("row").content.firstElementChild.cloneNode(true);
    const key = keyOf(task);
    tr.dataset.key = key;
    tr.dataset.created = task.created_at;
    const status = tr.querySelector(".status");
    status.textContent = task.status;
    status.classList.add("s-" + task.status);
    if (task.provider_status) status.title = "provider says: " + task.provider_status;
    tr.querySelector(".provider").textContent = task.provider;
    const id = tr.querySelector(".task-id");
    id.textContent = task.task_id;
    id.title = task.task_id + " — show details";
    id.addEventListener("click", () => toggleDetails(key));
    tr.querySelector(".action").textContent = task.action;
    tr.querySelector(".age").textContent = age(task.created_at);
    tr.querySelector(".age").title = task.created_at;
    const source = tr.querySelector(".source");
    source.textContent = task.source;
    source.title = task.callbacks + " callback(s), " + task.polls + " poll(s)";
    const progress = task.status === "completed" ? 100 : task.progress;
    if (progress === null || progress === undefined) {
      tr.querySelector(".c-progress").replaceChildren(span("—", "muted"));
    } else {
      tr.querySelector(".meter span").style.width = Math.min(100, Math.max(0, progress)) + "%";
      tr.querySelector(".pct").textContent = progress + "%";
    }
    resultCell(tr.querySelector(".result"), task);
    const error = tr.querySelector(".error");
    error.textContent = task.error || "";
    error.title = task.error || "";
    return tr;
  }

  function detailsRow(task) {
    const tr = document.createElement("tr");
    tr.className = "details";
    tr.dataset.detailsOf = keyOf(task);
    const td = document.createElement("td");
    td.colSpan = 9;
    const grid = document.createElement("div");
    grid.className = "details-grid";
    const dl = document.createElement("dl");
    const facts = [
      ["task id", task.task_id],
      ["provider status", task.provider_status || "—"],
      ["callbacks / polls", task.callbacks + " / " + task.polls],
      ["created", task.created_at],
      ["updated", task.updated_at],
      ["completed", task.completed_at || "—"],
      ["next poll", task.next_poll_at || "—"],
      ["deadline", task.deadline_at],
      ["external id", task.external_task_id || "—"],
      ["version", String(task.version)],
    ];
    for (const [name, value] of facts) {
      dl.append(Object.assign(document.createElement("dt"), { textContent: name }));
      dl.append(Object.assign(document.createElement("dd"), { textContent: value }));
    }
    if (task.error) {
      dl.append(Object.assign(document.createElement("dt"), { textContent: "error" }));
      dl.append(Object.assign(document.createElement("dd"), { textContent: task.error }));
    }
    const side = document.createElement("div");
    const video = task.videos.find((v) => safeUrl(v.url));
    if (video) {
      const player = document.createElement("video");
      player.controls = true;
      player.preload = "none";
      player.src = safeUrl(video.url);
      const poster = video.cover_url && safeUrl(video.cover_url);
      if (poster) player.poster = poster;
      side.append(player);
    }
    const meta = document.createElement("pre");
    meta.textContent = "metadata " + JSON.stringify(task.metadata, null, 2);
    side.append(meta);
    grid.append(dl, side);
    td.append(grid);
    tr.append(td);
    return tr;
  }

  function toggleDetails(key) {
    if (state.open.has(key)) state.open.delete(key);
    else state.open.add(key);
    render();
  }

  // Redraw the table from state.tasks; rows whose task did not change are kept as they are.
  function render() {
    const body = $("rows");
    const shown = [...state.tasks.values()].filter(matches);
    shown.sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : keyOf(a) < keyOf(b) ? -1 : 1));
    const wanted = [];
    for (const task of shown) {
      const key = keyOf(task);
      let tr = state.rows.get(key);
      if (!tr || tr.dataset.version !== String(task.version)) {
        const fresh = buildRow(task);
        fresh.dataset.version = String(task.version);
        if (tr) fresh.classList.add("flash");
        tr = fresh;
        state.rows.set(key, tr);
      }
      wanted.push(tr);
      if (state.open.has(key)) {
        let details = state.details.get(key);
        if (!details || details.dataset.version !== String(task.version)) {
          details = detailsRow(task);
          details.dataset.version = String(task.version);
          state.details.set(key, details);
        }
        wanted.push(details);
      }
    }
    // Move only the rows that are out of place: a row that is taken out of the document
    // loses its hover state and a playing preview stops.
    let cursor = body.firstChild;
    for (const node of wanted) {
      if (node === cursor) cursor = cursor.nextSibling;
      else body.insertBefore(node, cursor);
    }
    while (cursor) {
      const next = cursor.nextSibling;
      cursor.remove();
      cursor = next;
    }
    for (const key of [...state.rows.keys()]) {
      if (!state.tasks.has(key) || !matches(state.tasks.get(key))) state.rows.delete(key);
    }
    for (const key of [...state.details.keys()]) {
      if (!state.open.has(key) || !state.rows.has(key)) state.details.delete(key);
    }
    $("empty").hidden = shown.length > 0;
    $("count").textContent = shown.length + " task" + (shown.length === 1 ? "" : "s") + " shown";
  }

  // A burst of events redraws once, not once per event.
  let renderTimer = null;
  function renderSoon() {
    if (renderTimer === null) renderTimer = setTimeout(() => { renderTimer = null; render(); }, 50);
  }

  function refreshAges() {
    for (const tr of $("rows").querySelectorAll("tr[data-created]")) {
      tr.querySelector(".age").textContent = age(tr.dataset.created);
    }
  }

  async function loadTasks(append) {
    const generation = state.generation;
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (state.filter.status) params.set("status", state.filter.status);
    if (state.filter.provider) params.set("provider", state.filter.provider);
    if (append && state.cursor) params.set("cursor", state.cursor);
    const page = await getJSON("/tasks?" + params);
    if (generation !== state.generation) return;
    for (const task of page.tasks) upsert(task);
    state.cursor = page.next_cursor;
    $("more").hidden = !page.next_cursor;
    render();
  }

  // --- the live stream ---------------------------------------------------------------

  function connect() {
    if (state.stream) state.stream.close();
    const source = new EventSource(withToken("/events/stream?after=" + state.lastSeq));
    state.stream = source;
    source.onopen = () => setConnection("live", "live");
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // The server refused the stream (e.g. 401, or 410 below): the browser gave up.
        setConnection("down", "disconnected");
        recover(source);
      } else {
        setConnection("wait", "reconnecting…"); // EventSource resumes with Last-Event-ID
      }
    };
    for (const type of EVENT_TYPES) {
      source.addEventListener(type, (message) => {
        const event = JSON.parse(message.data);
        state.lastSeq = Math.max(state.lastSeq, event.seq);
        $("last-seq").textContent = "#" + state.lastSeq;
        if (upsert(event.task)) renderSoon();
        statsSoon();
      });
    }
  }

  // A refused stream: when the events after the last one seen were pruned (410
  // cursor_expired), the page can't be brought up to date event by event, so it starts over
  // from what is true now, as at start-up. Otherwise it tries again later from that event.
  async function recover(source) {
    let expired = false;
    try {
      const headers = token ? { Authorization: "Bearer " + token } : {};
      const url = "/events?limit=1&after=" + state.lastSeq;
      expired = (await fetch(url, { headers, cache: "no-store" })).status === 410;
    } catch (_) { /* unreachable: try again later */ }
    if (state.stream !== source) return;
    if (expired) {
      clearTasks();
      render();
      await begin();
    } else {
      setTimeout(() => { if (state.stream === source) connect(); }, 5000);
    }
  }

  // --- settlement and lag ------------------------------------------------------------

  let statsTimer = null;
  function statsSoon() {
    if (statsTimer === null) statsTimer = setTimeout(() => { statsTimer = null; loadStats(); }, 1000);
  }

  function formatLag(seconds) {
    if (seconds < 1) return seconds.toFixed(2) + " s";
    if (seconds < 120) return seconds.toFixed(1) + " s";
    return (seconds / 60).toFixed(1) + " min";
  }

  function drawSettled(stats) {
    const box = $("settled");
    box.replaceChildren();
    for (const [name, counts] of Object.entries(stats.providers)) {
      const total = SETTLED.reduce((sum, word) => sum + counts[word], 0);
      const label = document.createElement("div");
      label.className = "name";
      label.textContent = name;
      const trouble = stats.paused[name] ? "credentials rejected"
        : stats.breakers_open.includes(name) ? "breaker open" : null;
      if (trouble) label.append(Object.assign(document.createElement("small"), { textContent: trouble }));
      const stack = document.createElement("div");
      stack.className = "stack";
      if (total === 0) {
        stack.append(Object.assign(document.createElement("span"), { className: "empty-stack" }));
      }
      for (const word of SETTLED) {
        if (!counts[word]) continue;
        const part = document.createElement("span");
        part.className = "by-" + word;
        part.style.width = (100 * counts[word]) / total + "%";
        part.title = counts[word] + " " + word;
        stack.append(part);
      }
      const nums = document.createElement("div");
      nums.className = "nums";
      const settledByProvider = counts.callback + counts.poll;
      if (total === 0) {
        nums.textContent = "no tasks";
      } else {
        const share = settledByProvider ? Math.round((100 * counts.callback) / settledByProvider) + "% by callback" : "none settled";
        nums.append(Object.assign(document.createElement("b"), { textContent: share }));
        nums.append(" · " + counts.poll + " poll · " + (counts.failed + counts.expired) + " given up · " + counts.open + " open");
      }
      box.append(label, stack, nums);
    }
  }

  function drawLag(stats) {
    state.lag.push(stats.lag_seconds);
    if (state.lag.length > LAG_SAMPLES) state.lag.shift();
    const text = formatLag(stats.lag_seconds);
    $("lag-now").textContent = text;
    const big = $("lag-big");
    big.textContent = text;
    big.parentElement.className = "lag-figure" + (stats.lag_seconds >= 60 ? " bad" : stats.lag_seconds >= 1 ? " warn" : "");
    const top = Math.max(1, ...state.lag);
    const step = 200 / (LAG_SAMPLES - 1);
    const start = LAG_SAMPLES - state.lag.length;
    const y = (v) => (46 - (44 * v) / top).toFixed(1);
    const points = state.lag.map((v, i) => ((start + i) * step).toFixed(1) + "," + y(v));
    if (points.length === 1) points.unshift("0," + y(state.lag[0])); // one sample: a flat line
    const svg = $("lag-spark");
    const ns = "http://www.w3.org/2000/svg";
    const area = document.createElementNS(ns, "polygon");
    area.setAttribute("points", points[0].split(",")[0] + ",48 " + points.join(" ") + " 200,48");
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.replaceChildren(area, line);
    const samples = state.lag.length === 1 ? "1 sample" : "last " + state.lag.length + " samples, 5 s apart";
    $("lag-scale").textContent = samples + " · peak " + formatLag(Math.max(...state.lag));
    const alerts = $("alerts");
    alerts.replaceChildren();
    for (const [name, why] of Object.entries(stats.paused)) {
      alerts.append(Object.assign(document.createElement("div"), { className: "alert", textContent: name + ": credentials rejected (" + why + ")" }));
    }
  }

  async function loadStats() {
    try {
      const stats = await getJSON("/stats");
      drawSettled(stats);
      drawLag(stats);
      fillProviders(Object.keys(stats.providers));
      if (stats.last_seq > state.lastSeq && !state.stream) state.lastSeq = stats.last_seq;
      $("last-seq").textContent = "#" + Math.max(state.lastSeq, stats.last_seq);
      return stats;
    } catch (error) {
      setConnection("down", error.message);
      return null;
    }
  }

  function fillProviders(names) {
    const select = $("f-provider");
    if (select.options.length > 1) return;
    for (const name of names) select.append(new Option(name, name));
    select.value = state.filter.provider;
  }

  // --- filters -----------------------------------------------------------------------

  function syncUrl() {
    const params = new URLSearchParams(location.search);
    for (const name of ["status", "provider"]) {
      if (state.filter[name]) params.set(name, state.filter[name]);
      else params.delete(name);
    }
    history.replaceState(null, "", "?" + params);
  }

  function onFilter() {
    state.filter.status = $("f-status").value;
    state.filter.provider = $("f-provider").value;
    syncUrl();
    // The server filters pages; start over so that the shown list is complete.
    clearTasks();
    render();
    loadTasks(false).catch((error) => setConnection("down", error.message));
  }

  function clearTasks() {
    state.generation += 1;
    state.tasks.clear();
    state.rows.clear();
    state.details.clear();
    state.cursor = null;
  }

  // The log head first, then the tasks, then the stream after that head: whatever changes
  // in between arrives again through the stream, and `upsert` keeps the newest version.
  async function begin() {
    const stats = await loadStats();
    if (stats) state.lastSeq = stats.last_seq;
    try {
      await loadTasks(false);
    } catch (error) {
      setConnection("down", error.message);
    }
    connect();
  }

  async function start() {
    $("f-status").value = state.filter.status;
    $("f-status").addEventListener("change", onFilter);
    $("f-provider").addEventListener("change", onFilter);
    $("f-text").addEventListener("input", () => { state.filter.text = $("f-text").value.trim(); render(); });
    $("more").addEventListener("click", () => loadTasks(true).catch((error) => setConnection("down", error.message)));
    await begin();
    setInterval(loadStats, 5000);
    setInterval(refreshAges, 5000);
  }

  start();
})();
