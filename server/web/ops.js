// The ops dashboard: /ops#token=T (an ops token). Watches every room ("*") and draws the
// service's figures from the ops feed: `watching.live` (the rooms already live), room events,
// `room_opened`, and the once-a-second `stats` line (rates, connections, refusals by code).
// The chart is drawn by hand on a canvas. User text (titles, names) is set as text only.
"use strict";

const $ = (id) => document.getElementById(id);
const WINDOW_S = 300; // the chart's span: the last five minutes of stats lines
const LATEST = 30;

// room id -> {room, creator, title, viewers, coins, gifts, counted, recent}: `coins` is the
// room's coins this live session: the server's figure from `watching.live` (exact up to the
// room's seq `counted`) plus the gift events above that seq. A gift at or below it is already
// in the figure (the feed starts before the `watching` reply), so it is never added twice;
// `recent` keeps the last gifts' {seq, coins} to add back those above a snapshot that came
// after them (a reconnect's `watching`).
const rooms = new Map();
const RECENT = 200;
const points = []; // {ts, gifts, coins} from stats lines, oldest first
const refusalHistory = []; // {ts, refusals} for the last minute's change
let lastStats = null;

const client = new GiftstreamClient({
  onOpen: () => client.send({ type: "watch", rooms: ["*"] }),
  onFrame: handle,
  onState: showState,
});

function handle(frame) {
  switch (frame.type) {
    case "watching":
      for (const live of frame.live || []) snapshot(live);
      return drawRooms();
    case "room_opened":
      upsert(frame.room, { creator: frame.creator, title: frame.title });
      return drawRooms();
    case "viewers":
      upsert(frame.room, { viewers: frame.count });
      return drawRooms();
    case "gift":
      return gift(frame);
    case "room_ended":
      rooms.delete(frame.room);
      return drawRooms();
    case "stats":
      return stats(frame);
    case "error":
      if (frame.code === "forbidden") {
        $("signin").textContent = "This token is not an ops token: the dashboard needs role ops.";
        $("signin").hidden = false;
      }
      return undefined;
    default:
      return undefined;
  }
}

function upsert(id, fields) {
  const room = rooms.get(id) ||
    { room: id, creator: id, title: "", viewers: 0, coins: 0, gifts: 0, counted: 0, recent: [] };
  Object.assign(room, fields);
  rooms.set(id, room);
  return room;
}

// A `watching.live` entry: the server's coins this session, exact up to `seq`, plus the gifts
// already received above it.
function snapshot(live) {
  const room = upsert(live.room, {
    creator: live.creator, title: live.title, viewers: live.viewers,
  });
  if (typeof live.coins !== "number") return; // an older server: keep the coins seen
  const seq = live.seq || 0;
  room.counted = seq;
  room.coins = live.coins + room.recent.filter((g) => g.seq > seq).reduce((sum, g) => sum + g.coins, 0);
}

function gift(event) {
  const coins = event.gift.coins * event.count;
  const room = upsert(event.room, {});
  if (event.seq > room.counted) room.coins += coins; // at or below: in the server's figure
  room.recent.push({ seq: event.seq, coins });
  if (room.recent.length > RECENT) room.recent.shift();
  room.gifts += event.count;
  const item = el("li");
  item.append(
    el("span", "time", new Date(event.ts).toLocaleTimeString("en-GB")),
    el("span", "sender", event.sender.name),
    el("span", "", `→ ${event.room}`),
    el("span", "", `${event.gift.name} ×${event.count}`),
    el("span", "coins", formatCount(coins)),
  );
  const latest = $("latest");
  latest.prepend(item);
  while (latest.childElementCount > LATEST) latest.lastElementChild.remove();
  drawRooms();
}

function drawRooms() {
  const live = [...rooms.values()].sort((a, b) => b.viewers - a.viewers || a.room.localeCompare(b.room));
  fill($("live-rooms"), live.map((room) => {
    const row = el("tr");
    row.dataset.room = room.room;
    row.dataset.coins = String(room.coins);
    row.append(el("td", "", room.room), el("td", "", room.title),
      el("td", "n", formatCount(room.viewers)), el("td", "n", formatCount(room.coins)));
    return row;
  }), 4, "no live room");
  const top = [...rooms.values()].filter((r) => r.coins > 0)
    .sort((a, b) => b.coins - a.coins || a.room.localeCompare(b.room)).slice(0, 5);
  fill($("top-rooms"), top.map((room, i) => {
    const row = el("tr");
    row.append(el("td", "", i + 1), el("td", "", room.room), el("td", "n", formatCount(room.gifts)),
      el("td", "n", formatCount(room.coins)));
    return row;
  }), 4, "no gifts yet");
}

function fill(body, rows, columns, empty) {
  if (rows.length === 0) {
    const row = el("tr");
    const cell = el("td", "empty", empty);
    cell.colSpan = columns;
    row.append(cell);
    rows = [row];
  }
  body.replaceChildren(...rows);
}

function stats(line) {
  lastStats = line;
  $("rooms").textContent = formatCount(line.rooms);
  $("connections").textContent = formatCount(line.connections);
  $("gifts-rate").textContent = line.gifts_per_s.toFixed(1);
  $("coins-rate").textContent = formatCount(Math.round(line.coins_per_s));
  $("clock").textContent = `as of ${new Date(line.ts).toLocaleTimeString("en-GB")}`;
  points.push({ ts: line.ts, gifts: line.gifts_per_s, coins: line.coins_per_s });
  while (points.length && points[0].ts < line.ts - WINDOW_S * 1000) points.shift();
  drawChart();
  drawRefusals(line);
}

function drawRefusals(line) {
  const now = line.refusals || {};
  refusalHistory.push({ ts: line.ts, refusals: now });
  while (refusalHistory.length > 1 && refusalHistory[0].ts < line.ts - 60000) refusalHistory.shift();
  const before = refusalHistory[0].refusals;
  const codes = Object.keys(now).sort((a, b) => now[b] - now[a] || a.localeCompare(b));
  fill($("refusals"), codes.map((code) => {
    const row = el("tr");
    row.dataset.code = code;
    // a gateway that stopped takes its counts with it: never show a negative change
    const recent = Math.max(0, now[code] - (before[code] || 0));
    row.append(el("td", "", code), el("td", "n", formatCount(recent)), el("td", "n", formatCount(now[code])));
    return row;
  }), 3, "no refusals");
}

// Two lines on one canvas: gifts/s on the left scale, coins/s on the right.
function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const pad = { left: 40, right: 52, top: 8, bottom: 20 };
  const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
  const end = lastStats ? lastStats.ts : Date.now();
  const start = end - WINDOW_S * 1000;
  const maxGifts = niceMax(Math.max(1, ...points.map((p) => p.gifts)));
  const maxCoins = niceMax(Math.max(1, ...points.map((p) => p.coins)));
  const style = getComputedStyle(document.documentElement);
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = style.getPropertyValue("--line");
  ctx.fillStyle = style.getPropertyValue("--dim");
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.top + plotH - (plotH * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.left, y); ctx.lineTo(pad.left + plotW, y); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText(trim(maxGifts * i / 4), pad.left - 4, y + 4);
    ctx.textAlign = "left"; ctx.fillText(trim(maxCoins * i / 4), pad.left + plotW + 4, y + 4);
  }
  ctx.textAlign = "center";
  for (let m = 0; m <= 5; m++) {
    const x = pad.left + (plotW * m) / 5;
    ctx.fillText(m === 5 ? "now" : `-${5 - m}m`, x, height - 4);
  }
  const x = (ts) => pad.left + ((ts - start) / (end - start)) * plotW;
  line(ctx, points, x, (p) => pad.top + plotH - (p.gifts / maxGifts) * plotH, style.getPropertyValue("--accent"));
  line(ctx, points, x, (p) => pad.top + plotH - (p.coins / maxCoins) * plotH, style.getPropertyValue("--gold"));
  canvas.dataset.points = String(points.length);
  const last = points[points.length - 1];
  canvas.dataset.lastGifts = last ? String(last.gifts) : "0";
  canvas.dataset.maxGifts = String(Math.max(0, ...points.map((p) => p.gifts)));
}

function line(ctx, series, x, y, color) {
  if (series.length === 0) return;
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.beginPath();
  series.forEach((p, i) => (i === 0 ? ctx.moveTo(x(p.ts), y(p)) : ctx.lineTo(x(p.ts), y(p))));
  ctx.stroke();
}

function niceMax(value) {
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 5, 10]) if (value <= m * step) return m * step;
  return 10 * step;
}

function trim(value) {
  return value >= 1000 ? `${Math.round(value / 100) / 10}k` : String(Math.round(value * 10) / 10);
}

function showState(name, close) {
  const badge = $("state");
  badge.dataset.state = name;
  badge.textContent = { open: "live", connecting: "connecting", retrying: "reconnecting" }[name] || "signed out";
  if (name === "stopped") {
    const box = $("signin");
    box.textContent = "The ops token is missing, expired or not valid: open /ops#token=OPS_TOKEN.";
    box.hidden = false;
  }
}

function start() {
  const token = fragmentToken();
  drawRooms();
  drawChart();
  fill($("refusals"), [], 3, "no refusals");
  if (!token) {
    showState("stopped", null);
    return;
  }
  client.start(token);
  window.addEventListener("hashchange", () => {
    const fresh = fragmentToken();
    if (fresh && fresh !== client.token) client.start(fresh);
  });
  window.addEventListener("resize", drawChart);
}

start();
