// dashboard.js: /dashboard, refreshed from the HTTP API every second.
//
// Every route read here is cluster-wide, so the page is right whichever node a
// load balancer sends each request to: /api/stats, /api/nodes and /api/rooms
// come from Redis, and /api/cluster/metrics holds every live node's cumulative
// counters and latency histogram (the answering node's read now, the others'
// as they stored them on their last heartbeat). Rates and recent latency are
// differences between two snapshots of the same node process; a snapshot no
// newer than the last one kept for its node (a repeat, or an older stored one
// served by another node) is ignored.
// When the hub has an API key, the page asks for it and keeps it in
// sessionStorage (this tab only).
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const EVERY = 1000; // ms between refreshes
  const WINDOW = 300; // samples kept for the charts: 5 minutes at one a second
  const KEY = "hubnode.apiKey";
  const MAX_ROOMS = 15;
  const KEEP = 120; // seconds of each node's totals kept (the one-minute tile needs 60)
  const PALETTE = ["#2563eb", "#15803d", "#dc2626", "#9333ea", "#d97706", "#0891b2", "#db2777", "#4b5563"];

  const history = []; // per refresh: {clients: {id: n}, delivered: {id: per s}, mean, p99}
  const nodes = new Map(); // node id -> {snap, rate, latency, totals}: see accept()
  const colours = new Map(); // node id -> colour, kept for the page's life

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
      const [stats, live, rooms, cluster] = await Promise.all(
        ["/api/stats", "/api/nodes", "/api/rooms", "/api/cluster/metrics"].map(api));
      showKeyForm(false);
      cluster.nodes.forEach(accept);
      record(live.nodes);
      render(stats, live.nodes, rooms.rooms);
      setStatus("ok", "live · " + stats.nodes + (stats.nodes === 1 ? " node" : " nodes"));
    } catch (err) {
      if (err.unauthorized) showKeyForm(true);
      else setStatus("bad", "unreachable");
    } finally {
      setTimeout(refresh, EVERY);
    }
  }

  // -- turning each node's cumulative counters into rates ----------------------------
  // Keep a snapshot only if it is newer than the last one of its node; rates need two of the same process.
  function accept(snap) {
    if (!nodes.has(snap.node)) nodes.set(snap.node, { snap: null, rate: null, latency: null, totals: [] });
    const node = nodes.get(snap.node), prev = node.snap;
    if (prev && snap.time <= prev.time) return;
    const same = prev !== null && snap.started_at === prev.started_at; // a restarted node starts over
    node.rate = same ? (snap.delivered - prev.delivered) / (snap.time - prev.time) : null;
    node.latency = same ? latencyDelta(snap.latency, prev.latency) : null;
    if (!same) node.totals = [];
    node.totals.push({ t: snap.time, total: snap.delivered });
    while (node.totals[0].t < snap.time - KEEP) node.totals.shift();
    node.snap = snap;
  }

  // The observations between two histogram snapshots of one node.
  function latencyDelta(now, then) {
    if (!now || !then || now.buckets.length !== then.buckets.length) return null;
    return { count: now.count - then.count, sum: now.sum - then.sum,
             buckets: now.buckets.map(([le, n], i) => [le === "+Inf" ? Infinity : le, n - then.buckets[i][1]]) };
  }

  // Every live node's latest interval, summed: the buckets are the same on every node.
  function clusterLatency(ids) {
    let total = null;
    for (const id of ids) {
      const d = nodes.has(id) ? nodes.get(id).latency : null;
      if (!d) continue;
      if (!total || total.buckets.length !== d.buckets.length) total = { count: 0, sum: 0, buckets: d.buckets.map(([le]) => [le, 0]) };
      total.count += d.count;
      total.sum += d.sum;
      d.buckets.forEach(([, n], i) => { total.buckets[i][1] += n; });
    }
    return total;
  }

  function record(live) {
    const sample = { clients: {}, delivered: {}, mean: null, p99: null };
    for (const n of live) {
      sample.clients[n.id] = n.clients;
      const node = nodes.get(n.id);
      if (node && node.rate != null) sample.delivered[n.id] = node.rate;
    }
    const latency = clusterLatency(live.map((n) => n.id));
    if (latency && latency.count > 0) {
      sample.mean = latency.sum / latency.count * 1000;
      sample.p99 = quantile(latency.buckets, 0.99) * 1000;
    }
    history.push(sample);
    if (history.length > WINDOW) history.shift();
  }

  // Frames every live node delivered in the last minute. Per node: exact while it is
  // younger than that (its counters start at 0), else once a minute of its snapshots is in.
  // A live node that stores no snapshot (an older version, a failing write) is left out
  // and the total shown as a lower bound, rather than never showing one.
  function deliveredLastMinute(ids) {
    let sum = 0, partial = false;
    for (const id of ids) {
      const last = nodes.has(id) ? nodes.get(id).snap : null;
      if (!last) { partial = true; continue; }
      if (last.time - last.started_at <= 60) {
        sum += last.delivered;
        continue;
      }
      const since = nodes.get(id).totals.find((h) => h.t >= last.time - 60);
      if (!since || since.t > last.time - 55) return "…";
      sum += last.delivered - since.total;
    }
    return (partial ? "≥ " : "") + fmt(sum);
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
  function render(stats, live, rooms) {
    $("t-nodes").textContent = stats.nodes;
    $("t-clients").textContent = stats.clients;
    $("t-rooms").textContent = stats.rooms;
    $("t-rate").textContent = deliveredLastMinute(live.map((n) => n.id));
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    renderNodes(live);
    renderRooms(rooms);
    const seen = [...new Set(history.flatMap((h) => Object.keys(h.clients)))].sort();
    chart("clients", seen.map((id) => perNode(id, "clients")), "");
    chart("rate", seen.map((id) => perNode(id, "delivered")), ""); // the title says "/ s": legends fit one line
    chart("latency", [{ label: "mean", color: "#2563eb", value: (h) => h.mean, hold: true },
                      { label: "p99", color: "#dc2626", value: (h) => h.p99, hold: true }], " ms");
  }

  // One line per node; its legend shows the latest refresh only (a node gone shows "–").
  function perNode(id, key) {
    return { label: id, color: colour(id), value: (h) => h[key][id], hold: false };
  }

  // A node keeps its colour for the page's life; new nodes take the next one.
  function colour(id) {
    if (!colours.has(id)) colours.set(id, PALETTE[colours.size % PALETTE.length]);
    return colours.get(id);
  }

  function renderNodes(live) {
    $("nodes").tBodies[0].replaceChildren(...live.map((n) => {
      const node = nodes.get(n.id);
      const d = node ? node.latency : null;
      const tr = row(n.id, n.clients, node && node.rate != null ? fmt(node.rate) : "–",
                     d && d.count > 0 ? fmt(quantile(d.buckets, 0.99) * 1000) + " ms" : "–",
                     n.heartbeat_age == null ? "local" : n.heartbeat_age.toFixed(1) + " s ago",
                     n.started_at ? duration(Date.now() / 1000 - n.started_at) : "–", n.version || "–");
      tr.dataset.node = n.id;
      if (n.address) tr.title = "address " + n.address;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.setProperty("--c", colour(n.id));
      tr.cells[0].prepend(swatch);
      ["clients", "rate", "p99", "age", "up"].forEach((name, i) => { tr.cells[i + 1].className = "num " + name; });
      // The registry entry expires 3 heartbeats after the last one: age + expires_in = 3 beats.
      const beat = n.heartbeat_age == null ? null : (n.heartbeat_age + n.expires_in) / 3;
      if (beat && n.heartbeat_age > 1.5 * beat) tr.cells[4].classList.add("late");
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

  // A line chart of the last WINDOW samples on a canvas; missing values leave gaps.
  function chart(name, series, unit) {
    const canvas = $("c-" + name);
    const width = canvas.clientWidth, height = canvas.clientHeight, dpr = window.devicePixelRatio || 1;
    canvas.width = width * dpr;
    canvas.height = height * dpr;
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    const values = series.flatMap((s) => history.map(s.value)).filter((v) => v != null);
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
        const v = s.value(h);
        if (v == null) { drawing = false; return; }
        if (drawing) ctx.lineTo(x(i), y(v)); else ctx.moveTo(x(i), y(v));
        drawing = true;
      });
      ctx.stroke();
    }
    // The legend shows each series' latest value; a `hold` series its last known one
    // (latency has none while nothing is delivered).
    $("l-" + name).replaceChildren(...series.map((s) => {
      const latest = s.hold ? history.findLast((h) => s.value(h) != null) : history[history.length - 1];
      const v = latest ? s.value(latest) : null;
      const span = document.createElement("span");
      span.style.setProperty("--c", s.color);
      span.dataset.series = s.label;
      span.append(s.label + " ");
      const b = document.createElement("b");
      b.textContent = v != null ? fmt(v) + unit : "–";
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
