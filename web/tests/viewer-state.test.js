// node --test web/tests/ (run by tests/test_web_js.py)
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  countdown, formatClock, formatMoney, initialState, isStaff, OrderPhase, overlay, reduce,
  secondsUntil, sellingProduct, shareUrl, wantsPlayer,
} from "../js/viewer-state.js";

const play = (events, s = initialState(7)) =>
  events.reduce((acc, [ev, data]) => reduce(acc, ev, data), s);

test("BUY NOW shows the overlay with remaining stock, stock updates it", () => {
  let s = play([
    ["snapshot", { drop: { title: "Hoodies", state: "live", currency: "usd",
      products: [{ product_id: 3, title: "Hoodie", price: 4900, units: 100 }] } }],
  ]);
  assert.equal(overlay(s), "hidden");
  s = reduce(s, "drop.buy_now", { product_id: 3, price: 4900, currency: "usd",
    remaining: 100 });
  assert.equal(overlay(s), "open");
  assert.equal(sellingProduct(s).title, "Hoodie");
  assert.equal(sellingProduct(s).remaining, 100);
  s = reduce(s, "stock", { products: { 3: 42 } });
  assert.equal(sellingProduct(s).remaining, 42);
  s = reduce(s, "stock", { products: { 3: 0 } });
  assert.equal(overlay(s), "sold_out");
});

test("sold out, closed and ended hide or flip the overlay", () => {
  const base = play([["drop.buy_now", { product_id: 1, price: 100, remaining: 5 }]]);
  assert.equal(overlay(reduce(base, "drop.sold_out", { product_id: 1 })), "sold_out");
  assert.equal(overlay(reduce(base, "drop.closed", { product_id: 1 })), "hidden");
  assert.equal(overlay(reduce(base, "drop.ended", {})), "hidden");
  assert.equal(reduce(base, "drop.state", { state: "closed" }).drop.sellingProductId, null);
});

test("the buy flow: requested -> held (buyer #N) -> paying -> paid", () => {
  let s = play([["drop.buy_now", { product_id: 1, price: 100, remaining: 5 }]]);
  s = reduce(s, "buy.requested", { product_id: 1 });
  assert.equal(s.order.phase, OrderPhase.REQUESTING);
  s = reduce(s, "order.held", { order_id: "h1", product_id: 1, buyer_number: 24,
    expires_at: "2030-01-01T00:00:00Z", amount: 100, currency: "usd" });
  assert.equal(s.order.phase, OrderPhase.HELD);
  assert.equal(s.order.buyerNumber, 24);
  s = reduce(s, "order.payment", { order_id: "h1", status: "requires_payment_method",
    client_secret: "pi_1_secret" });
  assert.equal(s.order.clientSecret, "pi_1_secret");
  assert.equal(s.order.phase, OrderPhase.HELD, "the buyer still has to press Pay");
  s = reduce(s, "pay.started", { order_id: "h1" });
  assert.equal(s.order.phase, OrderPhase.PAYING);
  s = reduce(s, "order.paid", { order_id: "h1" });
  assert.equal(s.order.phase, OrderPhase.PAID);
  assert.equal(s.order.buyerNumber, 24, "keeps the buyer number");
});

test("events about another order never overwrite the current one", () => {
  let s = reduce(initialState(1), "order.held", { order_id: "new", buyer_number: 2 });
  s = reduce(s, "order.expired", { order_id: "old" });
  assert.equal(s.order.phase, OrderPhase.HELD);
  s = reduce(s, "order.expired", { order_id: "new" });
  assert.equal(s.order.phase, OrderPhase.EXPIRED);
});

test("rejected buys carry the server's code and message", () => {
  const s = reduce(initialState(1), "buy.rejected", { code: "sold_out", message: "gone" });
  assert.equal(s.order.phase, OrderPhase.REJECTED);
  assert.equal(s.order.code, "sold_out");
  assert.equal(s.order.reason, "gone");
});

test("chat keeps the last 100, dedupes by id, deletes by id", () => {
  let s = initialState(1);
  for (let i = 0; i < 130; i++) s = reduce(s, "chat.message", { id: `m${i}`, name: "a",
    text: `<b>${i}</b>` });
  assert.equal(s.chat.length, 100);
  assert.equal(s.chat[0].id, "m30");
  assert.equal(s.chat.at(-1).text, "<b>129</b>", "text is kept verbatim, rendered as text");
  s = reduce(s, "chat.message", { id: "m129", name: "a", text: "dup" });
  assert.equal(s.chat.length, 100);
  s = reduce(s, "chat.deleted", { id: "m129" });
  assert.equal(s.chat.at(-1).id, "m128");
});

test("viewers, countdown, stream status, connection state", () => {
  let s = play([["viewers", { count: 1234 }], ["drop.countdown", { starts_at: "2030-01-01T00:00:10Z" }],
    ["stream.status", { status: "live" }], ["conn", { state: "reconnecting", attempt: 2, retryInMs: 900 }]]);
  assert.equal(s.viewers, 1234);
  assert.equal(s.drop.startsAt, "2030-01-01T00:00:10Z");
  assert.equal(s.stream.status, "live");
  assert.deepEqual(s.conn, { state: "reconnecting", attempt: 2, retryInMs: 900, recovered: null });
});

test("unknown events leave the state as it was", () => {
  const s = initialState(1);
  assert.equal(reduce(s, "no.such.event", { x: 1 }), s);
});

test("time and money formatting", () => {
  const now = Date.parse("2030-01-01T00:00:00Z");
  assert.equal(secondsUntil("2030-01-01T00:01:05Z", now), 65);
  assert.equal(secondsUntil("2029-01-01T00:00:00Z", now), 0);
  assert.equal(secondsUntil(now / 1000 + 3, now), 3);
  assert.equal(secondsUntil(null, now), null);
  assert.equal(secondsUntil("garbage", now), null);
  assert.equal(formatClock(65), "1:05");
  assert.equal(formatClock(3725), "1:02:05");
  // A drop scheduled weeks ahead (the README's tour: 2030) read "starts in
  // 26998:50:07"; from a day on the days are counted apart.
  assert.equal(formatClock(86399), "23:59:59");
  assert.equal(formatClock(86400), "1d 00:00:00");
  assert.equal(formatClock(97198207), "1124d 23:30:07");
  assert.equal(formatClock(3 * 86400 + 65), "3d 00:01:05");
  assert.match(formatMoney(4900, "usd"), /49\.00/);
  assert.match(formatMoney(500, "jpy"), /500/);
});

test("the gateway's join snapshot (realtime/snapshot.py shape)", () => {
  const s = reduce(initialState(4), "snapshot", {
    drop: { id: 4, title: "Fri", state: "selling", currency: "eur" },
    state: "selling",
    countdown: { starts_at: "2030-01-01T00:00:00Z" },
    pinned_product_id: 8,
    selling_product_id: 8,
    products: [{ product_id: 8, title: "Cap", price: 1500, currency: "eur", units: 10,
      remaining: 3 }],
    chat: [{ id: "a", user_id: "u", name: "Ann", text: "hi", at: 1 }],
    viewers: 12,
  });
  assert.equal(s.drop.title, "Fri");
  assert.equal(s.drop.state, "selling");
  assert.equal(s.drop.startsAt, "2030-01-01T00:00:00Z");
  assert.equal(s.drop.pinnedProductId, "8");
  assert.equal(overlay(s), "open");
  assert.equal(sellingProduct(s).remaining, 3);
  assert.equal(s.viewers, 12);
  assert.deepEqual(s.chat.map((m) => [m.name, m.text]), [["Ann", "hi"]]);
  // a later snapshot without a pin clears it; one without the field keeps it
  assert.equal(reduce(s, "snapshot", { pinned_product_id: null }).drop.pinnedProductId, null);
  assert.equal(reduce(s, "snapshot", { state: "selling" }).drop.pinnedProductId, "8");
});

test("the HTTP drop resource works as a snapshot too", () => {
  const s = reduce(initialState(4), "snapshot", { id: 4, title: "Fri", state: "live",
    currency: "usd", starts_at: null, pinned_product_id: null, selling_product_id: null,
    products: [{ product_id: 2, title: "Tee", price: 900, units: 5, remaining: null }] });
  assert.equal(s.drop.state, "live");
  assert.equal(s.products["2"].remaining, 5);
  assert.equal(overlay(s), "hidden");
});

test("a campaign backer's authorized payment", () => {
  let s = reduce(initialState(1), "order.held", { order_id: "c1", buyer_number: 3 });
  s = reduce(s, "order.payment", { order_id: "c1", status: "authorized" });
  assert.equal(s.order.phase, OrderPhase.AUTHORIZED);
});

test("the countdown shows only before the drop is live", () => {
  const now = Date.parse("2030-01-01T00:00:00Z");
  const soon = "2030-01-01T00:00:05Z";
  let s = play([["snapshot", { drop: { state: "scheduled", starts_at: soon } }]]);
  assert.equal(countdown(s, now), 5);
  // live before starts_at (the creator went on air early): no "starts in"
  s = reduce(s, "drop.state", { state: "live" });
  assert.equal(countdown(s, now), null);
  assert.equal(countdown(play([["snapshot", { drop: { state: "scheduled",
    starts_at: "2029-12-31T23:59:00Z" } }]]), now), null, "past: nothing to count");
});

test("the player is wanted only while the stream is on air", () => {
  let s = initialState(7);
  assert.equal(wantsPlayer(s), false, "no stream yet: no playlist to poll");
  s = reduce(s, "stream.status", { status: "live", hls: "/v1/drops/7/hls/live.m3u8" });
  assert.equal(wantsPlayer(s), true);
  assert.equal(s.stream.hls, "/v1/drops/7/hls/live.m3u8");
  s = reduce(s, "stream.status", { status: "reconnecting" });
  assert.equal(wantsPlayer(s), true, "the playlist is still there; the player waits");
  assert.equal(s.stream.hls, "/v1/drops/7/hls/live.m3u8", "kept when not repeated");
  assert.equal(wantsPlayer(reduce(s, "stream.status", { status: "offline" })), false);
});

test("a drop that cannot be joined is unavailable, not waiting for its stream", () => {
  const s = reduce(initialState(7), "unavailable", { code: "drop_not_found" });
  assert.equal(s.unavailable, true);
  assert.equal(wantsPlayer(reduce(s, "stream.status", { status: "live" })), false);
});

test("a zero-price order.paid is a giveaway prize, not a purchase", () => {
  const s = reduce(initialState(1), "order.paid", { order_id: "1-7-aa", amount: 0 });
  assert.equal(s.order.phase, OrderPhase.PAID);
  assert.equal(s.order.prize, true);
  const bought = reduce(initialState(1), "order.paid", { order_id: "1-7-bb", amount: 4500 });
  assert.equal(bought.order.prize, undefined);
});

test("a paid tip joins the chat once, highlighted with its amount", () => {
  const tip = { tip_id: "tip_1", user_id: "u1", name: "Ada", amount: 500, currency: "usd",
    message: "great show" };
  let s = play([["chat.message", { id: "m1", name: "Bo", text: "hi" }], ["tip", tip]]);
  s = reduce(s, "tip", tip); // the same tip again (history replayed): kept once
  assert.equal(s.chat.length, 2);
  assert.deepEqual(s.chat[1], { id: "tip:tip_1", name: "Ada", text: "great show", at: null,
    tip: { amount: 500, currency: "usd" } });
  assert.equal(s.chat[0].tip, undefined);
});

test("the host and the pinned chat message come with the snapshot and events", () => {
  let s = play([["snapshot", { drop: { title: "T", state: "live", creator_id: "c1",
    host: { id: "c1", name: "Mia", avatar_url: "https://cdn.example/m.jpg" } },
  chat: [{ id: "a", user_id: "u1", name: "Ann", text: "hi", at: 1 },
    { id: "b", user_id: "m1", name: "Mo", text: "rules", at: 2, role: "moderator" }],
  chat_pinned: { id: "a", user_id: "u1", name: "Ann", text: "hi", pinned_by: "m1" } }]]);
  assert.deepEqual(s.drop.host, { id: "c1", name: "Mia",
    avatarUrl: "https://cdn.example/m.jpg" });
  assert.equal(s.drop.creatorId, "c1");
  assert.equal(s.chatPinned.id, "a");
  assert.equal(s.chatPinned.pinnedBy, "m1");
  assert.equal(s.chat[1].role, "moderator");
  assert.equal(s.chat[0].userId, "u1");
  s = reduce(s, "chat.unpinned", { id: "other" });
  assert.equal(s.chatPinned.id, "a", "another message's unpin leaves it");
  s = reduce(s, "chat.pinned", { id: "b", user_id: "m1", name: "Mo", text: "rules" });
  assert.equal(s.chatPinned.text, "rules");
  s = reduce(s, "chat.deleted", { id: "b" });
  assert.equal(s.chatPinned, null, "deleting the pinned message unpins it");
  s = reduce(s, "chat.pinned", { id: "a", name: "Ann", text: "hi" });
  s = reduce(s, "chat.unpinned", { id: "a" });
  assert.equal(s.chatPinned, null);
  // A later snapshot without chat_pinned keeps what is known; null clears it.
  s = reduce(s, "chat.pinned", { id: "a", name: "Ann", text: "hi" });
  s = reduce(s, "snapshot", { drop: { state: "live" } });
  assert.equal(s.chatPinned.id, "a");
  s = reduce(s, "snapshot", { drop: { state: "live" }, chat_pinned: null });
  assert.equal(s.chatPinned, null);
});

test("staff: the creator, an admin, the creator's moderators; a share link", () => {
  const s = play([["snapshot", { drop: { creator_id: "c1", state: "live" } }]]);
  assert.equal(isStaff(s, null), false);
  assert.equal(isStaff(s, { guest: true }), false);
  assert.equal(isStaff(s, { user_id: "u1", role: "viewer", moderator_of: [] }), false);
  assert.equal(isStaff(s, { user_id: "u1", role: "viewer", moderator_of: ["c2"] }), false);
  assert.equal(isStaff(s, { user_id: "m1", role: "viewer", moderator_of: ["c1"] }), true);
  assert.equal(isStaff(s, { user_id: "c1", role: "creator" }), true);
  assert.equal(isStaff(s, { user_id: "root", role: "admin" }), true);
  assert.equal(shareUrl("https://shop.example", 42), "https://shop.example/d/42");
});
