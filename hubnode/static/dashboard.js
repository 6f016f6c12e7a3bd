// dashboard.js: /dashboard, refreshed from the HTTP API every second.
//
// GET /api/stats, /api/nodes and /api/rooms are cluster-wide; GET /api/metrics
// is the serving node's own cumulative counters and latency histogram, so
// rates and recent latency are differences between successive samples.
// When the hub has an API key, the page asks for it and keeps it in
// sessionStorage (this tab only).
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const EVERY = 1000; // ms between refreshes
  const WINDOW = 300; // samples kept for the charts: 5 minutes at one a second
  const KEY = "hubnode.apiKey";
  const MAX_ROOMS = 15;

  const history = []; // {t, started, total, clients, delivered, published, mean, p99} per refresh
  let previous = null; // the last /api/metrics answer

  // -- fetching ------------------------------------------------------------------
  async function api(path) {
    const key = sessionStorage.getItem(KEY);
    const resp = await fetch(path, { headers: key ? { Authorization: "Bearer " + key } : {} });
    if (resp.status === 401) throw Object.assign(new Error("unauthorized"), { unauthorized: true });
    if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
    return resp.json();
  }

  async function refresh() {
    try {
      const [stats, nodes, rooms, metrics] = await Promise.all(
        ["/api/stats", "/api/nodes", "/api/rooms", "/api/metrics"].map(api));
      showKeyForm(false);
      record(stats, metrics);
      render(stats, nodes, rooms.rooms, metrics);
      setStatus("ok", "node " + nodes.self);
    } catch (err) {
      if (err.unauthorized) showKeyForm(true);
      else setStatus("bad", "unreachable");
    } finally {
      setTimeout(refresh, EVERY);
    }
  }

  // -- turning cumulative counters into rates ---------------------------------------
  function record(stats, m) {
    const sample = { t: m.time, started: m.started_at, total: m.delivered,
                     clients: stats.clients, delivered: null, published: null, mean: null, p99: null };
    if (previous && m.time > previous.time && m.started_at === previous.started_at) { // same process
      const dt = m.time - previous.time;
      sample.delivered = (m.delivered - previous.delivered) / dt;
      sample.published = (m.published - previous.published) / dt;
      const now = m.latency, then = previous.latency;
      if (now && then && now.count > then.count) {
        sample.mean = (now.sum - then.sum) / (now.count - then.count) * 1000;
        const delta = now.buckets.map(([le, n], i) => [le === "+Inf" ? Infinity : le, n - then.buckets[i][1]]);
        sample.p99 = quantile(delta, 0.99) * 1000;
      }
    }
    previous = m;
    history.push(sample);
    if (history.length > WINDOW) history.shift();
  }

  // Messages this node delivered in the last minute: exact while the node is
  // younger than that (its counters start at 0), else once a minute of samples is in.
  function deliveredLastMinute(last) {
    if (last.t - last.started <= 60) return fmt(last.total);
    const since = history.find((h) => h.t >= last.t - 60 && h.started === last.started);
    return !since || since.t > last.t - 55 ? "…" : fmt(last.total - since.total);
  }

  // Prometheus' histogram_quantile: interpolate inside the bucket holding the rank.
  function quantile(buckets, q) {
    const total = buckets[buckets.length - 1][1];
    const rank = q * total;
    let lower = 0, below = 0;
    for (const [le, n] of buckets) {
      if (n >= rank) {
        if (le === Infinity) return lower;
        return lower + (le - lower) * (n > below ? (rank - below) / (n - below) : 1);
      }
      lower = le;
      below = n;
    }
    return lower;
  }

  // -- rendering ----------------------------------------------------------------------
  function render(stats, nodes, rooms, metrics) {
    const last = history[history.length - 1];
    $("t-nodes").textContent = stats.nodes;
    $("t-clients").textContent = stats.clients;
    $("t-rooms").textContent = stats.rooms;
    $("t-rate").textContent = deliveredLastMinute(last);
    $("self-node").textContent = "node " + metrics.node;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    renderNodes(nodes);
    renderRooms(rooms);
    chart("clients", [{ key: "clients", label: "clients", color: "#2563eb" }], "");
    chart("rate", [{ key: "delivered", label: "delivered", color: "#15803d" },
                   { key: "published", label: "published", color: "#9333ea" }], "/s");
    chart("latency", [{ key: "mean", label: "mean", color: "#2563eb" },
                      { key: "p99", label: "p99", color: "#dc2626" }], " ms");
  }

  function renderNodes({ self, nodes }) {
    $("nodes").tBodies[0].replaceChildren(...nodes.map((n) => {
      const tr = row(n.id === self ? n.id + " (this)" : n.id, n.address || "–", n.clients,
                     n.heartbeat_age == null ? "local" : n.heartbeat_age.toFixed(1) + " s ago",
                     n.started_at ? duration(Date.now() / 1000 - n.started_at) : "–", n.version || "–");
      tr.dataset.node = n.id;
      tr.cells[2].className = tr.cells[3].className = tr.cells[4].className = "num";
      tr.cells[2].classList.add("clients");
      // The registry entry expires 3 heartbeats after the last one: age + expires_in = 3 beats.
      const beat = n.heartbeat_age == null ? null : (n.heartbeat_age + n.expires_in) / 3;
      tr.cells[3].classList.add("age");
      if (beat && n.heartbeat_age > 1.5 * beat) tr.cells[3].classList.add("late");
      return tr;
    }));
  }

  function renderRooms(rooms) {
    const sorted = Object.entries(rooms).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    const max = sorted.length ? sorted[0][1] : 1;
    $("rooms").tBodies[0].replaceChildren(...sorted.slice(0, MAX_ROOMS).map(([room, count]) => {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = (100 * count / max).toFixed(1) + "%";
      const tr = row(room, count, "");
      tr.dataset.room = room;
      tr.cells[1].className = "num count";
      tr.cells[2].className = "barcell";
      tr.cells[2].append(bar);
      return tr;
    }));
    const more = sorted.length - MAX_ROOMS;
    $("rooms-more").textContent = sorted.length ? (more > 0 ? `and ${more} more` : "") : "no rooms yet";
  }

  // A line chart of the last WINDOW samples on a canvas; null values leave gaps.
  function chart(name, series, unit) {
    const canvas = $("c-" + name);
    const width = canvas.clientWidth, height = canvas.clientHeight, dpr = window.devicePixelRatio || 1;
    canvas.width = width * dpr;
    canvas.height = height * dpr;
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    const values = series.flatMap((s) => history.map((h) => h[s.key])).filter((v) => v != null);
    const top = niceMax(Math.max(1, ...values)); // an idle chart still gets a readable scale
    const pad = { left: 40, right: 6, top: 6, bottom: 16 };
    const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
    const x = (i) => pad.left + plotW * (i + WINDOW - history.length) / (WINDOW - 1);
    const y = (v) => pad.top + plotH * (1 - v / top);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7280";
    ctx.strokeStyle = "#e3e6ea";
    ctx.lineWidth = 1;
    for (const f of [0, 0.5, 1]) { // grid lines with their values
      const gy = Math.round(y(top * f)) + 0.5;
      ctx.beginPath(); ctx.moveTo(pad.left, gy); ctx.lineTo(width - pad.right, gy); ctx.stroke();
      ctx.textAlign = "right";
      ctx.fillText(fmt(top * f), pad.left - 4, gy + 4);
    }
    ctx.textAlign = "left";
    ctx.fillText("−" + Math.round(WINDOW * EVERY / 60000) + " min", pad.left, height - 3);
    ctx.textAlign = "right";
    ctx.fillText("now", width - pad.right, height - 3);
    ctx.lineWidth = 1.6;
    for (const s of series) {
      ctx.strokeStyle = s.color;
      ctx.beginPath();
      let drawing = false;
      history.forEach((h, i) => {
        const v = h[s.key];
        if (v == null) { drawing = false; return; }
        if (drawing) ctx.lineTo(x(i), y(v)); else ctx.moveTo(x(i), y(v));
        drawing = true;
      });
      ctx.stroke();
    }
    // The legend shows each series' latest value (latency has none while nothing is delivered).
    $("l-" + name).replaceChildren(...series.map((s) => {
      const latest = history.findLast((h) => h[s.key] != null);
      const span = document.createElement("span");
      span.style.setProperty("--c", s.color);
      span.append(s.label + " ");
      const b = document.createElement("b");
      b.textContent = latest ? fmt(latest[s.key]) + unit : "–";
      span.append(b);
      return span;
    }));
  }

  // -- small helpers --------------------------------------------------------------------
  function niceMax(v) { // 1, 2 or 5 times a power of ten, at least v
    const p = 10 ** Math.floor(Math.log10(v));
    return [1, 2, 5, 10].map((m) => m * p).find((n) => n >= v);
  }

  function fmt(v) {
    if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k";
    if (v >= 10 || Number.isInteger(v)) return String(Math.round(v));
    return String(+v.toFixed(v >= 1 ? 1 : 2)); // 0.5, not 0.50
  }

  function duration(s) {
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }

  function row(...cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.append(td);
    }
    return tr;
  }

  function setStatus(kind, label) {
    $("status").className = "badge " + kind;
    $("status").textContent = label;
  }

  function showKeyForm(shown) {
    $("key-form").classList.toggle("shown", shown);
    $("content").hidden = shown;
    $("forget").hidden = !sessionStorage.getItem(KEY);
    if (shown) {
      setStatus("warn", "API key needed");
      $("key-error").textContent = sessionStorage.getItem(KEY) ? "That key was refused." : "";
    }
  }

  $("key-form").querySelector("form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
  });
  $("forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });

  refresh();
})();
