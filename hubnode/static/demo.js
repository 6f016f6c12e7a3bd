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
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const urls = (params.get("ws") || "/ws").split(",").map((s) => s.trim()).filter(Boolean);
  const MEMBERS_EVERY = 3000; // ms between member list refreshes

  let name = params.get("name") || "guest-" + Math.random().toString(36).slice(2, 6);
  let room = params.get("room") || "lobby";
  let hub = null;
  let members = []; // [{conn_id, user_id, node}] of the current room, from the HTTP API

  // -- the connection ---------------------------------------------------------
  function connect() {
    if (hub) hub.close(); // the user id is fixed per connection: a new name needs a new one
    hub = new HubClient(urls, { userId: name });
    hub.on("connected", (m) => {
      setStatus("ok", "node " + m.data.node);
      note(`connected to node ${m.data.node} as ${name}`);
      refreshMembers();
    });
    hub.on("disconnected", (e) => {
      setStatus("warn", "reconnecting…");
      const wait = e.delay == null ? "" : `, retrying in ${(e.delay / 1000).toFixed(1)} s`;
      note(`disconnected (code ${e.code}${e.reason ? ": " + e.reason : ""})${wait}`);
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
    hub.on("error", (m) => note("error: " + m.data.code + (m.room ? " (" + m.room + ")" : "")));
    hub.on("room_message", (m) => {
      if (m.room !== room) return;
      show("room", m.user_id, m.data.message, m.timestamp);
      if (!members.some((x) => x.user_id === m.user_id)) refreshMembers();
    });
    hub.on("private_message", (m) => show("private", m.user_id, m.data.message, m.timestamp));
    hub.on("broadcast", (m) => show("broadcast", m.user_id, m.data, m.timestamp));
    enter(room);
  }

  function enter(newRoom) {
    if (hub.rooms.has(newRoom)) return;
    for (const old of hub.rooms) hub.leave(old).catch(() => {});
    if (newRoom !== room) {
      $("log").replaceChildren();
      members = [];
    }
    room = newRoom;
    $("room-title").textContent = "#" + room;
    renderMembers();
    hub.join(room)
      .then(() => { note("joined #" + room); refreshMembers(); })
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

  // PROTOCOL.md section 3: 1-128 characters, no whitespace, control characters or braces.
  const validName = (s) => /^[^\s{}\x00-\x1f\x7f]{1,128}$/.test(s);

  $("settings").addEventListener("submit", (e) => {
    e.preventDefault();
    const newName = $("name").value.trim() || name;
    const newRoom = $("room").value.trim() || room;
    if (!validName(newName) || !validName(newRoom)) {
      note("names and rooms: up to 128 characters, without spaces or { }");
      return;
    }
    if (newName !== name) {
      name = newName;
      room = newRoom;
      connect();
    } else {
      enter(newRoom);
    }
  });

  // -- the member list, from GET /api/rooms/<room> ---------------------------------
  async function refreshMembers() {
    const asked = room;
    const headers = {};
    const key = sessionStorage.getItem("hubnode.apiKey"); // set by the dashboard, same origin
    if (key) headers.Authorization = "Bearer " + key;
    try {
      const resp = await fetch("/api/rooms/" + encodeURIComponent(asked), { headers });
      if (asked !== room) return;
      if (resp.status === 401) {
        $("members-note").textContent = "The API needs a key: enter it on the dashboard to see members.";
        return;
      }
      members = (await resp.json()).members || [];
      $("members-note").textContent = members.length + (members.length === 1 ? " connection" : " connections");
      renderMembers();
    } catch {
      // The list comes from the node that served this page: with several node
      // URLs (?ws=), that node may be gone while the chat goes on elsewhere.
      members = [];
      renderMembers();
      $("members-note").textContent = "member list unavailable: the node that served this page does not answer";
    }
  }

  function renderMembers() {
    const list = $("members");
    list.replaceChildren(...members.map((m) => {
      const li = document.createElement("li");
      const user = m.user_id || "anonymous";
      li.dataset.user = user;
      li.append(text("span", user === name ? user + " (you)" : user), text("span", "node " + m.node, "muted small"));
      if (user === name) li.className = "me";
      else if (m.user_id) li.onclick = () => { $("to").value = m.user_id; $("text").focus(); };
      return li;
    }));
    // The "to" choices: the whole room, or one member privately.
    const select = $("to");
    const current = select.value;
    const users = [...new Set(members.map((m) => m.user_id).filter((u) => u && u !== name))].sort();
    select.replaceChildren(option("", "#" + room), ...users.map((u) => option(u, "to " + u)));
    select.value = users.includes(current) ? current : "";
  }
  setInterval(() => { if (document.visibilityState === "visible" && hub) refreshMembers(); }, MEMBERS_EVERY);

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
})();
