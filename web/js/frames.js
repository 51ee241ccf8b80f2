// The JSON form of dropserver's wire protocol (docs/protocol.md, realtime/protocol.py),
// as pure functions: build client frames, decode a server text frame into
// {kind, ...}. No I/O here.
//
// Every frame is a map with a type `t`; request fields sit beside it (not nested).

export const JSON_SUBPROTOCOL = "dropserver.json.v1";

/** {t: "join", id, drop_id, token?, since?: {epoch, offset}} */
export function encodeJoin(id, dropId, token, position) {
  const frame = { t: "join", id: String(id), drop_id: Number(dropId) };
  if (token) frame.token = token;
  if (position) frame.since = { epoch: position.epoch, offset: position.offset };
  return JSON.stringify(frame);
}

/** A request: `chat.send`, or a command another package registered (`buy`, ...). */
export function encodeCommand(id, type, data = {}) {
  const frame = { ...data, t: type, id: String(id) };
  return JSON.stringify(frame);
}

export const PONG = JSON.stringify({ t: "pong" });

/**
 * One text frame -> a list of decoded frames:
 *  {kind: "joined", id, data}                   answer to join (snapshot or recovery)
 *  {kind: "event", event, data, pos, durable}   drop event ("event": durable, with pos;
 *                                                "volatile"/"private": no pos)
 *  {kind: "reply", id, data} / {kind: "error", id, code, message, details}
 *  {kind: "ping"} / {kind: "going_away", delayMs, reason}
 *  {kind: "skipped", count, pos}               chat left out of a big room's stream
 */
export function decodeFrame(text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch {
    return [];
  }
  const list = Array.isArray(msg) ? msg : [msg];
  return list.map(decodeOne).filter(Boolean);
}

function decodeOne(msg) {
  if (!msg || typeof msg !== "object" || typeof msg.t !== "string") return null;
  const id = msg.id === undefined || msg.id === null ? null : String(msg.id);
  switch (msg.t) {
    case "joined": {
      const { t: _t, id: _id, ...data } = msg;
      return { kind: "joined", id, data };
    }
    case "event":
      return { kind: "event", event: msg.event, data: msg.data || {}, pos: msg.pos ?? null,
        durable: true };
    case "volatile":
    case "private":
      return { kind: "event", event: msg.event, data: msg.data || {}, pos: null,
        durable: false };
    case "reply":
      return { kind: "reply", id, data: msg.data || {} };
    case "error":
      return { kind: "error", id, code: msg.code, message: msg.message,
        details: msg.details };
    case "ping":
      return { kind: "ping" };
    case "skipped":
      return { kind: "skipped", count: msg.count ?? 0, pos: msg.pos ?? null };
    case "going_away":
      return { kind: "going_away", delayMs: msg.reconnect_after_ms ?? null,
        reason: msg.reason ?? "" };
    default:
      return null;
  }
}

/** Jittered exponential backoff: uniform in [min, min + min(max - min, min * 2^(attempt-1))]
 * (500-1000 ms, 500-1500, 500-2500, 500-4500, then 500-5000 by default). The first retry
 * is spread too: the viewers of a crashed node must not all come back at the same
 * instant. */
export function backoffDelay(attempt, minMs = 500, maxMs = 5000, random = Math.random) {
  const spread = Math.min(Math.max(0, maxMs - minMs), minMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(minMs + random() * spread);
}
