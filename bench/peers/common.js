// What the three peers share: the gift catalog entry and the gift event, shaped like
// giftstream's own `gift` event (docs/protocol.md) plus the sender's due time `sent`.
"use strict";

const GIFTS = {
  rose: { id: "rose", name: "Rose", coins: 1, animation: "anim.rose.v1" },
  heart: { id: "heart", name: "Heart", coins: 5, animation: "anim.heart.v1" },
};
let nextEvent = 0;

function giftEvent(room, seq, senderId, msg) {
  const gift = GIFTS[msg.gift] || GIFTS.rose;
  nextEvent += 1;
  return {
    type: "gift", room, seq, event: `e${process.pid}-${nextEvent}`,
    sender: { id: senderId, name: senderId }, gift, count: msg.count | 0 || 1, combo: 1,
    ts: Date.now(), sent: msg.sent,
  };
}

function port() {
  const i = process.argv.indexOf("--port");
  return Number(i > 0 ? process.argv[i + 1] : 9000);
}

module.exports = { giftEvent, port, TICK_MS: 20 };
