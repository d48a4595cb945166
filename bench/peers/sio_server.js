// Peer 2: a Node.js socket.io server with giftstream's room and batching policy: a socket
// joins the room; gifts are collected for a 20 ms tick, then ONE `io.to(room).emit` per tick
// carries the array of the room's events (socket.io encodes a broadcast packet once).
"use strict";
const { createServer } = require("http");
const { Server } = require("socket.io");
const { giftEvent, port, TICK_MS } = require("./common");

const httpServer = createServer();
const io = new Server(httpServer, { transports: ["websocket"], perMessageDeflate: false });
const rooms = new Map(); // room id -> { seq, outbox: [] }

io.on("connection", (socket) => {
  socket.on("join", (msg) => {
    let r = rooms.get(msg.room);
    if (!r) rooms.set(msg.room, (r = { seq: 0, outbox: [] }));
    socket.data.user = msg.user || "anon";
    socket.join(msg.room);
    socket.emit("joined", { room: msg.room, seq: r.seq });
  });
  socket.on("gift", (msg) => {
    const r = rooms.get(msg.room);
    if (!r || !socket.rooms.has(msg.room)) return;
    r.seq += 1;
    const event = giftEvent(msg.room, r.seq, socket.data.user, msg);
    r.outbox.push(event);
    socket.emit("gift_ok", { key: msg.key, event: event.event });
  });
});

// The same batching policy as giftstream (and the python-socketio peer): the next tick
// is TICK_MS after this flush ends, so a long flush makes fewer, bigger frames.
function tick() {
  for (const [id, r] of rooms) {
    if (r.outbox.length === 0) continue;
    io.to(id).emit("gifts", r.outbox);
    r.outbox = [];
  }
  setTimeout(tick, TICK_MS);
}
setTimeout(tick, TICK_MS);

httpServer.listen(port(), "127.0.0.1", () =>
  console.log(`socket.io peer listening on ${httpServer.address().port}`));
process.on("SIGTERM", () => process.exit(0));
