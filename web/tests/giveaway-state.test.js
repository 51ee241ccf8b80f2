import assert from "node:assert/strict";
import test from "node:test";

import { enterButton, phase, reduceGiveaway, secondsLeft } from "../js/giveaway-state.js";

const OPENED = { giveaway_id: 3, prize: "Cap", product_id: 7, winners: 2,
  commitment: "ab".repeat(32), opened_at: 1_000_000, closes_at: 1_060_000,
  server_time: 1_000_000 };

test("the countdown follows the server's clock, not the page's", () => {
  // the page's clock is 5 s behind the server's
  const g = reduceGiveaway(null, "giveaway.opened", OPENED, 995_000);
  assert.equal(g.offsetMs, 5_000);
  assert.equal(secondsLeft(g, 995_000), 60);
  assert.equal(secondsLeft(g, 1_054_500), 1);
  assert.equal(secondsLeft(g, 1_055_000), 0);
  assert.equal(phase(g, 1_055_000), "closing");
});

test("the entry count never goes down and belongs to its giveaway", () => {
  let g = reduceGiveaway(null, "giveaway.opened", OPENED, 1_000_000);
  g = reduceGiveaway(g, "giveaway.entries", { giveaway_id: 3, entries: 10 });
  g = reduceGiveaway(g, "giveaway.entries", { giveaway_id: 3, entries: 8 });
  g = reduceGiveaway(g, "giveaway.entries", { giveaway_id: 4, entries: 99 });
  assert.equal(g.entries, 10);
});

test("enter, then drawn, then won", () => {
  let g = reduceGiveaway(null, "giveaway.opened", OPENED, 1_000_000);
  assert.deepEqual(enterButton(g, 1_000_000), { text: "ENTER", enabled: true });
  g = reduceGiveaway(g, "enter.requested");
  assert.equal(enterButton(g, 1_000_000).enabled, false);
  g = reduceGiveaway(g, "enter.done", { entries: 1 });
  assert.deepEqual(enterButton(g, 1_000_000), { text: "You're in", enabled: false });
  g = reduceGiveaway(g, "giveaway.drawn", { giveaway_id: 3, seed: "cd".repeat(32),
    entrants: 5, winners: [{ rank: 1, ticket: "aa", name: "Ann" }] });
  assert.equal(phase(g), "drawn");
  assert.equal(g.entries, 5);
  assert.deepEqual(g.results, [{ rank: 1, ticket: "aa", name: "Ann" }]);
  g = reduceGiveaway(g, "giveaway.won", { giveaway_id: 3, rank: 1, order_id: "1-7-x",
    prize_error: null });
  assert.deepEqual(g.won, { rank: 1, orderId: "1-7-x", prizeError: null });
});

test("a refusal is kept with its code; the API resource of a drawn giveaway", () => {
  let g = reduceGiveaway(null, "giveaway.opened", OPENED, 1_000_000);
  g = reduceGiveaway(g, "enter.refused", { code: "not_present", message: "no" });
  assert.equal(g.error.code, "not_present");
  assert.equal(enterButton(g, 1_000_000).enabled, true);
  const drawn = reduceGiveaway(null, "giveaway.resource", { id: 9, state: "drawn",
    prize: "Poster", winners: 1, commitment: "00", closes_at: 5, entries: 4,
    seed: "11", results: [{ rank: 1, ticket: "t", name: "" }] });
  assert.equal(drawn.drawn, true);
  assert.equal(drawn.entries, 4);
  assert.equal(drawn.results[0].ticket, "t");
});
