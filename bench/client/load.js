// One load-generating process of the benchmark: many WebSocket clients, one event loop.
//
// The controller (bench/loadgen.py) starts this with one JSON argument and then
// talks to it over stdin/stdout, one JSON object per line:
//
//   -> {"event":"hello"}                 on start
//   <- "connect"                         open `count` clients (at most `concurrency` at a time),
//                                        join their rooms, then
//   -> {"event":"ready", ...}            with connect timings and failures
//   <- "stats" / "stats full"            -> {"event":"stats", ...} (full: per-client counts)
//   <- "reset"                           zero the delivery counters
//   <- "close"                           close every socket and exit
//
// Protocols: "hub" (hubnode, and the bare baseline server, which speaks the
// same frames) uses `ws`; "sio" uses socket.io-client over the websocket
// transport only. Clients offer permessage-deflate only when `deflate` is set
// (the *-deflate systems), so otherwise no server compresses. With `msgpack`
// (hub only) the clients ask for the `hubnode.msgpack` subprotocol: every frame
// both ways is binary, one msgpack map (@msgpack/msgpack encodes the joins and
// decodes the server's frames; like the JSON clients, which find "type":"bench"
// without parsing, a bench or warm-up frame is recognised by its bytes and decoded
// only for its timestamp, or once per socket to check it).
//
// Latency: the publisher puts time.monotonic() (CLOCK_MONOTONIC, seconds) in
// data.t; process.hrtime is the same clock, so receive - t is the
// publish-to-receive time. Kept as a log histogram with 1% buckets.
"use strict";

const readline = require("readline");

const cfg = JSON.parse(process.argv[2]);
const BENCH_TAG = Buffer.from('"type":"bench"');
const WARM_TAG = Buffer.from('"type":"warmup"');
// the same key and value in msgpack: fixstr "type", then fixstr "bench" / "warmup"
const PACKED_BENCH_TAG = Buffer.from("\xa4type\xa5bench", "latin1");
const PACKED_WARM_TAG = Buffer.from("\xa4type\xa6warmup", "latin1");
const LOG_BASE = Math.log(1.01);

const state = {
  sockets: new Array(cfg.count),
  counts: new Int32Array(cfg.count),
  warm: new Int32Array(cfg.count),
  received: 0,
  first: 0,
  last: 0,
  hist: new Map(),
  latCount: 0,
  latMax: 0,
  closed: 0,
  closeCodes: {},
  errors: [],
  closing: false,
};

function now() {
  return Number(process.hrtime.bigint()) / 1e9;
}

function send(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function userOf(i) {
  return cfg.userPrefix + (cfg.start + i);
}

function roomsOf(i) {
  const spec = cfg.rooms || {};
  const rooms = (spec.shared || []).slice();
  if (spec.mod) rooms.push(spec.modPrefix + ((cfg.start + i) % spec.mod));
  return rooms;
}

function urlOf(i) {
  return cfg.urls[(cfg.start + i) % cfg.urls.length];
}

function localAddressOf(i) {
  const addrs = cfg.localAddresses || [];
  return addrs.length ? addrs[i % addrs.length] : undefined;
}

function recordLatency(t) {
  const ms = (now() - t) * 1000;
  state.latCount++;
  if (ms > state.latMax) state.latMax = ms;
  const us = Math.max(1, ms * 1000);
  const b = Math.ceil(Math.log(us) / LOG_BASE);
  state.hist.set(b, (state.hist.get(b) || 0) + 1);
}

function delivered(i) {
  const t = now();
  if (state.received === 0) state.first = t;
  state.last = t;
  state.received++;
  state.counts[i]++;
}

function noteError(text) {
  if (state.errors.length < 20) state.errors.push(text);
}

function onClosed(code) {
  if (state.closing) return;
  state.closed++;
  state.closeCodes[code] = (state.closeCodes[code] || 0) + 1;
}

// -- hubnode / baseline protocol ------------------------------------------------

let codecOnce = null;

function hubCodec() {
  if (codecOnce === null) codecOnce = makeHubCodec();
  return codecOnce;
}

function makeHubCodec() {
  if (!cfg.msgpack) {
    return { protocols: [], benchTag: BENCH_TAG, warmTag: WARM_TAG, encode: JSON.stringify,
             decode: (data) => JSON.parse(data) };
  }
  const { encode, decode } = require("@msgpack/msgpack");
  return { protocols: ["hubnode.msgpack"], benchTag: PACKED_BENCH_TAG, warmTag: PACKED_WARM_TAG,
           encode, decode };
}

function openHub(i) {
  const WebSocket = require("ws");
  const codec = hubCodec();
  return new Promise((resolve, reject) => {
    const url = `${urlOf(i)}?user_id=${encodeURIComponent(userOf(i))}`;
    const ws = new WebSocket(url, codec.protocols, {
      // as browsers do: `permessage-deflate; client_max_window_bits`
      perMessageDeflate: Boolean(cfg.deflate),
      localAddress: localAddressOf(i),
      handshakeTimeout: cfg.timeoutMs,
    });
    const rooms = roomsOf(i);
    let pendingAck = null;
    let nextId = 1;
    let settled = false;
    let checked = !cfg.msgpack;
    const fail = (err) => {
      if (!settled) {
        settled = true;
        reject(err);
      }
    };
    const timer = setTimeout(() => fail(new Error("connect/join timeout")), cfg.timeoutMs);
    const joinNext = () => {
      if (rooms.length === 0) {
        clearTimeout(timer);
        settled = true;
        resolve(ws);
        return;
      }
      pendingAck = nextId++;
      ws.send(codec.encode({ type: "join_room", data: rooms.shift(), id: pendingAck }));
    };
    ws.on("message", (data, isBinary) => {
      if (isBinary !== Boolean(cfg.msgpack)) noteError(`unexpected ${isBinary ? "binary" : "text"} frame`);
      if (data.indexOf(codec.benchTag) !== -1) {
        delivered(i);
        if (cfg.latency) recordLatency(codec.decode(data).data.t);
        else if (!checked) {
          checked = true;
          if (codec.decode(data).type !== "bench") noteError("a bench frame did not decode as one");
        }
        return;
      }
      if (data.indexOf(codec.warmTag) !== -1) {
        state.warm[i]++;
        return;
      }
      const frame = codec.decode(data);
      if (frame.type === "connected" && !settled) joinNext();
      else if (frame.type === "ack" && frame.id === pendingAck) joinNext();
      else if (frame.type === "error") {
        noteError(JSON.stringify(frame));
        if (frame.id === pendingAck) fail(new Error(frame.data.code));
      }
    });
    ws.on("error", (err) => fail(err));
    ws.on("close", (code) => {
      if (settled) onClosed(code);
      fail(new Error(`closed ${code} before ready`));
    });
  });
}

// -- Socket.IO protocol ---------------------------------------------------------

function openSio(i) {
  const { io } = require("socket.io-client");
  return new Promise((resolve, reject) => {
    const socket = io(urlOf(i), {
      transports: ["websocket"],
      query: { user_id: userOf(i) },
      forceNew: true,
      reconnection: false,
      // socket.io-client's own default offers the extension (threshold 1024 is its default)
      perMessageDeflate: cfg.deflate ? { threshold: 1024 } : false,
      localAddress: localAddressOf(i),
      timeout: cfg.timeoutMs,
    });
    const rooms = roomsOf(i);
    let settled = false;
    const fail = (err) => {
      if (!settled) {
        settled = true;
        socket.close();
        reject(err);
      }
    };
    const timer = setTimeout(() => fail(new Error("connect/join timeout")), cfg.timeoutMs);
    const joinNext = () => {
      if (rooms.length === 0) {
        clearTimeout(timer);
        settled = true;
        resolve(socket);
        return;
      }
      socket.emit("join", rooms.shift(), (reply) => {
        if (reply === "ok") joinNext();
        else fail(new Error(`join refused: ${reply}`));
      });
    };
    socket.on("bench", (data) => {
      delivered(i);
      if (cfg.latency) recordLatency(data.t);
    });
    socket.on("warmup", () => {
      state.warm[i]++;
    });
    socket.on("connect", joinNext);
    socket.on("connect_error", (err) => {
      const cause = err && err.description;
      fail(new Error(`${err.message}${cause ? ": " + (cause.message || cause) : ""}`));
    });
    socket.on("disconnect", (reason) => {
      if (settled) onClosed(reason);
    });
  });
}

// -- connecting ----------------------------------------------------------------

async function connectAll() {
  const open = cfg.proto === "sio" ? openSio : openHub;
  const connectMs = [];
  let next = 0;
  let failed = 0;
  const t0 = now();
  const worker = async () => {
    while (next < cfg.count) {
      const i = next++;
      const started = now();
      try {
        state.sockets[i] = await open(i);
        connectMs.push(Math.round((now() - started) * 1e5) / 100);
      } catch (err) {
        failed++;
        noteError(String(err && err.message ? err.message : err));
      }
    }
  };
  const workers = [];
  for (let w = 0; w < Math.min(cfg.concurrency, cfg.count); w++) workers.push(worker());
  await Promise.all(workers);
  const t1 = now();
  send({ event: "ready", started: t0, finished: t1, connected: connectMs.length, failed,
         connectMs, errors: state.errors });
}

function stats(full) {
  let min = Infinity;
  let max = 0;
  let warmMin = Infinity;
  for (let i = 0; i < cfg.count; i++) {
    const c = state.counts[i];
    if (c < min) min = c;
    if (c > max) max = c;
    if (state.sockets[i] && state.warm[i] < warmMin) warmMin = state.warm[i];
  }
  const out = {
    event: "stats", received: state.received, first: state.first, last: state.last,
    minPerClient: cfg.count === 0 ? 0 : min, maxPerClient: max,
    warmMin: warmMin === Infinity ? 0 : warmMin, warmTotal: state.warm.reduce((a, b) => a + b, 0),
    latCount: state.latCount, latMax: state.latMax, hist: Object.fromEntries(state.hist),
    closed: state.closed, closeCodes: state.closeCodes, errors: state.errors,
  };
  if (full) out.counts = Array.from(state.counts);
  send(out);
}

function reset() {
  state.counts.fill(0);
  state.received = 0;
  state.first = 0;
  state.last = 0;
  state.hist = new Map();
  state.latCount = 0;
  state.latMax = 0;
}

// The TCP socket under a client. Closing it with a reset leaves no TIME_WAIT
// behind, so back-to-back runs do not run out of ephemeral ports.
function rawSocketOf(s) {
  if (cfg.proto !== "sio") return s._socket;
  const transport = s.io && s.io.engine && s.io.engine.transport;
  return transport && transport.ws && transport.ws._socket;
}

function closeAll() {
  state.closing = true;
  for (const s of state.sockets) {
    if (!s) continue;
    try {
      const raw = rawSocketOf(s);
      if (raw && raw.resetAndDestroy) raw.resetAndDestroy();
      else if (cfg.proto === "sio") s.close();
      else s.terminate();
    } catch (err) {
      noteError(String(err));
    }
  }
  send({ event: "closed" });
  setTimeout(() => process.exit(0), 50);
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const cmd = line.trim();
  if (cmd === "connect") connectAll();
  else if (cmd === "stats") stats(false);
  else if (cmd === "stats full") stats(true);
  else if (cmd === "reset") reset();
  else if (cmd === "close") closeAll();
});
rl.on("close", () => process.exit(0));
send({ event: "hello", pid: process.pid });
