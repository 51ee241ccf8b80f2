// node --test web/tests/ (run by tests/test_web_js.py)
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  currentAuction, initialAuctions, nextAmounts, parseIncrements, reduceAuctions, secondsLeft,
  statusText,
} from "../js/auction-state.js";

const started = { auction_id: 3, product_id: 7, currency: "usd", start_price: 1000,
  increments: "0:100,2000:500", has_reserve: false, duration_ms: 30000,
  snipe_window_ms: 10000, started_at: 100000, ends_at: 130000, next_min: 1000,
  server_time: 100000 };

test("the countdown runs on the server's clock, whatever the viewer's says", () => {
  // The viewer's clock is 5 s ahead of the server's.
  let s = reduceAuctions(initialAuctions(), "auction.started", started, 105000);
  assert.equal(s.offsetMs, -5000);
  const a = currentAuction(s);
  assert.equal(secondsLeft(s, a, 105000), 30);
  assert.equal(secondsLeft(s, a, 140000), 0);
  // A bid inside the window moves the end; the new server time keeps the offset true.
  s = reduceAuctions(s, "auction.bid", { auction_id: 3, product_id: 7, seq: 1, amount: 1000,
    bidder: "Ann", bidder_id: "ann", ends_at: 135000, extended: true, next_min: 1100,
    server_time: 125000 }, 130000);
  assert.equal(secondsLeft(s, currentAuction(s), 130000), 10);
});

test("next amounts follow the price bands", () => {
  assert.deepEqual(parseIncrements("0:100,2000:500"), [[0, 100], [2000, 500]]);
  assert.deepEqual(parseIncrements([{ from: 0, step: 5 }]), [[0, 5]]);
  let s = reduceAuctions(initialAuctions(), "auction.started", started, 100000);
  assert.deepEqual(nextAmounts(currentAuction(s)), [1000, 1100, 1200]);
  s = reduceAuctions(s, "auction.bid", { auction_id: 3, seq: 1, amount: 1800,
    bidder: "Ann", bidder_id: "ann", ends_at: 130000, next_min: 1900, server_time: 101000 });
  assert.deepEqual(nextAmounts(currentAuction(s)), [1900, 2000, 2500]);
});

test("an older bid or HTTP answer never undoes a newer one; outbid and won are mine", () => {
  let s = reduceAuctions(initialAuctions(), "me", { user_id: "bob" });
  s = reduceAuctions(s, "auction.started", started, 100000);
  s = reduceAuctions(s, "bid.accepted", { auction_id: 3, seq: 1, amount: 1000,
    ends_at: 130000, next_min: 1100, server_time: 101000 });
  assert.equal(currentAuction(s).mine, "leading");
  assert.equal(statusText(currentAuction(s)), "You're the highest bidder");
  const bid2 = { auction_id: 3, seq: 2, amount: 1100, bidder: "Ann", bidder_id: "ann",
    ends_at: 130000, next_min: 1200, server_time: 102000 };
  s = reduceAuctions(s, "auction.bid", bid2);
  assert.equal(currentAuction(s).mine, "outbid");
  // The event of the first bid arriving late changes nothing.
  s = reduceAuctions(s, "auction.bid", { ...bid2, seq: 1, amount: 1000, bidder_id: "bob" });
  assert.equal(currentAuction(s).leading.amount, 1100);
  // Nor does an HTTP list read before the second bid.
  s = reduceAuctions(s, "auctions.list", { server_time: 101500, auctions: [{ id: 3,
    product_id: 7, state: "running", currency: "usd", start_price: 1000,
    increments: [{ from: 0, step: 100 }], has_reserve: false, ends_at: 130000, bids: 1,
    leading: { amount: 1000, bidder: "Bob", bidder_id: "bob", seq: 1 }, next_min: 1100,
    outcome: null }] });
  assert.equal(currentAuction(s).leading.amount, 1100);
  s = reduceAuctions(s, "bid.rejected", { auction_id: 3, code: "bid_too_low",
    details: { min_amount: 1300 } });
  assert.equal(currentAuction(s).nextMin, 1300);
  s = reduceAuctions(s, "auction.closed", { auction_id: 3, product_id: 7, outcome: "sold",
    bids: 2, amount: 1100, leader: "Ann", leader_id: "ann", ends_at: 130000,
    closed_at: 130050, server_time: 130050 });
  assert.equal(currentAuction(s).state, "closed");
  assert.equal(statusText(currentAuction(s)), "Sold to Ann");
});

test("the winner and a reserve not met read plainly", () => {
  let s = reduceAuctions(initialAuctions(), "me", { user_id: "ann" });
  s = reduceAuctions(s, "auction.started", started, 100000);
  s = reduceAuctions(s, "auction.closed", { auction_id: 3, outcome: "sold", bids: 1,
    amount: 1000, leader: "Ann", leader_id: "ann", ends_at: 130000, server_time: 130000 });
  assert.equal(statusText(currentAuction(s)), "You won! Pay to keep it.");
  s = reduceAuctions(initialAuctions(), "auction.started", started, 100000);
  s = reduceAuctions(s, "auction.closed", { auction_id: 3, outcome: "reserve_not_met",
    bids: 1, amount: 1000, leader: "Ann", leader_id: "ann", ends_at: 130000,
    server_time: 130000 });
  assert.equal(statusText(currentAuction(s)), "Reserve not met: no sale");
});
