// hub.js: a dependency-free client for hubnode (PROTOCOL.md sections 1-4).
// Works as a plain <script> (window.HubClient) and as an ES module import.
(function (root) {
  "use strict";

  class HubClient {
    // url: ws://host/ws; options: {userId, token, reconnect: true}
    constructor(url, options = {}) {
      this.url = url;
      this.options = Object.assign({ reconnect: true, maxBackoff: 10000 }, options);
      this.handlers = {};
      this.pending = new Map();
      this.rooms = new Set();
      this.nextId = 1;
      this.attempt = 0;
      this.info = null;
      this.closedByUser = false;
      this.connect();
    }

    on(type, fn) {
      (this.handlers[type] = this.handlers[type] || []).push(fn);
      return this;
    }

    emit(type, msg) {
      for (const fn of this.handlers[type] || []) fn(msg);
      for (const fn of this.handlers["*"] || []) fn(msg);
    }

    connect() {
      const u = new URL(this.url, location.href);
      if (this.options.userId) u.searchParams.set("user_id", this.options.userId);
      if (this.options.token) u.searchParams.set("token", this.options.token);
      const ws = (this.ws = new WebSocket(u.toString()));
      ws.onmessage = (ev) => this.onFrame(JSON.parse(ev.data));
      ws.onclose = (ev) => this.onClose(ev);
    }

    onFrame(msg) {
      if (msg.type === "connected") {
        this.info = msg.data;
        // Re-join what we were in before a reconnect.
        for (const room of this.rooms) this.request("join_room", room).catch(() => {});
        setTimeout(() => { if (this.ws.readyState === 1) this.attempt = 0; }, 5000);
      }
      if ((msg.type === "ack" || msg.type === "error" || msg.type === "pong") && msg.id != null
          && this.pending.has(msg.id)) {
        const { resolve, reject } = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        if (msg.type === "error") reject(Object.assign(new Error(msg.data.message), { code: msg.data.code }));
        else resolve(msg);
        return;
      }
      if (msg.type === "system_message" && msg.data && msg.data.event) this.emit(msg.data.event, msg);
      this.emit(msg.type, msg);
    }

    onClose(ev) {
      for (const { reject } of this.pending.values()) reject(Object.assign(new Error("closed"), { code: "closed" }));
      this.pending.clear();
      this.emit("disconnected", { code: ev.code });
      if (this.closedByUser || !this.options.reconnect) return;
      // 1001: the node is draining, reconnect at once (the load balancer picks another).
      const base = ev.code === 1001 ? 0 : Math.min(this.options.maxBackoff, 250 * 2 ** this.attempt++);
      setTimeout(() => this.connect(), base * (0.5 + Math.random() / 2));
    }

    request(type, data) {
      const id = this.nextId++;
      return new Promise((resolve, reject) => {
        if (!this.ws || this.ws.readyState !== 1) return reject(Object.assign(new Error("not connected"), { code: "closed" }));
        this.pending.set(id, { resolve, reject });
        this.ws.send(JSON.stringify({ type, data, id }));
      });
    }

    join(room) { this.rooms.add(room); return this.request("join_room", room); }
    leave(room) { this.rooms.delete(room); return this.request("leave_room", room); }
    sendToRoom(room, message) { return this.request("room_message", { room, message }); }
    sendPrivate(userId, message) { return this.request("private_message", { user_id: userId, message }); }
    broadcast(data) { return this.request("broadcast", data); }
    ping(data) { return this.request("ping", data); }
    close() { this.closedByUser = true; this.ws.close(1000); }
  }

  root.HubClient = HubClient;
  if (typeof module !== "undefined") module.exports = { HubClient };
})(typeof window !== "undefined" ? window : globalThis);
