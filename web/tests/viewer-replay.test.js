// node --test web/tests/ (run by tests/test_web_js.py): the replay of an ended drop in
// the viewer page's state (viewer-state.js): its moments' timeline, the product the
// replay shows at its position, and what can be bought from it.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  initialState, isOver, onReplaySale, overlay, reduce, replayProduct, sellingProduct, timeline,
  wantsPlayer, wantsReplay,
} from "../js/viewer-state.js";

const play = (events, s = initialState(7)) =>
  events.reduce((acc, [ev, data]) => reduce(acc, ev, data), s);

// An ended drop as a page opened after the live sees it: the hoodie (dropped first)
// has 2 left, the cap (dropped second) sold out, the mug was never dropped.
const ENDED = { drop: { title: "Friday", state: "ended", currency: "usd" }, products: [
  { product_id: 1, title: "Hoodie", price: 4500, units: 3, remaining: 2, state: "closed" },
  { product_id: 2, title: "Cap", price: 2000, units: 2, remaining: 0, state: "closed" },
  { product_id: 3, title: "Mug", price: 900, units: 4, remaining: 4, state: "pending" },
] };
const REPLAY = { playlist: "/v1/drops/7/hls/replay.m3u8", duration_ms: 30000, moments: [
  { kind: "pinned", product_id: 1, media_ms: 500, at: "t" },
  { kind: "buy_now", product_id: 1, media_ms: 2000, at: "t" },
  { kind: "auction_bid", product_id: 1, media_ms: 3000, at: "t" },
  { kind: "closed", product_id: null, media_ms: 9000, at: "t" },
  { kind: "buy_now", product_id: 2, media_ms: 10000, at: "t" },
  { kind: "sold_out", product_id: 2, media_ms: 12500, at: "t" },
  { kind: "giveaway_drawn", product_id: null, media_ms: 20000, at: "t" },
] };

test("an ended drop with a replay wants the replay, not the live player", () => {
  let s = play([["snapshot", ENDED], ["stream.status", { status: "offline", hls: "/l",
    replay: "/v1/drops/7/hls/replay.m3u8" }]]);
  assert.equal(isOver(s), true);
  assert.equal(s.stream.replay, "/v1/drops/7/hls/replay.m3u8");
  assert.equal(wantsReplay(s), false, "not before the moments are read");
  s = reduce(s, "replay.loaded", REPLAY);
  assert.equal(wantsReplay(s), true);
  assert.equal(wantsPlayer(s), false);
  // A later stream.status without `replay` keeps what /stream said.
  s = reduce(s, "stream.status", { status: "offline" });
  assert.equal(s.stream.replay, "/v1/drops/7/hls/replay.m3u8");
  // Back on air (the creator published again): the live wins.
  assert.equal(wantsReplay(reduce(s, "stream.status", { status: "live" })), false);
  // A drop still live never plays a replay, whatever exists.
  const live = play([["snapshot", { ...ENDED, drop: { ...ENDED.drop, state: "closed" } }],
    ["replay.loaded", REPLAY]]);
  assert.equal(wantsReplay(live), false);
});

test("the timeline lists BUY NOWs, sell-outs, auctions and giveaways, not bids or pins", () => {
  let s = play([["snapshot", ENDED], ["replay.loaded", REPLAY]]);
  const items = timeline(s);
  assert.deepEqual(items.map((m) => [m.kind, m.title, m.clock]), [
    ["buy_now", "Hoodie", "0:02"], ["buy_now", "Cap", "0:10"], ["sold_out", "Cap", "0:12"],
    ["giveaway_drawn", "", "0:20"]]);
  assert.deepEqual(items.map((m) => m.label), ["BUY NOW", "BUY NOW", "Sold out",
    "Giveaway draw"]);
  assert.equal(items.some((m) => m.current), false, "the replay has not started");
  assert.equal(items.some((m) => m.buyable), false, "the drop does not sell on its replay");
  s = reduce(s, "replay.time", { ms: 10400 });
  assert.deepEqual(timeline(s).map((m) => m.current), [false, true, false, false]);
});

test("on the replay the overlay shows the product whose BUY NOW it passed, if on sale", () => {
  let s = play([["snapshot", ENDED], ["replay.loaded", REPLAY], ["replay.playing", {}]]);
  assert.equal(replayProduct(s), null, "before the first BUY NOW");
  assert.equal(overlay(s), "hidden");
  s = reduce(s, "replay.time", { ms: 2500 });
  assert.equal(replayProduct(s).title, "Hoodie");
  assert.equal(overlay(s), "hidden", "ended: nothing sells");

  // The creator puts what is left on sale for the replay.
  s = play([["drop.state", { state: "replay", previous: "ended", version: 9 }],
    ["drop.replay_sales", { products: [
      { product_id: 1, price: 4500, currency: "usd", remaining: 2 }] }]], s);
  assert.equal(s.drop.state, "replay");
  assert.equal(onReplaySale(s, s.products["1"]), true);
  assert.equal(onReplaySale(s, s.products["2"]), false);
  assert.equal(overlay(s), "open");
  assert.equal(sellingProduct(s).title, "Hoodie", "the buy names the product shown");
  assert.deepEqual(timeline(s).filter((m) => m.buyable).map((m) => [m.title, m.remaining]),
    [["Hoodie", 2]]);
  // At the cap's BUY NOW: the cap is not on sale again, no overlay.
  s = reduce(s, "replay.time", { ms: 11000 });
  assert.equal(replayProduct(s).title, "Cap");
  assert.equal(overlay(s), "hidden");
  // Back to the hoodie; it sells out on the replay, then the sales close.
  s = reduce(s, "replay.time", { ms: 5000 });
  s = reduce(s, "stock", { products: { 1: 0 } });
  assert.equal(overlay(s), "sold_out");
  s = play([["drop.state", { state: "ended", previous: "replay", version: 10 }],
    ["drop.ended", {}]], s);
  assert.equal(s.products["1"].state, "closed");
  assert.equal(overlay(s), "hidden");
  assert.equal(isOver(s), true);
});

test("the live's overlay is untouched while no replay plays", () => {
  const s = play([["snapshot", { ...ENDED, drop: { ...ENDED.drop, state: "live" } }],
    ["drop.buy_now", { product_id: 3, price: 900, remaining: 4 }]]);
  assert.equal(overlay(s), "open");
  assert.equal(sellingProduct(s).title, "Mug");
  assert.equal(s.products["3"].state, "selling");
  const closed = reduce(s, "drop.closed", { product_id: 3 });
  assert.equal(closed.products["3"].state, "closed");
});
