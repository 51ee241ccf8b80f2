// DropClient against a fake WebSocket: join, resume with `since`, reconnect,
// ping/pong, going_away, requests and their failures.
import assert from "node:assert/strict";
import { test } from "node:test";

import { DropClient } from "../js/client.js";

const sockets = [];
class FakeWS {
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    this.closed = false;
    sockets.push(this);
    setTimeout(() => this.onopen?.(), 0);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close() {
    if (this.closed) return;
    this.closed = true;
    setTimeout(() => this.onclose?.({ code: 1006 }), 0);
  }
  serverSays(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
}

const tick = (ms = 5) => new Promise((r) => setTimeout(r, ms));
async function until(fn, ms = 1000) {
  const end = Date.now() + ms;
  while (!fn()) {
    if (Date.now() > end) throw new Error("timed out");
    await tick(2);
  }
}

function newClient() {
  sockets.length = 0;
  const c = new DropClient({ url: "ws://example.test/ws", dropId: 9, token: "tok",
    minDelayMs: 5, maxDelayMs: 10, commandTimeoutMs: 200, WebSocketImpl: FakeWS });
  const states = [];
  const events = [];
  c.addEventListener("state", (e) => states.push(e.detail));
  c.addEventListener("event", (e) => events.push(e.detail));
  return { c, states, events };
}

test("joins with the JSON subprotocol, resumes from the last position after a drop", async () => {
  const { c, states, events } = newClient();
  c.start();
  await until(() => sockets[0]?.sent.length === 1);
  const ws = sockets[0];
  assert.deepEqual(ws.protocols, ["dropserver.json.v1"]);
  assert.equal(ws.url, "ws://example.test/ws", "the token is not in the URL");
  assert.deepEqual(ws.sent[0], { t: "join", id: ws.sent[0].id, drop_id: 9, token: "tok" });
  ws.serverSays({ t: "joined", id: ws.sent[0].id, drop: { state: "live" } });
  assert.equal(c.state, "open");
  ws.serverSays({ t: "event", event: "drop.buy_now", data: { product_id: 1 },
    pos: { epoch: "E", offset: 41 } });
  ws.serverSays({ t: "volatile", event: "stock", data: { products: { 1: 5 } } });
  assert.deepEqual(events.map((e) => e.event), ["drop.buy_now", "stock"]);
  assert.deepEqual(c.position, { epoch: "E", offset: 41 }, "volatile events keep position");

  ws.close(); // the network drops
  await until(() => c.state === "reconnecting");
  assert.ok(states.some((s) => s.state === "reconnecting" && s.retryInMs >= 5));
  await until(() => sockets[1]?.sent.length === 1);
  const again = sockets[1].sent[0];
  assert.deepEqual(again.since, { epoch: "E", offset: 41 });
  sockets[1].serverSays({ t: "joined", id: again.id, recovered: true, events: [
    { t: "event", event: "drop.sold_out", data: { product_id: 1 }, pos: { epoch: "E",
      offset: 42 } }] });
  assert.equal(c.state, "open");
  assert.equal(states.at(-1).recovered, true);
  assert.equal(events.at(-1).event, "drop.sold_out", "missed events are replayed");
  assert.deepEqual(c.position, { epoch: "E", offset: 42 });
  c.stop();
  assert.equal(c.state, "closed");
});

test("a skipped frame (chat left out in a big room) moves the position past it", async () => {
  const { c, events } = newClient();
  c.start();
  await until(() => sockets[0]?.sent.length === 1);
  const ws = sockets[0];
  ws.serverSays({ t: "joined", id: ws.sent[0].id, pos: { epoch: "E", offset: 40 } });
  ws.serverSays([
    { t: "event", event: "chat.message", data: { id: "a" }, pos: { epoch: "E", offset: 43 } },
    { t: "skipped", count: 6, pos: { epoch: "E", offset: 49 } },
    { t: "event", event: "drop.buy_now", data: { product_id: 1 }, pos: { epoch: "E", offset: 50 } },
  ]);
  assert.deepEqual(events.map((e) => e.event), ["chat.message", "drop.buy_now"]);
  assert.deepEqual(c.position, { epoch: "E", offset: 50 });
  ws.serverSays({ t: "skipped", count: 2, pos: { epoch: "E", offset: 52 } });
  assert.deepEqual(c.position, { epoch: "E", offset: 52 }, "resumes after, not from 50");
  c.stop();
});

test("answers pings, honours going_away's delay", async () => {
  const { c, states } = newClient();
  c.start();
  await until(() => sockets[0]?.sent.length === 1);
  const ws = sockets[0];
  ws.serverSays({ t: "joined", id: ws.sent[0].id });
  ws.serverSays({ t: "ping" });
  assert.deepEqual(ws.sent.at(-1), { t: "pong" });
  ws.serverSays({ t: "going_away", reason: "drain", reconnect_after_ms: 60 });
  ws.close();
  await until(() => c.state === "reconnecting");
  assert.equal(states.at(-1).retryInMs, 60);
  c.stop();
});

test("requests resolve with replies, reject with error frames and on disconnect", async () => {
  const { c } = newClient();
  await assert.rejects(c.command("buy", {}), { code: "not_connected" });
  c.start();
  await until(() => sockets[0]?.sent.length === 1);
  const ws = sockets[0];
  ws.serverSays({ t: "joined", id: ws.sent[0].id });
  const ok = c.command("buy", { product_id: 1, idempotency_key: "k" });
  const sent = ws.sent.at(-1);
  assert.equal(sent.t, "buy");
  ws.serverSays({ t: "reply", id: sent.id, data: { hold_id: "9-1-aa", buyer_number: 3 } });
  assert.equal((await ok).buyer_number, 3);
  const refused = c.command("buy", { product_id: 1, idempotency_key: "k2" });
  ws.serverSays({ t: "error", id: ws.sent.at(-1).id, code: "sold_out", message: "sold out" });
  await assert.rejects(refused, { code: "sold_out", message: "sold out" });
  const lost = c.command("chat.send", { text: "hi" });
  ws.close();
  await assert.rejects(lost, { code: "disconnected" });
  c.stop();
});

test("a rejected token stops retrying and says why", async () => {
  const { c, states } = newClient();
  c.start();
  await until(() => sockets[0]?.sent.length === 1);
  const ws = sockets[0];
  ws.serverSays({ t: "error", id: ws.sent[0].id, code: "token_expired", message: "expired" });
  await tick(30);
  assert.equal(c.state, "closed");
  assert.equal(states.at(-1).code, "token_expired");
  assert.equal(sockets.length, 1, "no reconnect");
});
