// The viewer page: /?room=R#token=T. Joins R, plays each gift's animation, shows the combo,
// the viewer count, the top 3, the balance, and sends the catalog's gifts by their buttons.
// After a drop it reconnects and joins with `since`, and re-sends an unanswered gift with its
// key (the server answers a key once). Every name and title is set as text, never as markup.
"use strict";

// The catalog's animation ids, as this page plays them; an unknown id plays by price.
const ANIMATIONS = {
  "anim.rose.v1": { glyph: "🌹", motion: "float" },
  "anim.heart.v1": { glyph: "❤️", motion: "float" },
  "anim.finger_heart.v1": { glyph: "🫰", motion: "float" },
  "anim.ice_cream.v1": { glyph: "🍦", motion: "float" },
  "anim.doughnut.v1": { glyph: "🍩", motion: "float" },
  "anim.hat.v1": { glyph: "🎩", motion: "pop" },
  "anim.confetti.v1": { glyph: "🎉", motion: "burst" },
  "anim.sunglasses.v1": { glyph: "🕶️", motion: "pop" },
  "anim.corgi.v1": { glyph: "🐕", motion: "run" },
  "anim.sports_car.v1": { glyph: "🏎️", motion: "drive" },
  "anim.whale.v1": { glyph: "🐋", motion: "dive" },
  "anim.lion.v1": { glyph: "🦁", motion: "roar" },
  "anim.universe.v1": { glyph: "🌌", motion: "cosmos" },
};

// What a refused gift tells the viewer, by error code.
const REFUSALS = {
  insufficient_coins: "Not enough coins for that gift.",
  spending_limit: "That would pass your spending limit.",
  underage: "Sending gifts needs a verified adult account.",
  room_not_live: "This live has ended.",
  unknown_room: "This room does not exist.",
  not_joined: "Still joining the room; try again in a moment.",
  forbidden: "You cannot send gifts to your own room.",
  rate_limited: "Slow down a little, then try again.",
  overloaded: "The server is busy; your gift was not sent. Try again.",
  unknown_gift: "That gift is no longer available.",
  key_reused: "That gift was already sent.",
  internal: "Something went wrong; your gift is safe to send again.",
};

const params = new URLSearchParams(location.search);
const room = params.get("room") || "";
const $ = (id) => document.getElementById(id);

const state = {
  lastSeq: null, // the highest seq handled; null before the first join
  joinedOnce: false,
  catalog: null,
  pending: new Map(), // request id -> {gift, count, key}: gifts not yet answered
  leaderboardId: null,
  ended: false,
  gapRejoinAt: 0,
  combos: new Map(), // sender + gift -> {node, shown}
};

const client = new GiftstreamClient({ onOpen: welcomed, onFrame: handle, onState: showState });

function welcomed(welcome) {
  state.user = welcome.user;
  setBalance(welcome.coins);
  if (!state.catalog) client.send({ type: "catalog" });
  join();
  // gifts whose reply a drop lost: the same key again, so none is paid twice
  const unanswered = [...state.pending.values()];
  state.pending.clear();
  for (const gift of unanswered) sendGift(gift);
}

function join() {
  const request = { type: "join", room };
  if (state.lastSeq !== null) request.since = state.lastSeq;
  client.send(request);
  state.leaderboardId = client.send({ type: "leaderboard", board: "session", room });
}

function handle(frame) {
  switch (frame.type) {
    case "joined": return joined(frame);
    case "catalog": return showCatalog(frame.gifts);
    case "gift_ok": return giftOk(frame);
    case "balance": return setBalance(frame.coins);
    case "live": return join();
    case "leaderboard": return showTop(frame.entries.slice(0, 3));
    case "error": return refused(frame);
    case "gift": case "viewers": case "leaders": case "room_ended":
      return roomEvent(frame);
    default: return undefined; // newer types: ignored, as the protocol asks
  }
}

function joined(frame) {
  $("title").textContent = frame.title || "Live";
  $("creator").textContent = `@${frame.creator}`;
  $("viewers").textContent = formatCount(frame.viewers);
  if (state.lastSeq === null) {
    state.lastSeq = frame.seq;
  } else if (frame.recovered === false) {
    notice("You were away for a while: some gifts were missed.", "info");
    state.lastSeq = Math.min(state.lastSeq, frame.seq);
  }
  state.joinedOnce = true;
  setEnded(false);
}

function roomEvent(event) {
  if (event.room !== room) return;
  if (typeof event.seq === "number" && state.lastSeq !== null) {
    if (event.seq <= state.lastSeq) return; // seen before a drop: replayed by `since`
    if (event.seq > state.lastSeq + 1 && Date.now() >= state.gapRejoinAt) {
      state.gapRejoinAt = Date.now() + 10000; // `since` joins are budgeted: one per 10 s
      client.send({ type: "join", room, since: state.lastSeq });
    }
    state.lastSeq = event.seq;
  }
  if (event.type === "gift") showGift(event);
  else if (event.type === "viewers") $("viewers").textContent = formatCount(event.count);
  else if (event.type === "leaders") showTop(event.top);
  else if (event.type === "room_ended") setEnded(true);
}

// ---- the catalog and sending ------------------------------------------------------------

function showCatalog(gifts) {
  state.catalog = gifts;
  const tray = $("gifts");
  tray.replaceChildren();
  for (const gift of gifts) {
    const button = el("button", "gift-button");
    button.type = "button";
    button.dataset.gift = gift.id;
    button.append(el("span", "glyph", look(gift).glyph), el("span", "name", gift.name),
      el("span", "price", `${formatCount(gift.coins)} 🪙`));
    button.setAttribute("aria-label", `Send ${gift.name}, ${gift.coins} coins`);
    button.addEventListener("click", () => sendGift({
      gift: gift.id, count: Number($("count").value), key: newKey(),
    }));
    tray.append(button);
  }
  setEnded(state.ended);
}

function newKey() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "w" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sendGift(gift) {
  if (!client.isOpen) {
    notice("Reconnecting; try again in a moment.", "error");
    return;
  }
  const id = client.send({ type: "gift", room, ...gift });
  state.pending.set(id, gift);
}

function giftOk(reply) {
  state.pending.delete(reply.id);
  setBalance(reply.coins);
}

function refused(error) {
  if (error.id === state.leaderboardId) return; // a server without boards: no top 3 yet
  const gift = state.pending.get(error.id);
  state.pending.delete(error.id);
  if (gift === undefined) {
    if (error.code === "room_not_live" || error.code === "unknown_room") notLive();
    return;
  }
  notice(REFUSALS[error.code] || `The gift was refused (${error.code}).`, "error");
  if (error.code === "insufficient_coins") client.send({ type: "balance" });
}

// The room is not live (yet): its creator gets a button to go live from here; a viewer waits,
// and the page joins again every few seconds.
function notLive() {
  setEnded(true, state.joinedOnce ? "This live has ended." : "This room is not live yet.");
  clearTimeout(state.retryJoin);
  if (state.user === room) {
    $("go-live").hidden = false;
    return;
  }
  state.retryJoin = setTimeout(() => { if (client.isOpen) join(); }, 3000);
}

function goLive() {
  $("go-live").hidden = true;
  client.send({ type: "go_live", title: $("go-live-title").value });
}

function setBalance(coins) {
  $("balance").textContent = formatCount(coins);
}

// ---- what everyone sees -------------------------------------------------------------------

function look(gift) {
  const known = ANIMATIONS[gift.animation];
  if (known) return known;
  return { glyph: "🎁", motion: gift.coins >= 1000 ? "roar" : gift.coins >= 100 ? "pop" : "float" };
}

// Big gifts look big: the stage plays them full size, the small ones float up a lane.
function tier(gift) {
  return gift.coins >= 1000 ? "big" : gift.coins >= 100 ? "mid" : "small";
}

function showGift(event) {
  const { glyph, motion } = look(event.gift);
  const size = tier(event.gift);
  const stage = $("stage");
  const flying = el("div", `fly ${size} m-${motion}`);
  flying.append(el("span", "glyph", glyph));
  if (size !== "small") {
    const caption = el("div", "caption");
    caption.append(el("b", "", event.sender.name), document.createTextNode(" sent "),
      el("span", "", event.gift.name));
    flying.append(caption);
  } else {
    flying.style.left = `${10 + Math.random() * 70}%`;
  }
  flying.addEventListener("animationend", (end) => { if (end.target === flying) flying.remove(); });
  stage.append(flying);
  while (stage.childElementCount > 30) stage.firstElementChild.remove();
  showCombo(event, glyph);
}

// One card per sender and gift: the count and the combo counting up while the streak lasts.
function showCombo(event, glyph) {
  const key = `${event.sender.id}\u0000${event.gift.id}`;
  let combo = state.combos.get(key);
  const list = $("combos");
  if (!combo || !combo.node.isConnected) {
    const node = el("li", "combo");
    node.dataset.sender = event.sender.id;
    const who = el("div", "who");
    who.append(el("span", "sender", event.sender.name),
      el("span", "what", `sent ${event.gift.name}`));
    node.append(el("span", "glyph", glyph), who, el("span", "count"), el("span", "streak"));
    combo = { node, shown: 0, timer: null };
    state.combos.set(key, combo);
  }
  list.prepend(combo.node); // newest first
  combo.node.querySelector(".count").textContent = `×${event.count}`;
  combo.node.classList.remove("bump");
  void combo.node.offsetWidth; // restart the bump animation
  combo.node.classList.add("bump");
  countUp(combo, event.combo);
  clearTimeout(combo.expire);
  combo.expire = setTimeout(() => combo.node.classList.add("fading"), 5000);
  combo.node.classList.remove("fading");
  while (list.childElementCount > 4) {
    const last = list.lastElementChild;
    last.remove();
  }
}

function countUp(combo, target) {
  clearInterval(combo.timer);
  const streak = combo.node.querySelector(".streak");
  if (target <= 1) {
    combo.shown = 1;
    streak.textContent = "";
    return;
  }
  if (combo.shown >= target) combo.shown = Math.max(1, target - 1);
  const step = () => {
    combo.shown += 1;
    streak.textContent = `combo ${combo.shown}`;
    if (combo.shown >= target) clearInterval(combo.timer);
  };
  step();
  if (combo.shown < target) combo.timer = setInterval(step, 80);
}

function showTop(top) {
  const list = $("top");
  list.replaceChildren();
  top.slice(0, 3).forEach((entry, i) => {
    const item = el("li", `rank r${i + 1}`);
    item.append(el("span", "medal", ["🥇", "🥈", "🥉"][i]), el("span", "name", entry.name),
      el("span", "coins", formatCount(entry.coins)));
    list.append(item);
  });
}

function setEnded(ended, why) {
  state.ended = ended;
  for (const button of document.querySelectorAll(".gift-button")) button.disabled = ended;
  if (ended) notice(why || "This live has ended.", "info", true);
  else $("notice").hidden = true;
}

let noticeTimer = null;
function notice(text, kind, sticky) {
  const box = $("notice");
  box.textContent = text;
  box.className = `notice ${kind}`;
  box.hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => { box.hidden = true; }, 4000);
}

function showState(name, close) {
  const badge = $("state");
  badge.dataset.state = name;
  if (name === "open") {
    badge.textContent = "live";
  } else if (name === "connecting") {
    badge.textContent = "connecting";
  } else if (name === "retrying") {
    badge.textContent = "reconnecting";
  } else if (name === "stopped") {
    badge.textContent = "signed out";
    notice("Your session has expired or its token is not valid. Open the page with a new token.",
      "error", true);
    if (window.parent !== window) {
      window.parent.postMessage({ source: "giftstream", type: "token_expired", code: close.code }, "*");
    }
  }
}

// ---- start --------------------------------------------------------------------------------

function start() {
  const token = fragmentToken();
  if (!room || !token) {
    $("pick").hidden = false;
    $("pick-room").value = room;
    $("pick-form").addEventListener("submit", (submit) => {
      submit.preventDefault();
      const picked = $("pick-room").value.trim();
      const typed = $("pick-token").value.trim();
      const search = `?room=${encodeURIComponent(picked)}`;
      location.assign(`/${search}#token=${encodeURIComponent(typed)}`);
      if (location.search === search) location.reload(); // only the fragment changed
    });
    return;
  }
  $("live").hidden = false;
  $("go-live").addEventListener("submit", (submit) => { submit.preventDefault(); goLive(); });
  client.start(token);
  // A host app hands a fresh token by changing the fragment: reconnect with it, no reload.
  window.addEventListener("hashchange", () => {
    const fresh = fragmentToken();
    if (fresh && fresh !== client.token) client.start(fresh);
  });
}

start();
