// What @socket.io/redis-emitter would PUBLISH, without a Redis server.
//
// Reads a JSON array of [room|null, event, data] on argv[2], emits each with
// the real Emitter into a client that only records, and prints one JSON line
// per publish: {"channel": ..., "hex": <payload bytes in hex>}. The bench's
// Python publisher (bench/systems.py, socketio-node) builds the same bytes
// with msgpack and checks them against this once per run.
"use strict";

const { Emitter } = require("@socket.io/redis-emitter");

const recorded = [];
const client = {
  publish(channel, payload) {
    recorded.push({ channel, hex: Buffer.from(payload).toString("hex") });
    return Promise.resolve(1);
  },
};
const emitter = new Emitter(client);
for (const [room, event, data] of JSON.parse(process.argv[2])) {
  if (room === null) emitter.emit(event, data);
  else emitter.to(room).emit(event, data);
}
for (const r of recorded) process.stdout.write(JSON.stringify(r) + "\n");
