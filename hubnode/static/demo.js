// demo.js: the chat at /, built on hub.js: read it as an example of the client.
//
// Live at once under a guest name in room "lobby". Optional query parameters:
//   ?name=alice&room=ops        start under this name, in this room
//   ?ws=ws://h1/ws,ws://h2/ws   the node URLs to use instead of this page's own
//                               /ws: without a load balancer, list the nodes and
//                               hub.js moves to the next one when one goes away.
// Messages are sent as {text, node}, so a reader sees which node each came from.
// On nodes with history (--history-size), hub.js recovers what was sent while
// the page was reconnecting: the log shows no gap and no duplicate, and a
// notice says when a stream could not be recovered.
// The member list is hub.js's presence tracking (option `presence`): one query
// per join, then the node's join/leave events, so it is live only in rooms the
// node's --presence-rooms covers (`--presence-rooms '*'` for any room).
// When this page may use the HTTP API (a node without --api-key, or the key
// entered on the dashboard in this tab), each member has a "kick" button:
// POST /api/users/<user>/disconnect with reconnect false.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const urls = (params.get("ws") || "/ws").split(",").map((s) => s.trim()).filter(Boolean);

  let name = params.get("name") || "guest-" + Math.random().toString(36).slice(2, 6);
  let room = params.get("room") || "lobby";
  let hub = null;
  let stopped = false; // the server disconnected this page for good (close 4000)
  let members = { users: {}, anonymous: 0 }; // the current room's, from hub.js's presence tracking
  const seenVia = new Map(); // user -> the node their last message came through
  let operator = false; // whether this page may use the HTTP API (and so kick)

  // -- the connection ---------------------------------------------------------
  function connect() {
    if (hub) hub.close(); // the user id is fixed per connection: a new name needs a new one
    stopped = false;
    hub = new HubClient(urls, { userId: name, presence: true });
    hub.on("connected", (m) => {
      setStatus("ok", "node " + m.data.node);
      note(`connected to node ${m.data.node} as ${name}`);
      renderMembers();
    });
    hub.on("disconnected", (e) => {
      stopped = e.delay == null;
      setStatus(stopped ? "bad" : "warn", stopped ? "disconnected" : "reconnecting…");
      const wait = stopped ? ": apply the settings to connect again" : `, retrying in ${(e.delay / 1000).toFixed(1)} s`;
      note(`disconnected (code ${e.code}${e.reason ? ": " + e.reason : ""})${wait}`, stopped ? "warn" : undefined);
    });
    // Server-side control (docs/protocol.md): an operator disconnected us,
    // or joined us to a room / removed us from one.
    hub.on("disconnect", (m) => note("the server disconnected you" + (m.data.reason ? ": " + m.data.reason : ""), "warn"));
    hub.on("joined", (m) => note(`the server added you to #${m.data.room}`));
    hub.on("left", (m) => {
      note(`the server removed you from #${m.data.room}`);
      if (m.data.room === room) { members = { users: {}, anonymous: 0 }; renderMembers(); }
    });
    // The member list: hub.js asks once per join, then follows the presence events.
    hub.on("members", (e) => {
      if (e.room !== room) return;
      members = e;
      const who = e.change && e.change.user_id;
      if (who && who !== name) note(`${who} ${e.change.event === "join" ? "entered" : "left"} the room`);
      renderMembers();
    });
    hub.on("reconnect", () => note("this node is shutting down: moving to another one"));
    hub.on("resync", () => note("the node briefly lost the cluster: some messages may be missing", "warn"));
    // After a reconnect, per stream: did the node replay everything we missed?
    hub.on("recovered", (e) => {
      if (e.stream === "room" && e.room !== room) return;
      const what = e.stream === "room" ? "#" + e.room : "private messages";
      if (e.recovered) note(`back on ${what}: nothing missed`);
      else note(`${what}: messages sent while reconnecting could not be recovered, some may be missing`, "warn");
    });
    hub.on("error", (m) => {
      const where = m.room || (m.data && m.data.room); // a refused server-side join names its room in data
      note("error: " + m.data.code + (where ? " (" + where + ")" : ""));
    });
    hub.on("room_message", (m) => {
      if (m.room !== room) return;
      show("room", m.user_id, m.data.message, m.timestamp);
      sawVia(m.user_id, m.data.message);
    });
    hub.on("private_message", (m) => {
      show("private", m.user_id, m.data.message, m.timestamp);
      sawVia(m.user_id, m.data.message);
    });
    hub.on("broadcast", (m) => show("broadcast", m.user_id, m.data, m.timestamp));
    enter(room);
  }

  function enter(newRoom) {
    if (hub.rooms.has(newRoom)) return;
    for (const old of hub.rooms) hub.leave(old).catch(() => {});
    if (newRoom !== room) {
      $("log").replaceChildren();
      members = { users: {}, anonymous: 0 };
    }
    room = newRoom;
    $("room-title").textContent = "#" + room;
    renderMembers();
    hub.join(room)
      .then(() => note("joined #" + room))
      .catch((err) => note(`could not join #${room}: ${err.code}`));
  }

  // -- sending ------------------------------------------------------------------
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("text");
    let text = input.value.trim();
    let to = $("to").value;
    const command = /^\/msg\s+(\S+)\s+([\s\S]+)$/.exec(text);
    if (command) [, to, text] = command;
    if (!text) return;
    input.value = "";
    const message = { text, node: hub.node };
    if (!to) {
      // Our own room messages come back from the hub like everyone's: no local echo.
      hub.sendToRoom(room, message).catch((err) => note("not sent: " + err.code));
      return;
    }
    hub.sendPrivate(to, message)
      .then(() => show("private", name, message, Date.now() / 1000, to))
      .catch((err) => note(`private message to ${to} not sent: ${err.code}`));
  });

  // docs/protocol.md: 1-128 characters, no whitespace, control characters or braces.
  const validName = (s) => /^[^\s{}\x00-\x1f\x7f]{1,128}$/.test(s);

  $("settings").addEventListener("submit", (e) => {
    e.preventDefault();
    const newName = $("name").value.trim() || name;
    const newRoom = $("room").value.trim() || room;
    if (!validName(newName) || !validName(newRoom)) {
      note("names and rooms: up to 128 characters, without spaces or { }");
      return;
    }
    if (newName !== name || stopped) {
      name = newName;
      room = newRoom;
      connect();
    } else {
      enter(newRoom);
    }
  });

  // -- the member list: presence from hub.js; the node of each from their messages ------
  // Presence says who is in the room, not through which node: the node shown
  // beside a member is the one their last message came through ({text, node}).
  function sawVia(user, message) {
    const node = message && typeof message === "object" ? message.node : null;
    if (!user || typeof node !== "string" || seenVia.get(user) === node) return;
    seenVia.set(user, node);
    renderMembers();
  }

  function renderMembers() {
    const users = Object.keys(members.users).sort();
    $("members").replaceChildren(...users.map((user) => {
      const li = document.createElement("li");
      li.dataset.user = user;
      const connections = members.users[user];
      const via = user === name && hub ? hub.node : seenVia.get(user);
      const meta = [connections > 1 ? connections + " connections" : "", via ? "node " + via : ""].filter(Boolean);
      li.append(text("span", user === name ? user + " (you)" : user), text("span", meta.join(" · "), "muted small"));
      if (user === name) {
        li.className = "me";
      } else {
        li.onclick = () => { $("to").value = user; $("text").focus(); };
        if (operator) li.append(kickButton(user));
      }
      return li;
    }));
    const anonymous = members.anonymous ? ` + ${members.anonymous} anonymous` : "";
    $("members-note").textContent = users.length + (users.length === 1 ? " user" : " users") + anonymous;
    // The "to" choices: the whole room, or one member privately.
    const select = $("to");
    const current = select.value;
    const others = users.filter((u) => u !== name);
    select.replaceChildren(option("", "#" + room), ...others.map((u) => option(u, "to " + u)));
    select.value = others.includes(current) ? current : "";
  }

  // -- kick: the operator's HTTP API (docs/protocol.md) -------------------------
  function apiHeaders() {
    const headers = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem("hubnode.apiKey"); // set by the dashboard, same origin
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  // Kick buttons only when this page may use the API: no --api-key on the node, or the dashboard's key.
  async function probeApi() {
    try {
      operator = (await fetch("/api/stats", { headers: apiHeaders() })).ok;
    } catch {
      operator = false; // the node that served this page is gone: no API
    }
    renderMembers();
  }

  function kickButton(user) {
    const button = text("button", "kick", "secondary small kick");
    button.type = "button";
    button.title = `disconnect every connection of ${user}, without reconnecting`;
    button.onclick = (e) => {
      e.stopPropagation(); // not a click on the member (which picks a private recipient)
      kick(user);
    };
    return button;
  }

  async function kick(user) {
    const body = JSON.stringify({ reason: "kicked by " + name, reconnect: false });
    try {
      const resp = await fetch(`/api/users/${encodeURIComponent(user)}/disconnect`,
        { method: "POST", headers: apiHeaders(), body });
      if (resp.status === 401 || resp.status === 403) {
        operator = false;
        renderMembers();
        note("kick refused: the API needs its key (enter it on the dashboard)", "warn");
        return;
      }
      const answer = await resp.json();
      if (!resp.ok) throw new Error(answer.error ? answer.error.code : "HTTP " + resp.status);
      note(`kicked ${user} (${answer.nodes} ${answer.nodes === 1 ? "node" : "nodes"} took it)`);
    } catch (err) {
      note(`could not kick ${user}: ${err.message}`, "warn");
    }
  }

  // -- rendering -------------------------------------------------------------------
  function show(kind, from, message, timestamp, to) {
    const body = message && typeof message === "object" && "text" in message ? message : { text: JSON.stringify(message) };
    const mine = from === name && kind !== "broadcast" && (kind === "room" || to);
    const div = document.createElement("div");
    div.className = `msg ${kind}` + (mine ? " mine" : "");
    div.dataset.kind = kind;
    div.dataset.from = from || "";
    if (kind === "private") div.append(text("span", to ? "to " + to : "private", "tag private"));
    if (kind === "broadcast") div.append(text("span", "everyone", "tag"));
    div.append(text("span", from || "anonymous", "who"), text("span", String(body.text), "text"));
    const when = new Date((timestamp || Date.now() / 1000) * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    div.append(text("span", (body.node ? "via node " + body.node + " · " : "") + when, "meta"));
    append(div);
  }

  function note(message, kind) {
    append(text("div", message, "msg system" + (kind ? " " + kind : "")));
  }

  function append(el) {
    const log = $("log");
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(el);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function setStatus(kind, label) {
    const el = $("status");
    el.className = "badge " + kind;
    el.textContent = label;
  }

  function text(tag, content, className) {
    const el = document.createElement(tag);
    el.textContent = content;
    if (className) el.className = className;
    return el;
  }

  function option(value, label) {
    const el = document.createElement("option");
    el.value = value;
    el.textContent = label;
    return el;
  }

  $("name").value = name;
  $("room").value = room;
  connect();
  probeApi();
})();
