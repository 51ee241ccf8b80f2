import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelay, decodeFrame, encodeCommand, encodeJoin, PONG } from "../js/frames.js";

test("backoff grows, stays within [min, max] and is jittered", () => {
  for (let attempt = 1; attempt < 20; attempt++) {
    for (const r of [0, 0.5, 0.999]) {
      const d = backoffDelay(attempt, 500, 5000, () => r);
      assert.ok(d >= 500 && d <= 5000, `attempt ${attempt}: ${d}`);
    }
  }
  // the first retry is spread over [500, 1000] ms: a crashed node's viewers not at once
  assert.equal(backoffDelay(1, 500, 5000, () => 0), 500);
  assert.equal(backoffDelay(1, 500, 5000, () => 0.999), 1000);
  assert.equal(backoffDelay(2, 500, 5000, () => 0.5), 1000);
  assert.ok(backoffDelay(4, 500, 5000, () => 0.999) > 4400);
  assert.equal(backoffDelay(30, 500, 5000, () => 1), 5000);
  assert.notEqual(backoffDelay(5, 500, 5000, () => 0.1), backoffDelay(5, 500, 5000, () => 0.9));
});

test("join carries the drop, the token and the resume position", () => {
  const j = JSON.parse(encodeJoin(1, "9", "tok", { epoch: "e1", offset: 4 }));
  assert.deepEqual(j, { t: "join", id: "1", drop_id: 9, token: "tok",
    since: { epoch: "e1", offset: 4 } });
  const first = JSON.parse(encodeJoin(2, 9, null, null));
  assert.deepEqual(first, { t: "join", id: "2", drop_id: 9 });
});

test("requests put their fields beside t and id", () => {
  const c = JSON.parse(encodeCommand(5, "buy", { product_id: 3, t: "evil", id: "x" }));
  assert.deepEqual(c, { t: "buy", id: "5", product_id: 3 });
  assert.deepEqual(JSON.parse(PONG), { t: "pong" });
});

test("server frames decode by type", () => {
  const [ev] = decodeFrame(JSON.stringify({ t: "event", event: "drop.buy_now",
    data: { product_id: 3 }, pos: { epoch: "e", offset: 7 } }));
  assert.deepEqual(ev, { kind: "event", event: "drop.buy_now", data: { product_id: 3 },
    pos: { epoch: "e", offset: 7 }, durable: true });
  const [vol] = decodeFrame('{"t":"volatile","event":"stock","data":{"products":{"3":9}}}');
  assert.equal(vol.durable, false);
  assert.equal(vol.pos, null);
  const [priv] = decodeFrame('{"t":"private","event":"order.paid","data":{"order_id":"h"}}');
  assert.equal(priv.event, "order.paid");
  const [rep] = decodeFrame('{"t":"reply","id":"5","data":{"ok":true}}');
  assert.deepEqual(rep, { kind: "reply", id: "5", data: { ok: true } });
  const [err] = decodeFrame('{"t":"error","id":"6","code":"sold_out","message":"sold out"}');
  assert.equal(err.code, "sold_out");
  assert.equal(err.id, "6");
  const [joined] = decodeFrame('{"t":"joined","id":"1","recovered":true,"events":[]}');
  assert.equal(joined.kind, "joined");
  assert.equal(joined.data.recovered, true);
  const [away] = decodeFrame('{"t":"going_away","reason":"drain","reconnect_after_ms":1200}');
  assert.deepEqual(away, { kind: "going_away", delayMs: 1200, reason: "drain" });
  assert.deepEqual(decodeFrame('{"t":"ping"}'), [{ kind: "ping" }]);
  const [skipped] = decodeFrame('{"t":"skipped","count":3,"pos":{"epoch":"E","offset":9}}');
  assert.deepEqual(skipped, { kind: "skipped", count: 3, pos: { epoch: "E", offset: 9 } });
});

test("garbage frames decode to nothing", () => {
  assert.deepEqual(decodeFrame("not json"), []);
  assert.deepEqual(decodeFrame("42"), []);
  assert.deepEqual(decodeFrame('{"t": "nope"}'), []);
  assert.deepEqual(decodeFrame('{"type": "event"}'), []);
});
