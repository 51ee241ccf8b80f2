// A small WebSocket client for dropserver: JSON subprotocol, join with resume from
// the last (epoch, offset) seen, jittered reconnect, requests with replies, answers
// to server pings, and a connection state the page shows.
//
// Wire format: docs/protocol.md. Everything that knows the frame layout lives in
// frames.js; this file moves frames and keeps time.

import { backoffDelay, decodeFrame, encodeCommand, encodeJoin, JSON_SUBPROTOCOL, PONG } from
  "./frames.js";

export const ConnState = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  OFFLINE: "offline",
  CLOSED: "closed",
});

// Join errors that retrying cannot fix: stop and show them.
const FATAL_JOIN = new Set(["token_invalid", "token_expired", "drop_not_found", "forbidden",
  "banned"]);

export class CommandError extends Error {
  constructor(code, message, details) {
    super(message || code);
    this.code = code;
    this.details = details;
  }
}

/**
 * Events dispatched (CustomEvent, `detail` shown):
 *  - "state"      {state, attempt, retryInMs?, recovered?, code?, reason?}
 *  - "joined"     {data, recovered}   joined (first time, or again after a reconnect)
 *  - "event"      {event, data, pos, durable}   a drop or private event
 *  - "join-error" {code, message}
 */
export class DropClient extends EventTarget {
  constructor({ url, dropId, token = null, minDelayMs = 500, maxDelayMs = 5000,
    commandTimeoutMs = 10000, WebSocketImpl = globalThis.WebSocket } = {}) {
    super();
    this.url = url;
    this.dropId = dropId;
    this.token = token;
    this.minDelayMs = minDelayMs;
    this.maxDelayMs = maxDelayMs;
    this.commandTimeoutMs = commandTimeoutMs;
    this.WebSocketImpl = WebSocketImpl;
    this.state = ConnState.CLOSED;
    this.position = null; // {epoch, offset} of the last durable event
    this.attempt = 0;
    this.joins = 0;
    this.ws = null;
    this.nextId = 1;
    this.joinId = null;
    this.pending = new Map(); // id -> {resolve, reject, timer}
    this.stopped = true;
    this.retryTimer = null;
    this.serverDelayMs = null; // "come back in" from a draining server (going_away)
    this._onOnline = () => { if (this.state === ConnState.OFFLINE) this._connectNow(); };
    this._onOffline = () => { if (this.ws) this.ws.close(); };
  }

  start() {
    this.stopped = false;
    globalThis.addEventListener?.("online", this._onOnline);
    globalThis.addEventListener?.("offline", this._onOffline);
    this._connectNow();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    globalThis.removeEventListener?.("online", this._onOnline);
    globalThis.removeEventListener?.("offline", this._onOffline);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "bye");
    this._failPending("disconnected", "stopped");
    this._setState(ConnState.CLOSED);
  }

  /** Drop the socket as if the network failed (tests, "reconnect now" buttons). */
  dropConnection() {
    if (this.ws) this.ws.close(4999, "client reconnect");
  }

  /** Send a request (`buy`, `chat.send`, ...); resolves with the reply's data or
   * rejects with CommandError(code, message). */
  command(type, data = {}) {
    if (!this.ws || this.state !== ConnState.OPEN) {
      return Promise.reject(new CommandError("not_connected", "not connected yet, retrying"));
    }
    const id = String(this.nextId++);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new CommandError("timeout", `no answer to ${type}`));
      }, this.commandTimeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(encodeCommand(id, type, data));
    });
  }

  _setState(state, extra = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, attempt: this.attempt,
      ...extra } }));
  }

  _wsUrl() {
    const u = new URL(this.url, globalThis.location?.href);
    if (u.protocol === "http:") u.protocol = "ws:";
    if (u.protocol === "https:") u.protocol = "wss:";
    return u.toString();
  }

  _failPending(code, message) {
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new CommandError(code, message));
    }
    this.pending.clear();
  }

  _connectNow() {
    clearTimeout(this.retryTimer);
    if (this.stopped) return;
    if (globalThis.navigator && globalThis.navigator.onLine === false) {
      this._setState(ConnState.OFFLINE);
      return;
    }
    this._setState(this.joins === 0 && this.attempt === 0 ? ConnState.CONNECTING
      : ConnState.RECONNECTING);
    let ws;
    try {
      ws = new this.WebSocketImpl(this._wsUrl(), [JSON_SUBPROTOCOL]);
    } catch {
      this._scheduleRetry();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.joinId = String(this.nextId++);
      ws.send(encodeJoin(this.joinId, this.dropId, this.token, this.position));
    };
    ws.onmessage = (msg) => {
      if (this.ws !== ws || typeof msg.data !== "string") return; // JSON: text frames
      for (const frame of decodeFrame(msg.data)) this._handle(frame);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this._failPending("disconnected", "connection lost");
      if (this.stopped || this.state === ConnState.CLOSED) return;
      this._scheduleRetry();
    };
    ws.onerror = () => {}; // onclose follows
  }

  _scheduleRetry() {
    this.attempt += 1;
    let delay = backoffDelay(this.attempt, this.minDelayMs, this.maxDelayMs);
    if (this.serverDelayMs !== null) {
      delay = this.serverDelayMs;
      this.serverDelayMs = null;
    }
    this._setState(ConnState.RECONNECTING, { retryInMs: delay });
    this.retryTimer = setTimeout(() => this._connectNow(), delay);
  }

  _handle(frame) {
    switch (frame.kind) {
      case "joined": {
        const resumed = this.position !== null;
        const recovered = resumed ? Boolean(frame.data.recovered) : null;
        if (frame.data.pos) this.position = frame.data.pos;
        this.attempt = 0;
        this.joins += 1;
        this._setState(ConnState.OPEN, { recovered });
        this.dispatchEvent(new CustomEvent("joined", { detail: { data: frame.data,
          recovered } }));
        // events missed while away, in order (when the server could recover them)
        for (const ev of frame.data.events || []) {
          const decoded = ev.t ? decodeFrame(JSON.stringify(ev))[0] : { kind: "event",
            event: ev.event, data: ev.data || {}, pos: ev.pos ?? null, durable: true };
          if (decoded) this._handle(decoded);
        }
        return;
      }
      case "reply": {
        const p = this.pending.get(frame.id);
        if (p) {
          this.pending.delete(frame.id);
          clearTimeout(p.timer);
          p.resolve(frame.data);
        }
        return;
      }
      case "error": {
        const p = frame.id === null ? null : this.pending.get(frame.id);
        if (p) {
          this.pending.delete(frame.id);
          clearTimeout(p.timer);
          p.reject(new CommandError(frame.code, frame.message, frame.details));
        } else if (frame.id !== null && frame.id === this.joinId) {
          this.dispatchEvent(new CustomEvent("join-error", { detail: frame }));
          if (FATAL_JOIN.has(frame.code)) {
            this._setState(ConnState.CLOSED, { code: frame.code, reason: frame.message });
          }
          this.ws?.close(1000, "join failed");
        }
        return;
      }
      case "event":
        if (frame.pos) this.position = frame.pos;
        this.dispatchEvent(new CustomEvent("event", { detail: frame }));
        return;
      case "skipped":
        // Chat left out of a big room's stream (it is in history): not a gap.
        if (frame.pos) this.position = frame.pos;
        return;
      case "going_away":
        // A draining server says when to come back (already jittered on its side).
        this.serverDelayMs = frame.delayMs ?? null;
        return;
      case "ping":
        if (this.ws) this.ws.send(PONG);
        return;
      default:
        return;
    }
  }
}
