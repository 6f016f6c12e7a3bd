// One client process of the soak run (bench/soak.py): long-lived hubnode clients that count
// every message per stream and, with history on, reconnect and recover (docs/protocol.md).
//
// Same start (one JSON argument) and JSON-lines conversation as load.js, so the controller
// spawns it with bench/loadgen.py's ClientProc and drives it like bench/chaosclient.py:
//
//   -> {"event":"hello"}                  on start
//   <- "connect"                          open `count` clients (`concurrency` at a time), each with
//                                         its user id and `roomsPerClient` rooms, then
//   -> {"event":"ready", ...}             connected / failed / errors
//   <- "stats"   -> {"event":"stats","received","open","reconnects","resyncs"}
//   <- "report"  -> {"event":"report", ...} per-kind counts, latency per interval, recoveries
//   <- "closeall" every client sends a close frame at once;
//   -> {"event":"closedall","clean","forced","ms"} when every socket is closed (or forced after 60 s)
//   <- "close"                            close whatever is left and exit
//
// Counting: the publisher numbers each stream's messages (data.s = 1, 2, ... per room, per user
// and for `all`), so a client needs no list of what was sent: per stream it keeps the highest s
// and the holes below it. A new s counts once (distinct); an s seen before is a duplicate; a hole
// filled later is counted as out of order. The controller knows how many messages each stream
// got, so lost = expected - distinct, per kind.
//
// Recovery (cfg.recover): each stream's last offset and epoch (from `connected`, join acks and
// messages); a dropped connection is reopened on another node with ?since=<offset>:<epoch> and
// every room rejoined with {"room": R, "since": {...}}, as bench/chaosclient.py does. Without
// cfg.recover a dropped client still reconnects and rejoins, without `since`.
//
// Latency: data.t is the publisher's time.monotonic() (CLOCK_MONOTONIC, as process.hrtime),
// data.m the index of the interval it was published in; one 1%-bucket log histogram of
// microseconds per interval, as load.js keeps.
"use strict";

const readline = require("readline");
const WebSocket = require("ws");

const cfg = JSON.parse(process.argv[2]);
const LOG_BASE = Math.log(1.01);
const MAX_HOLES = 10000; // a larger gap is counted, not remembered
const KINDS = ["room", "user", "all"];

function now() {
  return Number(process.hrtime.bigint()) / 1e9;
}

function send(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function kindCounters() {
  const out = {};
  for (const k of KINDS) {
    out[k] = { distinct: 0, duplicates: 0, outOfOrder: 0, holes: 0, bigGaps: 0, noOffset: 0,
               recovered: 0, notRecovered: 0, epochChanges: 0 };
  }
  return out;
}

const state = {
  clients: [],
  received: 0,
  foreign: 0,
  resyncs: 0,
  reconnects: 0,
  hist: new Map(), // interval -> Map(bucket -> n)
  latMax: 0,
  errors: [],
  closeCodes: {},
  closing: false,
};

function noteError(text) {
  if (state.errors.length < 20) state.errors.push(String(text).slice(0, 300));
}

// The rooms of client g: the same as bench/chaosclient.py's rooms_of.
function roomsOf(g) {
  const step = Math.max(1, Math.floor(cfg.rooms / cfg.roomsPerClient));
  const rooms = new Set();
  for (let k = 0; k < cfg.roomsPerClient; k++) rooms.add("r" + ((g + k * step) % cfg.rooms));
  return Array.from(rooms).sort();
}

function recordLatency(m, t) {
  const ms = (now() - t) * 1000;
  if (ms > state.latMax) state.latMax = ms;
  const b = Math.ceil(Math.log(Math.max(1, ms * 1000)) / LOG_BASE);
  let h = state.hist.get(m);
  if (!h) state.hist.set(m, (h = new Map()));
  h.set(b, (h.get(b) || 0) + 1);
}

class Stream {
  constructor(kind) {
    this.kind = kind;
    this.last = 0; // highest s received
    this.holes = null; // Set of s below `last` not received yet
    this.distinct = 0;
    this.duplicates = 0;
    this.outOfOrder = 0;
    this.bigGaps = 0;
    this.epoch = null;
    this.offset = 0;
    this.epochChanges = 0;
    this.recovered = 0;
    this.notRecovered = 0;
    this.noOffset = 0;
  }

  seq(s) {
    if (s > this.last) {
      const gap = s - this.last - 1;
      if (gap > MAX_HOLES) this.bigGaps += gap;
      else if (gap > 0) {
        if (!this.holes) this.holes = new Set();
        for (let x = this.last + 1; x < s; x++) this.holes.add(x);
      }
      this.last = s;
      this.distinct++;
    } else if (this.holes && this.holes.delete(s)) {
      this.distinct++;
      this.outOfOrder++;
    } else {
      this.duplicates++;
    }
  }

  position(epoch, offset) {
    if (typeof epoch !== "string" || typeof offset !== "number") return;
    if (this.epoch !== null && epoch !== this.epoch) {
      this.epochChanges++;
      this.offset = offset;
    } else {
      this.offset = Math.max(this.offset, offset);
    }
    this.epoch = epoch;
  }

  since() {
    return this.epoch === null ? null : { offset: this.offset, epoch: this.epoch };
  }
}

class Client {
  constructor(i) {
    this.g = cfg.start + i;
    this.user = cfg.userPrefix + this.g;
    this.rooms = roomsOf(this.g);
    this.streams = new Map([["user", new Stream("user")], ["all", new Stream("all")]]);
    for (const r of this.rooms) this.streams.set("room:" + r, new Stream("room"));
    this.localAddress = cfg.localAddresses.length ? cfg.localAddresses[i % cfg.localAddresses.length]
                                                  : undefined;
    this.ws = null;
    this.joined = false;
    this.shift = 0;
    this.failures = 0;
    this.nextId = 1;
    this.pending = new Map(); // id -> handler(frame)
    this.onReady = null;
    this.everReady = false;
  }

  // -- one connection ---------------------------------------------------------------------

  open() {
    const urls = cfg.urls;
    const user = this.streams.get("user");
    let url = `${urls[(this.g + this.shift) % urls.length]}?user_id=${encodeURIComponent(this.user)}`;
    const since = cfg.recover ? user.since() : null;
    if (since) url += `&since=${since.offset}:${encodeURIComponent(since.epoch)}`;
    const ws = new WebSocket(url, { perMessageDeflate: false, localAddress: this.localAddress,
                                    handshakeTimeout: cfg.timeoutMs });
    this.ws = ws;
    this.sinceSent = since !== null;
    ws.on("message", (data) => this.onFrame(ws, data));
    ws.on("error", (err) => noteError(`${this.user}: ${err.message}`));
    ws.on("close", (code) => this.onClose(ws, code));
  }

  onFrame(ws, data) {
    const frame = JSON.parse(data);
    const type = frame.type;
    if (type === cfg.mtype) {
      this.delivered(frame);
    } else if (type === "connected") {
      const d = frame.data || {};
      const user = this.streams.get("user");
      if (this.sinceSent && "recovered" in d) {
        if (d.recovered === true) user.recovered++;
        else user.notRecovered++;
      }
      user.position(d.epoch, d.offset);
      this.joinFrom(ws, 0);
    } else if ((type === "ack" || type === "error") && this.pending.has(frame.id)) {
      const handler = this.pending.get(frame.id);
      this.pending.delete(frame.id);
      handler(frame);
    } else if (type === "system_message") {
      if ((frame.data || {}).event === "resync") state.resyncs++;
    } else if (type === "error") {
      noteError(JSON.stringify(frame));
    }
  }

  // Join rooms[k..], one at a time, recovering each from its position.
  joinFrom(ws, k, tries = 0) {
    if (ws !== this.ws) return;
    if (k === this.rooms.length) {
      this.joined = true;
      this.failures = 0;
      if (this.onReady) this.onReady(true);
      return;
    }
    const room = this.rooms[k];
    const stream = this.streams.get("room:" + room);
    const since = cfg.recover ? stream.since() : null;
    const id = this.nextId++;
    this.pending.set(id, (frame) => {
      if (frame.type === "ack") {
        const d = frame.data || {};
        if (since) {
          if (d.recovered === true) stream.recovered++;
          else stream.notRecovered++;
        }
        stream.position(d.epoch, d.offset);
        this.joinFrom(ws, k + 1);
      } else if (((frame.data || {}).code === "unavailable") && tries < 40) {
        setTimeout(() => this.joinFrom(ws, k, tries + 1), 250);
      } else {
        noteError(`${this.user} join ${room}: ${JSON.stringify(frame)}`);
        ws.terminate();
      }
    });
    ws.send(JSON.stringify({ type: "join_room", data: since ? { room, since } : room, id }));
  }

  delivered(frame) {
    state.received++;
    let stream;
    if (frame.room !== undefined) stream = this.streams.get("room:" + frame.room);
    else if (frame.user_id !== undefined) stream = frame.user_id === this.user ? this.streams.get("user") : undefined;
    else stream = this.streams.get("all");
    if (!stream) {
      state.foreign++;
      noteError(`${this.user} got a message not for it: ${JSON.stringify(frame).slice(0, 200)}`);
      return;
    }
    const d = frame.data || {};
    stream.seq(d.s);
    if (stream.kind !== "all") {
      if (typeof frame.offset === "number") stream.position(frame.epoch, frame.offset);
      else stream.noOffset++;
    }
    recordLatency(d.m, d.t);
  }

  onClose(ws, code) {
    if (ws !== this.ws) return;
    this.joined = false;
    this.ws = null;
    this.pending.clear();
    state.closeCodes[code] = (state.closeCodes[code] || 0) + 1;
    if (state.closing) {
      if (this.onClosed) this.onClosed();
      return;
    }
    // Dropped (a killed node, a refused connect, a failed join): another node, after a pause.
    state.reconnects++;
    this.failures++;
    this.shift += 1 + Math.floor(Math.random() * Math.max(1, cfg.urls.length - 1));
    const delay = (50 + Math.random() * 450) * Math.min(4, this.failures);
    setTimeout(() => {
      if (!state.closing) this.open();
    }, delay);
  }

  // -- the controller's view ---------------------------------------------------------------

  ready(timeoutMs) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.onReady = null;
        resolve(false);
      }, timeoutMs);
      this.onReady = (ok) => {
        clearTimeout(timer);
        this.onReady = null;
        this.everReady = true;
        resolve(ok);
      };
      this.open();
    });
  }

  close() {
    return new Promise((resolve) => {
      const ws = this.ws;
      if (!ws || ws.readyState === WebSocket.CLOSED) {
        resolve(false);
        return;
      }
      this.onClosed = () => resolve(true);
      ws.close(1000, "soak over");
    });
  }
}

async function connectAll() {
  for (let i = 0; i < cfg.count; i++) state.clients.push(new Client(i));
  let next = 0;
  let connected = 0;
  let failed = 0;
  const t0 = now();
  const worker = async () => {
    while (next < cfg.count) {
      const c = state.clients[next++];
      if (await c.ready(cfg.timeoutMs)) connected++;
      else failed++;
    }
  };
  const workers = [];
  for (let w = 0; w < Math.min(cfg.concurrency, cfg.count); w++) workers.push(worker());
  await Promise.all(workers);
  send({ event: "ready", started: t0, finished: now(), connected, failed, errors: state.errors });
}

function stats() {
  let open = 0;
  for (const c of state.clients) if (c.joined) open++;
  send({ event: "stats", received: state.received, open, reconnects: state.reconnects,
         resyncs: state.resyncs });
}

function report() {
  const kinds = kindCounters();
  const examples = [];
  for (const c of state.clients) {
    for (const [key, s] of c.streams) {
      const k = kinds[s.kind];
      k.distinct += s.distinct;
      k.duplicates += s.duplicates;
      k.outOfOrder += s.outOfOrder;
      k.bigGaps += s.bigGaps;
      k.noOffset += s.noOffset;
      k.recovered += s.recovered;
      k.notRecovered += s.notRecovered;
      k.epochChanges += s.epochChanges;
      const holes = s.holes ? s.holes.size : 0;
      k.holes += holes;
      if ((holes || s.duplicates) && examples.length < 10) {
        examples.push({ user: c.user, stream: key, last: s.last, duplicates: s.duplicates,
                        holes: s.holes ? Array.from(s.holes).slice(0, 10) : [] });
      }
    }
  }
  const hist = {};
  for (const [m, h] of state.hist) hist[m] = Object.fromEntries(h);
  send({ event: "report", kinds, hist, latMax: state.latMax, received: state.received,
         foreign: state.foreign, resyncs: state.resyncs, reconnects: state.reconnects,
         closeCodes: state.closeCodes, errors: state.errors, examples });
}

// Every client sends its close frame in the same tick; report once all are closed.
async function closeAll() {
  state.closing = true;
  const t0 = now();
  const closes = state.clients.map((c) => c.close());
  let forced = 0;
  const deadline = new Promise((resolve) => setTimeout(() => resolve("late"), 60000));
  const done = await Promise.race([Promise.all(closes), deadline]);
  if (done === "late") {
    for (const c of state.clients) {
      if (c.ws && c.ws.readyState !== WebSocket.CLOSED) {
        forced++;
        c.ws.terminate();
      }
    }
  }
  const clean = done === "late" ? 0 : done.filter(Boolean).length;
  send({ event: "closedall", clean, forced, ms: Math.round((now() - t0) * 1000) });
}

function exitNow() {
  state.closing = true;
  for (const c of state.clients) if (c.ws) c.ws.terminate();
  send({ event: "closed" });
  setTimeout(() => process.exit(0), 50);
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const cmd = line.trim();
  if (cmd === "connect") connectAll();
  else if (cmd === "stats") stats();
  else if (cmd === "report") report();
  else if (cmd === "closeall") closeAll();
  else if (cmd === "close") exitNow();
});
rl.on("close", () => process.exit(0));
send({ event: "hello", pid: process.pid });
