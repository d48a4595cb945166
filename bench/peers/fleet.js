// The client fleet of the fan-out benchmark: one process of viewers or of senders, driven by
// bench/fanout.py over stdin/stdout (one JSON object per line). The same code reads frames
// from giftstream and from every peer, so its cost per received frame is the same for all:
//   - one raw `ws` client per connection (no compression); socket.io servers are spoken to
//     in their wire protocol (Engine.IO 4 over a WebSocket: "40" connect, "42[...]" events,
//     "2"/"3" ping/pong) so no per-viewer JSON.parse is done by a client library;
//   - a room frame is the same bytes for every viewer, so each process parses a frame once
//     (keyed by the first `"seq":` in it) and each viewer only appends its receipt time.
// Times are performance.timeOrigin + performance.now(): wall-clock ms, shared by processes.
"use strict";
const WebSocket = require("ws");
const readline = require("readline");

const cfg = JSON.parse(require("fs").readFileSync(process.argv[2], "utf8"));
const now = () => performance.timeOrigin + performance.now();
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const MODE = cfg.mode; // "gs" (giftstream protocol), "ws" (raw JSON peer), "sio" (socket.io)
const SEQ = Buffer.from('"seq":');
const SIO_EVENT = Buffer.from('42["');

// ---- connections ----------------------------------------------------------------------
function urlFor() {
  return MODE === "sio" ? `${cfg.url}/socket.io/?EIO=4&transport=websocket` : cfg.url;
}

function sendMsg(ws, event, obj) {
  // one protocol message: a JSON object (gs, ws) or a socket.io event packet
  if (MODE === "sio") ws.send(`42${JSON.stringify([event, obj])}`);
  else ws.send(JSON.stringify(obj));
}

function connect(i, onFrame) {
  // resolves when joined; onFrame(buf, ws) gets every later message
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(urlFor(), { perMessageDeflate: false });
    const user = `${cfg.prefix}${i}`;
    let joined = false;
    const timer = setTimeout(() => { ws.terminate(); reject(new Error("connect timeout")); }, 30000);
    const join = () => sendMsg(ws, "join", { type: "join", room: cfg.room, user });
    ws.on("open", () => {
      if (MODE === "gs") ws.send(JSON.stringify({ type: "hello", token: cfg.tokens[i] }));
      else if (MODE === "ws") join();
    });
    ws.on("message", (buf) => {
      if (MODE === "sio" && buf.length === 1 && buf[0] === 0x32) { ws.send("3"); return; } // ping
      if (joined) { onFrame(buf, ws); return; }
      const text = buf.toString();
      if (MODE === "sio") {
        if (text.startsWith("0{")) { ws.send("40"); return; }
        if (text.startsWith("40")) { join(); return; }
      }
      if (MODE === "gs" && text.includes('"type":"welcome"')) { join(); return; }
      if (text.includes("joined")) {
        joined = true; clearTimeout(timer); resolve(ws); return;
      }
      if (text.includes('"type":"error"')) { clearTimeout(timer); ws.terminate(); reject(new Error(text)); }
    });
    ws.on("error", (e) => { clearTimeout(timer); if (!joined) reject(e); });
    ws.on("close", (code) => { closes[code] = (closes[code] || 0) + 1; if (!joined) { clearTimeout(timer); reject(new Error(`closed ${code}`)); } });
  });
}

const closes = {};
async function connectAll(n, onFrame) {
  const t0 = now();
  const conns = [];
  let failed = 0;
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const i = cfg.first + next++;
      try { conns.push(await connect(i, onFrame)); } catch (e) { failed += 1; lastError = String(e.message || e); }
    }
  };
  let lastError = null;
  await Promise.all(Array.from({ length: Math.min(cfg.concurrency || 100, n) }, worker));
  out({ ready: conns.length, failed, error: lastError, connect_s: (now() - t0) / 1000 });
  return conns;
}

// ---- viewers --------------------------------------------------------------------------
// (first seq, length) -> { n, keys: [event ids or sent times], times: [] }. The length too:
// viewers of one process on different gateways (or workers) get the same events batched
// differently per tick, and a frame is parsed once per process, not once per receipt.
const frames = new Map();
const FRAME_KEY = 2 ** 24; // frame lengths stay under 16 MiB; seq * 2^24 stays exact below 2^53

function firstSeq(buf) {
  const at = buf.indexOf(SEQ);
  if (at < 0) return -1;
  let v = 0;
  for (let j = at + 6; j < buf.length; j++) {
    const c = buf[j];
    if (c < 48 || c > 57) break;
    v = v * 10 + (c - 48);
  }
  return v;
}

function digest(buf) {
  // parse one room frame (once per process): its gift events' keys
  let events;
  if (MODE === "sio") {
    const packet = JSON.parse(buf.toString("utf8", 2)); // 42["gifts",[...]]
    events = packet[0] === "gifts" ? packet[1] : [];
  } else {
    const msg = JSON.parse(buf);
    events = Array.isArray(msg) ? msg : msg.type === "batch" ? msg.events : [msg];
  }
  const keys = [];
  for (const e of events) if (e.type === "gift") keys.push(MODE === "gs" ? e.event : e.sent);
  return { n: keys.length, keys, times: [] };
}

function onViewerFrame(buf) {
  const t = now();
  if (MODE === "sio" ? buf.indexOf(SIO_EVENT) !== 0 : buf[0] === 0x7b && buf[9] !== 0x67 && buf[9] !== 0x62) {
    return; // not a room event frame: a socket.io ack/other packet; a gs reply or `viewers`
  }
  const seq = firstSeq(buf);
  if (seq < 0) return;
  const key = seq * FRAME_KEY + buf.length;
  let f = frames.get(key);
  if (f === undefined) { f = digest(buf); frames.set(key, f); }
  f.times.push(t);
  received += 1;
}
let received = 0;

// latency histogram: 0.1 ms buckets up to 10 s, then one overflow bucket
const BUCKET_MS = 0.1;
const MAX_BUCKET = 100000;

function stats(cmd) {
  const sends = cmd.sends || {};
  const hist = new Map();
  let deliveries = 0, unmatched = 0, maxMs = 0, framesIn = 0;
  const { t0, t1 } = cmd;
  for (const [key, f] of frames) {
    let last = 0;
    for (const t of f.times) {
      if (t > last) last = t;
      if (t < t0 || t >= t1) continue;
      framesIn += 1;
      deliveries += f.n;
      for (const k of f.keys) {
        const sent = MODE === "gs" ? sends[k] : k;
        if (sent === undefined) { unmatched += 1; continue; }
        const ms = t - sent;
        if (ms > maxMs) maxMs = ms;
        const b = Math.min(MAX_BUCKET, Math.max(0, Math.floor(ms / BUCKET_MS)));
        hist.set(b, (hist.get(b) || 0) + 1);
      }
    }
    if (last < t1) frames.delete(key); // no more receipts expected for it in later windows
  }
  const cpu = process.cpuUsage();
  out({ deliveries, frames: framesIn, unmatched, max_ms: maxMs, hist: Object.fromEntries(hist), received,
        cpu_s: (cpu.user + cpu.system) / 1e6, closes });
}

// ---- senders --------------------------------------------------------------------------
let conns = [];
let schedule = null; // { rate, start, until, k }
let sentCount = 0, acked = 0;
const errors = {};
const dueByKey = new Map();
let sends = {}; // event id -> due time (gs), since the last "sends" command

function onSenderFrame(buf) {
  if (MODE === "sio") {
    if (buf.indexOf('42["gift_ok"') !== 0) return;
    acked += 1;
    return;
  }
  const text = buf.toString();
  if (text.startsWith('{"type":"gift_ok"') || (MODE === "gs" && text.includes('"gift_ok"'))) {
    const msgs = text.startsWith('{"type":"batch"') ? JSON.parse(text).events : [JSON.parse(text)];
    for (const m of msgs) {
      if (m.type !== "gift_ok") continue;
      acked += 1;
      const due = dueByKey.get(m.key);
      if (due !== undefined) { sends[m.event] = due; dueByKey.delete(m.key); }
    }
  } else if (text.includes('"type":"error"')) {
    const m = JSON.parse(text);
    errors[m.code] = (errors[m.code] || 0) + 1;
  }
}

let giftN = 0;
function sendDue() {
  if (!schedule) return;
  const t = now();
  const end = Math.min(t, schedule.until);
  // open loop: gift k is due at start + k / rate, whatever the answers do
  while (schedule.start + schedule.k / schedule.rate <= end) {
    const due = schedule.start + schedule.k / schedule.rate;
    schedule.k += 1;
    const i = giftN++ % conns.length;
    const key = `bench-${cfg.run}-${i}-${giftN}`; // 8-64 of [A-Za-z0-9_-]
    const msg = { type: "gift", room: cfg.room, gift: "rose", count: 1, key };
    if (MODE === "gs") dueByKey.set(key, due);
    else msg.sent = due;
    sendMsg(conns[i], "gift", msg);
    sentCount += 1;
  }
  if (t >= schedule.until) schedule = null;
}

// ---- main -----------------------------------------------------------------------------
async function main() {
  if (cfg.role === "viewer") conns = await connectAll(cfg.count, onViewerFrame);
  else {
    conns = await connectAll(cfg.count, onSenderFrame);
    setInterval(sendDue, 1);
  }
  const rl = readline.createInterface({ input: process.stdin });
  rl.on("line", (line) => {
    const cmd = JSON.parse(line);
    if (cmd.cmd === "stats") stats(cmd);
    else if (cmd.cmd === "rate") {
      // gifts/s per ms; start continues the count so the schedule has no burst
      schedule = { rate: cmd.rate / 1000, start: cmd.start, until: cmd.until, k: 0 };
      out({ ok: true });
    } else if (cmd.cmd === "sends") {
      out({ sends, sent: sentCount, acked, errors, closes, cpu_s: cpuS() });
      sends = {};
    } else if (cmd.cmd === "exit") {
      for (const ws of conns) ws.terminate();
      process.exit(0);
    }
  });
  rl.on("close", () => process.exit(0));
}
const cpuS = () => { const c = process.cpuUsage(); return (c.user + c.system) / 1e6; };

setTimeout(() => process.exit(3), (cfg.max_s || 900) * 1000).unref(); // bounded in time
main().catch((e) => { out({ fatal: String(e) }); process.exit(2); });
