// hub.js: a dependency-free browser client for hubnode (docs/protocol.md).
//
//   <script src="/hub.js"></script>            -> window.HubClient
//   import { HubClient } from "/hub.mjs";      -> the same class as an ES module
//
//   const hub = new HubClient("/ws", { userId: "alice" });
//   hub.on("room_message", (msg) => console.log(msg.user_id, msg.data.message));
//   await hub.join("lobby");                   // resolves on the server's ack
//   await hub.sendToRoom("lobby", "hello");    // rejects with err.code, e.g. "not_in_room"
//   hub.on("recovered", (e) => { if (!e.recovered) refetch(e.room); });  // after a reconnect
//   const { users, anonymous } = await hub.presence("lobby");            // who is in the room
//   hub.on("presence", (msg) => console.log(msg.room, msg.data.event, msg.data.user_id));
//   hub.on("disconnect", (msg) => alert(msg.data.reason));              // kicked by the server
//
//   // Or let hub.js keep every joined room's member list (query + events):
//   const hub2 = new HubClient("/ws", { userId: "bob", presence: true });
//   hub2.on("members", (e) => render(e.room, e.users, e.anonymous));    // also hub2.members(room)
//
// What it does for you:
// - every request carries an id; its Promise settles on the matching `ack` or
//   `error` frame (err.code is the protocol's error code, or one of hub.js's
//   own: "timeout", "disconnected", "closed", "left");
// - calls made while disconnected wait for the next connection (up to
//   `timeout`); a request in flight when the connection drops is rejected
//   with "disconnected" (it may or may not have been delivered: at most once);
// - reconnects with jittered exponential backoff, reset once a connection has
//   been stable for a while; on close 1001 (node draining) it reconnects at
//   once, to the next URL when several are given; all joined rooms are
//   re-joined on every new connection;
// - recovery (streams with history, docs/protocol.md): it keeps the
//   position (offset, epoch) of each joined room and of the user's own stream,
//   re-joins with `since` and reconnects with `?since=`, so the node replays
//   what was missed; it drops a message whose offset it has already delivered
//   (merge by offset, never by timing); a `recovered` event says, per stream
//   re-established on a new connection, whether nothing was lost;
// - `resync` (the node lost Redis for a while: messages may be missing) and
//   `reconnect` (the node is going away) system messages become events;
// - presence: `presence(room)` asks who is in a room you are in;
//   `presence` frames without an id (join/leave events, sent in rooms the node's
//   --presence-rooms covers) reach on("presence"). With the option
//   `presence: true` hub.js keeps each joined room's member list itself: one
//   query after every join ack (re-joins after a reconnect too) and after
//   `resync`, the events applied on top, in order, and a `members` event per change;
// - server-side control: a `disconnect` system message comes
//   first, then close 4000 (stop for good: no reconnect, pending requests reject
//   with "closed") or 4001 (reconnect as after any drop); a room the server
//   joined the connection to (`joined`) is kept, with its position, and re-joined
//   after a reconnect like the app's own; `left` forgets it. A refused
//   server-side join is an `error` event with data.code "too_many_rooms" and data.room;
// - while the tab is hidden it pings the server, and drops a connection whose
//   pong does not come back, because that is where connections die silently
//   (laptop sleep, mobile background, NAT timeouts) with nobody typing to notice.
(function (root) {
  "use strict";

  const DEFAULTS = {
    userId: null, // ?user_id= for a node in auth mode "none"
    token: null, // JWT string, or a function returning one (or a Promise of one), asked on every connect
    reconnect: true,
    minDelay: 500, // ms: first reconnect delay; doubles per failed attempt...
    maxDelay: 15000, // ...up to this; each delay is jittered to 50-100 % of its value
    stableAfter: 10000, // ms a connection must last before the backoff starts over
    timeout: 10000, // ms a request waits for its answer (or for a connection to be sent on)
    pingInterval: 25000, // ms between pings while the tab is hidden; 0 turns liveness pings off
    pingTimeout: 10000, // ms a liveness ping waits for its pong before the connection is dropped
    presence: false, // keep a member list of every joined room: members(room) and "members" events
  };

  // Requests that may safely be sent again on a new connection (idempotent).
  const RESENDABLE = new Set(["join_room", "leave_room"]);
  // Frame types that answer a request (they carry its id).
  const ANSWERS = new Set(["ack", "error", "pong", "presence"]);
  // Close codes of a server-side disconnect (docs/protocol.md).
  const CLOSE_STOP = 4000; // do not reconnect
  const CLOSE_RECONNECT = 4001; // reconnect as usual

  function hubError(code, message) {
    return Object.assign(new Error(message || code), { code });
  }

  // "/ws", "http://host/ws" or "ws://host/ws" -> an absolute ws:// or wss:// URL.
  function wsUrl(url) {
    const base = typeof location !== "undefined" ? location.href : undefined;
    const u = new URL(url, base);
    if (u.protocol === "http:") u.protocol = "ws:";
    if (u.protocol === "https:") u.protocol = "wss:";
    return u;
  }

  class HubClient {
    // url: one WebSocket URL (behind a load balancer) or a list of node URLs,
    // tried in turn: each reconnect goes to the next one. Default: "/ws".
    constructor(url = "/ws", options = {}) {
      this.urls = (Array.isArray(url) ? url : [url]).map(String);
      if (!this.urls.length) throw new Error("HubClient needs at least one URL");
      this.options = Object.assign({}, DEFAULTS, options);
      this.rooms = new Set(); // rooms to be in: re-joined after every reconnect
      this.info = null; // data of the last `connected` frame: {conn_id, user_id, node}
      this.url = null; // the URL of the current (or last) connection
      this._handlers = new Map();
      this._pending = new Map(); // id -> {type, data, resolve, reject, timer, sent}
      this._nextId = 1;
      // Stream positions (history and recovery). Rooms: room -> {offset, epoch, conn, acked}, created
      // by the first ack or message of a wanted room; offset/epoch stay null when the
      // room has no history; conn: the connection (this._conn) it was last seen on,
      // acked: the one whose join ack it last had.
      this._streams = new Map();
      this._user = null; // the user stream: {user, offset, epoch}, from `connected` frames
      // Member lists (option `presence`): room -> {users: Map user -> connections | null
      // until the first answer, anonymous, asking: serial of the query in flight | 0, events}.
      this._presence = new Map();
      this._farewell = null; // data of the `disconnect` system message that precedes a close 4000/4001
      this._userSince = null; // the `since` the current attempt's URL carries, or null
      this._conn = 0; // serial of the current connection: 1 for the first `connected` frame
      this._urlIndex = 0;
      this._attempt = 0;
      this._ws = null;
      this._open = false; // true between the `connected` frame and the close
      this._closed = false; // true after close(): no more reconnects
      this._goingAway = false; // the node announced it is draining
      this._timers = { retry: null, stable: null, ping: null };
      this._onVisibility = () => this._visibilityChanged();
      if (typeof document !== "undefined") document.addEventListener("visibilitychange", this._onVisibility);
      this._connect();
    }

    // -- public API -----------------------------------------------------------
    get connected() { return this._open; }
    get node() { return this.info ? this.info.node : null; }
    // Failed attempts since the last stable connection: the backoff's exponent.
    get attempts() { return this._attempt; }

    // Listen to a message type ("room_message", "private_message", "broadcast",
    // "connected", "presence" (join/leave events), any type the server
    // publishes, "*" for every message) or to a client event: "disconnected"
    // {code, reason, delay} (delay null: no reconnect will follow), a system
    // message by its data.event ("resync", "reconnect", "disconnect" {data:
    // {reason, reconnect}}, "joined" and "left" {data: {room}}: the server
    // joined or removed this connection), "error" (an error frame not tied to a
    // request), "recovered" {stream: "room"|"user", room, recovered, offset,
    // epoch}: a stream was re-established on a new connection (or joined with
    // `since`); recovered false means messages may be missing: refetch that
    // stream's state. With the option `presence`: "members" {room, users,
    // anonymous, change}: a room's member list changed (change: the presence
    // event's data {event, user_id}, or null for a fresh query's answer).
    on(type, fn) {
      if (!this._handlers.has(type)) this._handlers.set(type, new Set());
      this._handlers.get(type).add(fn);
      return this;
    }

    off(type, fn) {
      const set = this._handlers.get(type);
      if (set) set.delete(fn);
      return this;
    }

    // options.since: {offset, epoch}, a position the app already has (say from
    // GET /api/rooms/<room>/history): the node first sends what came after it.
    join(room, options = {}) {
      this.rooms.add(room);
      const since = options && options.since ? { offset: options.since.offset, epoch: options.since.epoch } : null;
      return this._request("join_room", room, this.options.timeout, { since }).catch((err) => {
        if (!["timeout", "disconnected", "left", "closed"].includes(err.code)) this._forget(room);
        throw err;
      });
    }

    leave(room) {
      this._forget(room);
      for (const [id, req] of this._pending) {
        if (!req.sent && req.type === "join_room" && req.data === room) this._settle(id, hubError("left"));
      }
      // A new connection starts in no room: while disconnected there is nothing to leave.
      if (!this._open) return Promise.resolve({ type: "ack" });
      return this._request("leave_room", room);
    }

    sendToRoom(room, message) { return this._request("room_message", { room, message }); }
    sendPrivate(userId, message) { return this._request("private_message", { user_id: userId, message }); }
    broadcast(data) { return this._request("broadcast", data); }
    ping(data = null, timeout) { return this._request("ping", data, timeout); } // resolves with the pong

    // Who is in `room` (joined by this connection), cluster-wide: resolves with
    // {users: {user_id: connections}, anonymous: connections}; rejects like any
    // request (err.code "not_in_room", "bad_room", "unavailable", "timeout", ...).
    presence(room) {
      return this._request("presence", room).then((msg) => {
        const d = msg.data && typeof msg.data === "object" ? msg.data : {};
        return { users: Object.assign({}, d.users), anonymous: d.anonymous || 0 };
      });
    }

    // With the option `presence`: the member list hub.js keeps for `room`,
    // {users: {user_id: connections}, anonymous}, or null before its first
    // answer. Connection counts are those of the last query (1 for a user who
    // joined since); which users are there follows every event.
    members(room) {
      const p = this._presence.get(room);
      return p && p.users ? this._membersOf(p) : null;
    }

    // The last position delivered to the app: position(room) for a room,
    // position() for the user's own stream. {offset, epoch}, or null when the
    // stream has no history (or is not joined).
    position(room) {
      const s = room === undefined || room === null ? this._user : this._streams.get(room);
      return s && s.offset !== null ? { offset: s.offset, epoch: s.epoch } : null;
    }

    // Close for good: pending requests reject with "closed", no reconnect.
    close() {
      const ws = this._ws;
      this._shutdown();
      if (ws) ws.close(1000);
    }

    // -- connection -----------------------------------------------------------
    // One attempt. A token function that throws, or a URL the browser refuses,
    // counts as a failed attempt (code 1006, the reason says why), like a refused handshake.
    async _connect() {
      this._timers.retry = null;
      let ws;
      try {
        const u = wsUrl(this.urls[this._urlIndex % this.urls.length]);
        const { userId, token } = this.options;
        if (userId) u.searchParams.set("user_id", userId);
        const t = typeof token === "function" ? await token() : token;
        if (t) u.searchParams.set("token", t);
        if (this._closed) return;
        // Recover the user stream from where the last connection left it.
        const user = this._user;
        this._userSince = user && user.offset !== null ? { offset: user.offset, epoch: user.epoch } : null;
        if (this._userSince) u.searchParams.set("since", user.offset + ":" + user.epoch);
        this.url = u.toString();
        ws = new WebSocket(this.url);
      } catch (err) {
        return this._closedWith(null, 1006, String(err && err.message || err));
      }
      this._ws = ws;
      ws.onmessage = (ev) => this._onFrame(ws, ev.data);
      ws.onclose = (ev) => this._closedWith(ws, ev.code, ev.reason);
    }

    _onFrame(ws, text) {
      if (ws !== this._ws) return;
      let msg;
      try { msg = JSON.parse(text); } catch { return; }
      if (!msg || typeof msg !== "object") return;
      const id = msg.id;
      if (id != null && ANSWERS.has(msg.type) && this._pending.has(id)) {
        const d = msg.data || {};
        const req = this._pending.get(id);
        if (msg.type === "ack" && req.type === "join_room") this._joined(req, msg.data);
        this._settle(id, msg.type === "error" ? hubError(d.code, d.message) : null, msg);
        return;
      }
      if (id != null && msg.type === "presence") return; // a late answer (timed out): not an event
      if (msg.type === "connected") {
        const recovery = this._onConnected(msg.data || {});
        this._emit("connected", msg);
        this._emit("*", msg);
        if (recovery) this._emit("recovered", recovery);
        return;
      }
      if (!this._track(msg)) return; // already delivered (a replayed message's live copy)
      if (msg.type === "system_message" && msg.data && msg.data.event) {
        this._systemMessage(msg.data);
        this._emit(msg.data.event, msg);
      }
      if (msg.type === "presence") this._presenceEvent(msg);
      this._emit(msg.type, msg);
      this._emit("*", msg);
    }

    // What a system message changes here, before the app hears of it.
    _systemMessage(d) {
      if (d.event === "reconnect") this._goingAway = true;
      else if (d.event === "disconnect") this._farewell = d;
      else if (d.event === "joined" && typeof d.room === "string") this._serverJoined(d);
      else if (d.event === "left" && typeof d.room === "string") this._serverLeft(d.room);
      else if (d.event === "resync") for (const room of this._presence.keys()) this._askPresence(room);
    }

    // The server joined this connection to a room (server-side control): from now on it
    // is one of the rooms re-joined after a reconnect, from the position the
    // `joined` message gives (when the room keeps history). A room the app
    // joined itself keeps its own position: its messages may already be here.
    _serverJoined(d) {
      const room = d.room;
      if (this._inFlight("leave_room", room)) return; // the app's leave reaches the node after this join
      if (!this.rooms.has(room)) {
        this.rooms.add(room);
        const s = this._streamOf(room);
        const hasPosition = Number.isInteger(d.offset) && typeof d.epoch === "string";
        s.conn = s.acked = this._conn;
        s.offset = hasPosition ? d.offset : null;
        s.epoch = hasPosition ? d.epoch : null;
      }
      this._askPresence(room);
    }

    // The server took this connection out of a room. A join of it already on
    // its way (a re-join after a reconnect, or the app's own) would put the
    // connection back in once the node reads it: a leave sent after it, on
    // the same connection, is read after it, so the server's decision holds.
    _serverLeft(room) {
      this._forget(room);
      if (this._inFlight("join_room", room)) this._request("leave_room", room).catch(() => {});
    }

    // Whether a request of `type` for `room` was sent on this connection and is not answered yet.
    _inFlight(type, room) {
      for (const req of this._pending.values()) {
        if (req.sent && req.type === type && req.data === room) return true;
      }
      return false;
    }

    // The connection is routable: re-join rooms, then send what waited.
    // Returns the user stream's `recovered` event when this connection
    // re-established the same user's stream, else null.
    _onConnected(info) {
      const previous = this.info;
      this.info = info;
      this._conn++;
      const recovery = this._userConnected(info, previous);
      this._open = true;
      this._goingAway = false;
      const waiting = [...this._pending.entries()].filter(([, req]) => !req.sent);
      const joining = new Set(waiting.filter(([, r]) => r.type === "join_room").map(([, r]) => r.data));
      for (const room of this.rooms) {
        if (!joining.has(room)) this._rejoin(room);
      }
      for (const [id, req] of waiting) this._transmit(id, req);
      this._timers.stable = setTimeout(() => { this._attempt = 0; }, this.options.stableAfter);
      this._schedulePing();
      return recovery;
    }

    _rejoin(room) {
      this._request("join_room", room).catch((err) => {
        if (["timeout", "disconnected", "left", "closed"].includes(err.code)) return;
        this._forget(room); // e.g. forbidden: the app learns it through "error"
        this._emit("error", { type: "error", room, data: { code: err.code, message: err.message } });
      });
    }

    _forget(room) {
      this.rooms.delete(room);
      this._streams.delete(room);
      this._presence.delete(room);
    }

    // -- member lists (option `presence`, docs/protocol.md) -------------------
    // Ask who is in `room` now; events that arrive meanwhile are kept and applied
    // on top of the answer, in order: the answer may predate some of them, and
    // applying a join or leave twice changes nothing. The last query wins.
    _askPresence(room) {
      if (!this.options.presence || !this.rooms.has(room)) return;
      let p = this._presence.get(room);
      if (!p) this._presence.set(room, p = { users: null, anonymous: 0, asking: 0, serial: 0, events: [] });
      const serial = p.asking = ++p.serial;
      p.events = [];
      const current = () => this._presence.get(room) === p && p.asking === serial;
      this.presence(room).then((answer) => {
        if (!current()) return;
        p.users = new Map(Object.entries(answer.users));
        p.anonymous = answer.anonymous;
        this._presenceSettled(room, p);
      }, (err) => {
        if (!current()) return;
        this._presenceSettled(room, p);
        // Disconnected or left: the next join ack asks again. Anything else (unavailable, a timeout
        // while connected) would leave the list unknown until a resync: ask again in a while.
        if (this._open && this.rooms.has(room) && !["disconnected", "closed", "left", "not_in_room"].includes(err.code)) {
          // Settled above (asking 0): ask again unless a newer query or a leave came meanwhile.
          setTimeout(() => { if (this._presence.get(room) === p && !p.asking) this._askPresence(room); },
                     this.options.minDelay);
        }
      });
    }

    _presenceSettled(room, p) {
      p.asking = 0;
      if (!p.users) return;
      for (const d of p.events) this._applyPresence(p, d);
      p.events = [];
      this._emit("members", Object.assign({ type: "members", room, change: null }, this._membersOf(p)));
    }

    _presenceEvent(msg) {
      const d = msg.data;
      const p = this._presence.get(msg.room);
      if (!p || !d || typeof d.user_id !== "string" || (d.event !== "join" && d.event !== "leave")) return;
      if (p.asking) { p.events.push(d); return; }
      if (!p.users) return;
      this._applyPresence(p, d);
      const change = { event: d.event, user_id: d.user_id };
      this._emit("members", Object.assign({ type: "members", room: msg.room, change }, this._membersOf(p)));
    }

    _applyPresence(p, d) {
      if (d.event === "leave") p.users.delete(d.user_id);
      else if (!p.users.has(d.user_id)) p.users.set(d.user_id, 1);
    }

    _membersOf(p) {
      return { users: Object.fromEntries(p.users), anonymous: p.anonymous };
    }

    // -- recovery (docs/protocol.md) ----------------------------------------
    // The user stream on a new `connected` frame: take its position, and say
    // whether the missed messages (which follow the frame) are coming.
    _userConnected(info, previous) {
      const user = info.user_id == null ? null : info.user_id;
      const sent = this._userSince;
      this._userSince = null;
      const had = this._user && this._user.user === user ? this._user : null;
      const hasPosition = Number.isInteger(info.offset) && typeof info.epoch === "string";
      const recovered = Boolean(sent && had && info.recovered === true && hasPosition && info.epoch === had.epoch);
      if (user === null) this._user = null;
      else if (recovered) this._user = had; // keep O: the replayed messages (offsets above O) follow
      else this._user = { user, offset: hasPosition ? info.offset : null, epoch: hasPosition ? info.epoch : null };
      // An event only when this user's stream existed on an earlier connection.
      if (user === null || !previous || previous.user_id !== user) return null;
      const s = this._user;
      return { type: "recovered", stream: "user", room: null, user_id: user, recovered, offset: s.offset, epoch: s.epoch };
    }

    // A join as it goes on the wire: with `since` when the room was joined on
    // an earlier connection and has a position (or the app gave one).
    _joinData(req) {
      const room = req.data;
      const s = this._streams.get(room);
      req.rejoin = Boolean(s && s.conn !== this._conn);
      req.sentSince = req.rejoin && s.offset !== null ? { offset: s.offset, epoch: s.epoch } : req.since || null;
      return req.sentSince ? { room, since: req.sentSince } : room;
    }

    // A join's ack: the room's position from now on, and the `recovered` event.
    _joined(req, data) {
      const room = req.data;
      if (!this.rooms.has(room)) return; // left meanwhile
      this._askPresence(room);
      const d = data && typeof data === "object" ? data : {};
      const hasPosition = Number.isInteger(d.offset) && typeof d.epoch === "string";
      const s = this._streamOf(room);
      // A join of a room this connection is in already: the node may answer a bare ack.
      const repeat = s.acked === this._conn;
      s.conn = s.acked = this._conn;
      if (hasPosition) {
        // Replayed messages came before the ack and moved s already; every later
        // message is above d.offset. Not recovered: the stream starts over at d.
        const ahead = d.recovered !== false && s.epoch === d.epoch && s.offset !== null && s.offset > d.offset;
        if (!ahead) { s.offset = d.offset; s.epoch = d.epoch; }
      } else if (!repeat) {
        s.offset = s.epoch = null; // no history (any more)
      }
      if (!req.rejoin && !req.sentSince) return;
      const recovered = Boolean(req.sentSince && d.recovered === true);
      this._emit("recovered", { type: "recovered", stream: "room", room, recovered, offset: s.offset, epoch: s.epoch });
    }

    // A room's position record, made on its first ack or message.
    _streamOf(room) {
      let s = this._streams.get(room);
      if (!s) this._streams.set(room, s = { offset: null, epoch: null, conn: this._conn, acked: 0 });
      return s;
    }

    // A message with a position: false when it was already delivered (offset not
    // above the stream's last one in the same epoch), else move the position.
    _track(msg) {
      if (!Number.isInteger(msg.offset) || typeof msg.epoch !== "string") return true;
      let s;
      if (msg.room != null) {
        if (!this.rooms.has(msg.room) && !this._streams.has(msg.room)) return true; // not a room we are in
        s = this._streamOf(msg.room);
      } else {
        s = this._user;
        if (!s) return true;
      }
      if (s.epoch === msg.epoch && s.offset !== null && msg.offset <= s.offset) return false;
      s.offset = msg.offset;
      s.epoch = msg.epoch;
      return true;
    }

    _closedWith(ws, code, reason) {
      if (ws !== this._ws || this._closed) return;
      this._ws = null;
      this._open = false;
      this._clearTimers();
      // In flight on the dead connection: joins and leaves are sent again, others fail.
      for (const [id, req] of this._pending) {
        if (!req.sent) continue;
        if (RESENDABLE.has(req.type)) req.sent = false;
        else this._settle(id, hubError("disconnected", "connection lost before the answer"));
      }
      // A server-side disconnect: close 4000 (or its announcement, if a proxy
      // lost the close frame) means stop for good.
      const farewell = this._farewell;
      this._farewell = null;
      const stop = code === CLOSE_STOP || (code !== CLOSE_RECONNECT && farewell !== null && farewell.reconnect === false);
      if (farewell && typeof farewell.reason === "string" && farewell.reason) reason = farewell.reason; // the operator's words
      if (stop) this._shutdown();
      const delay = this.options.reconnect && !stop ? this._nextDelay(code) : null;
      this._goingAway = false; // only the close that follows the announcement is special
      this._emit("disconnected", { type: "disconnected", code, reason, delay });
      if (delay === null) return;
      this._urlIndex++; // the next attempt goes to the next node (when there are several)
      this._timers.retry = setTimeout(() => this._connect(), delay);
    }

    // Draining node (close 1001, or the `reconnect` announcement): go now, with a
    // little jitter so a node's clients do not all arrive in the same millisecond.
    // Anything else: exponential backoff with jitter.
    _nextDelay(code) {
      if (code === 1001 || this._goingAway) return Math.random() * 100;
      const { minDelay, maxDelay } = this.options;
      const delay = Math.min(maxDelay, minDelay * 2 ** this._attempt++);
      return delay * (0.5 + Math.random() / 2);
    }

    // A connection that stopped answering: give up on it without waiting for
    // the browser's close handshake, which on a dead network takes minutes.
    _drop(ws, reason) {
      if (ws !== this._ws) return;
      ws.onclose = ws.onmessage = null;
      try { ws.close(); } catch { /* already closing */ }
      this._closedWith(ws, 1006, reason);
    }

    // -- liveness ---------------------------------------------------------------
    _visibilityChanged() {
      if (document.visibilityState === "visible") this._probe(); // did it survive the sleep?
      this._schedulePing();
    }

    _schedulePing() {
      clearTimeout(this._timers.ping);
      this._timers.ping = null;
      const hidden = typeof document !== "undefined" && document.visibilityState === "hidden";
      if (!hidden || !this._open || !this.options.pingInterval) return;
      this._timers.ping = setTimeout(() => { this._probe(); this._schedulePing(); }, this.options.pingInterval);
    }

    _probe() {
      if (!this._open || !this.options.pingInterval) return;
      const ws = this._ws;
      this.ping("hub.js liveness", this.options.pingTimeout).catch((err) => {
        if (err.code === "timeout") this._drop(ws, "no pong within " + this.options.pingTimeout + " ms");
      });
    }

    // -- requests ---------------------------------------------------------------
    _request(type, data, timeout = this.options.timeout, extra = null) {
      if (this._closed) return Promise.reject(hubError("closed", "the client was closed"));
      const id = this._nextId++;
      return new Promise((resolve, reject) => {
        const req = Object.assign({ type, data, resolve, reject, sent: false }, extra);
        req.timer = setTimeout(() => this._settle(id, hubError("timeout", type + " got no answer")), timeout);
        this._pending.set(id, req);
        if (this._open) this._transmit(id, req);
      });
    }

    _transmit(id, req) {
      req.sent = true;
      const data = req.type === "join_room" ? this._joinData(req) : req.data;
      this._ws.send(JSON.stringify({ type: req.type, data, id }));
    }

    _settle(id, error, msg) {
      const req = this._pending.get(id);
      if (!req) return;
      this._pending.delete(id);
      clearTimeout(req.timer);
      if (error) req.reject(error);
      else req.resolve(msg);
    }

    _emit(type, msg) {
      for (const fn of this._handlers.get(type) || []) {
        try { fn(msg); } catch (err) { console.error("hub.js: a '" + type + "' handler threw", err); }
      }
    }

    // No more connections: pending requests reject with "closed".
    _shutdown() {
      this._closed = true;
      this._ws = null;
      this._open = false;
      this._clearTimers();
      if (typeof document !== "undefined") document.removeEventListener("visibilitychange", this._onVisibility);
      for (const id of [...this._pending.keys()]) this._settle(id, hubError("closed", "the client was closed"));
    }

    _clearTimers() {
      for (const name of Object.keys(this._timers)) {
        clearTimeout(this._timers[name]);
        this._timers[name] = null;
      }
    }
  }

  HubClient.DEFAULTS = DEFAULTS;
  root.HubClient = HubClient;
  if (typeof module === "object" && module && module.exports) module.exports = { HubClient };
})(typeof globalThis !== "undefined" ? globalThis : window);
