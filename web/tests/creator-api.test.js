// node --test web/tests/ (run by tests/test_web_js.py)
import assert from "node:assert/strict";
import { test } from "node:test";

import { fresher } from "../js/creator-api.js";

const drop = (version, state, id = 7) => ({ id, version, state });

test("an older answer never replaces a newer drop", () => {
  const selling = drop(5, "selling");
  assert.equal(fresher(selling, drop(4, "live")), selling);
});

test("a newer or equal version is adopted (equal: the full resource after an event)", () => {
  const live = drop(4, "live");
  const selling = drop(5, "selling");
  assert.equal(fresher(live, selling), selling);
  const full = { ...drop(5, "selling"), allowed_actions: ["close", "end"] };
  assert.equal(fresher(selling, full), full);
});

test("another drop, or nothing held yet, takes the incoming one", () => {
  assert.deepEqual(fresher(drop(9, "ended", 1), drop(2, "draft", 2)), drop(2, "draft", 2));
  assert.deepEqual(fresher(null, drop(1, "draft")), drop(1, "draft"));
  const held = drop(3, "live");
  assert.equal(fresher(held, null), held);
});
