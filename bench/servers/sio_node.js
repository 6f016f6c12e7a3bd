// The Node.js Socket.IO peer: a socket.io v4 server with the Redis adapter.
//
// The idiomatic Socket.IO set-up for several Node.js nodes: one process per
// node, every node on the same redis-server through @socket.io/redis-adapter
// (a publish client and a subscribe client from the `redis` npm package; the
// adapter PSUBSCRIBEs to `socket.io#/#*`). It behaves like
// bench/servers/sio_server.py: a client joins a room with the `join` event
// (acked with "ok"); on connect it enters the room `user:<id>` for its
// `?user_id=`. Engine.IO pings are set far apart, as hubnode runs with
// `--ping-interval 0`; no per-message compression (the server's default), or with
// `--deflate THRESHOLD` permessage-deflate on (`perMessageDeflate: { threshold }`:
// frames of at least THRESHOLD bytes compressed, per socket, for clients that offer it).
//
// External publishers (a Node.js worker with @socket.io/redis-emitter, or the
// bench's Python publisher writing the same msgpack bytes) PUBLISH on
// `socket.io#/#` or `socket.io#/#<room>#`.
//
//   node bench/servers/sio_node.js --port P --redis-url redis://127.0.0.1:6379/0 [--deflate 1024]
"use strict";

const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

function option(name) {
  const k = process.argv.indexOf(name);
  if (k < 0 || k + 1 >= process.argv.length) {
    console.error(`usage: sio_node.js --port P --redis-url URL (missing ${name})`);
    process.exit(2);
  }
  return process.argv[k + 1];
}

async function main() {
  const port = Number(option("--port"));
  const redisUrl = option("--redis-url");
  const deflate = process.argv.includes("--deflate") ? { threshold: Number(option("--deflate")) } : false;
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  for (const c of [pubClient, subClient]) c.on("error", (err) => console.error("redis:", err.message));
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(pubClient, subClient),
    pingInterval: 3600 * 1000,
    pingTimeout: 3600 * 1000,
    cors: { origin: "*" },
    serveClient: false,
    perMessageDeflate: deflate,
  });

  io.on("connection", (socket) => {
    const user = socket.handshake.query.user_id;
    if (typeof user === "string" && user) socket.join(`user:${user}`);
    socket.on("join", (room, ack) => {
      socket.join(room);
      if (typeof ack === "function") ack("ok");
    });
  });

  httpServer.listen(port, "127.0.0.1", () => console.error(`sio_node listening on 127.0.0.1:${port}`));

  const stop = () => {
    io.close(() => {
      Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
    });
    setTimeout(() => process.exit(0), 5000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
