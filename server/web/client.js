// giftstream's WebSocket client for the pages: hello with the token from the URL fragment
// (never sent in a URL), request ids, and reconnecting with backoff after a drop. It speaks
// the protocol of docs/protocol.md and nothing else. No dependencies, no build step.
"use strict";

// The token in the fragment (#token=T): the browser never sends a fragment to a server.
function fragmentToken() {
  return new URLSearchParams(location.hash.slice(1)).get("token") || "";
}

// Close codes after which reconnecting with the same token cannot help.
const FINAL_CLOSES = new Set([4401]);

class GiftstreamClient {
  // onOpen(welcome) after each welcome; onFrame(frame) for every other frame;
  // onState(state, detail) for "connecting", "open", "retrying", "stopped".
  constructor({ onOpen, onFrame, onState }) {
    this.onOpen = onOpen;
    this.onFrame = onFrame;
    this.onState = onState;
    this.ws = null;
    this.nextId = 1;
    this.failures = 0;
    this.timer = null;
    this.token = "";
  }

  start(token) {
    this.token = token;
    this.failures = 0;
    this.connect();
  }

  connect() {
    clearTimeout(this.timer);
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close();
    }
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws`);
    this.ws = ws;
    this.onState("connecting");
    ws.onopen = () => ws.send(JSON.stringify({ type: "hello", token: this.token }));
    ws.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (error) {
        return; // the server sends JSON only; nothing else is ours to read
      }
      if (frame.type === "welcome") {
        this.failures = 0;
        this.onState("open");
        this.onOpen(frame);
      } else if (frame.type === "batch") {
        for (const event of frame.events) this.onFrame(event);
      } else {
        this.onFrame(frame);
      }
    };
    ws.onclose = (close) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (FINAL_CLOSES.has(close.code)) {
        this.onState("stopped", close);
        return;
      }
      // 1001 (restart), 4008 (slow), a dropped network: back off with jitter, then rejoin
      // with `since`; 4429 (flooding) waits longer.
      this.failures += 1;
      const base = close.code === 4429 ? 10000 : Math.min(8000, 500 * 2 ** (this.failures - 1));
      const delay = base / 2 + Math.random() * base / 2;
      this.onState("retrying", close);
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  // Send a request; returns its id (replies echo it).
  send(request) {
    const id = this.nextId++;
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ ...request, id }));
    }
    return id;
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }
}

// An element with its text set through textContent: user text never becomes markup.
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function formatCount(n) {
  return Number(n).toLocaleString("en-US");
}
