// Peer 1: a Node.js `ws` server with giftstream's room and batching policy. Viewers join one
// room; gifts are collected for a 20 ms tick, then the room's events go out as ONE message
// (a JSON array, encoded once into one Buffer) written to every member.
"use strict";
const { WebSocketServer } = require("ws");
const { giftEvent, port, TICK_MS } = require("./common");

const rooms = new Map(); // room id -> { members: Set<ws>, seq, outbox: [] }
const wss = new WebSocketServer({ host: "127.0.0.1", port: port(), perMessageDeflate: false });

function room(id) {
  let r = rooms.get(id);
  if (!r) rooms.set(id, (r = { members: new Set(), seq: 0, outbox: [] }));
  return r;
}

wss.on("connection", (ws) => {
  ws.user = null;
  ws.rooms = new Set();
  ws.on("message", (data) => {
    let msg;
    try { msg = JSON.parse(data); } catch { return; }
    if (msg.type === "join") {
      const r = room(msg.room);
      r.members.add(ws);
      ws.rooms.add(msg.room);
      ws.user = msg.user || "anon";
      ws.send(JSON.stringify({ type: "joined", room: msg.room, seq: r.seq }));
    } else if (msg.type === "gift") {
      const r = rooms.get(msg.room);
      if (!r || !ws.rooms.has(msg.room)) return;
      r.seq += 1;
      const event = giftEvent(msg.room, r.seq, ws.user, msg);
      r.outbox.push(event);
      ws.send(JSON.stringify({ type: "gift_ok", key: msg.key, event: event.event }));
    }
  });
  ws.on("close", () => { for (const id of ws.rooms) rooms.get(id)?.members.delete(ws); });
  ws.on("error", () => {});
});

// The same batching policy as giftstream (and the python-socketio peer): the next tick
// is TICK_MS after this flush ends, so a long flush makes fewer, bigger frames.
function tick() {
  for (const r of rooms.values()) {
    if (r.outbox.length === 0) continue;
    const frame = Buffer.from(JSON.stringify(r.outbox)); // encoded once for the whole room
    r.outbox = [];
    for (const ws of r.members) {
      if (ws.readyState === 1) ws.send(frame, { binary: false });
    }
  }
  setTimeout(tick, TICK_MS);
}
setTimeout(tick, TICK_MS);

wss.on("listening", () => console.log(`ws peer listening on ${wss.address().port}`));
process.on("SIGTERM", () => process.exit(0));
