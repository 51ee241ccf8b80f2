// node --test web/tests/ (run by tests/test_web_js.py): "My orders" in words and the
// list following the private order.* events (orders-state.js).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  changedOrder, itemLine, mergeReceipt, receiptRows, stateText, summary,
} from "../js/orders-state.js";

const ORDER = {
  kind: "order", id: "42-7-88-9f0c1d2e3a4b5c6d", drop_id: 42, drop_title: "Friday drop",
  seller: { id: "creator-1", name: "Cleo" }, state: "paid",
  items: [{ product_id: 7, variant_id: 88, title: "Tee", variant_title: "M / black",
    options: { size: "M", colour: "black" }, image_url: "", quantity: 2, unit_price: 2500,
    amount: 5000 }],
  total: 5000, currency: "usd", amount_paid: 5000, amount_refunded: 0, message: null,
  buyer_number: 24, released: null, flow: "client_confirm",
  payment: { gateway: "stripe", reference: "pi_123", status: "succeeded", error: null },
  created_at: "2026-12-02T16:30:00.123Z", paid_at: "2026-12-02T16:30:41.508Z",
  refunded_at: null, hold_expires_at: null,
};
const TIP = {
  ...ORDER, kind: "tip", id: "tip_abc", state: "paid", buyer_number: null,
  message: "great show", total: 500, amount_paid: 500,
  items: [{ product_id: null, variant_id: null, title: "Tip", variant_title: null,
    options: {}, image_url: "", quantity: 1, unit_price: 500, amount: 500 }],
  created_at: "2026-12-02T16:31:00.000Z",
};

test("every state the pipeline names has words", () => {
  for (const s of ["held", "payment_pending", "authorized", "paid", "failed", "expired",
    "cancelled", "refunded", "disputed"]) {
    assert.notEqual(stateText(s), s.replaceAll("_", " "), s);
  }
  assert.equal(stateText("some_new_state"), "some new state");
});

test("an order's line names its variant and the quantity at the unit price", () => {
  assert.deepEqual(itemLine(ORDER.items[0], "usd"),
    { name: "Tee · M / black", quantity: "2 × $25.00", amount: "$50.00" });
  assert.deepEqual(itemLine({ ...ORDER.items[0], variant_title: null, quantity: 1 }, "usd"),
    { name: "Tee", quantity: "", amount: "$50.00" });
  assert.equal(summary(ORDER).title, "Tee · M / black");
  assert.equal(summary(TIP).title, "Tip to Cleo");
  assert.equal(summary(ORDER).total, "$50.00");
});

test("the receipt's rows: amounts, reference, dates; empty ones left out", () => {
  const rows = Object.fromEntries(receiptRows(ORDER));
  assert.equal(rows.Total, "$50.00");
  assert.equal(rows.Paid, "$50.00");
  assert.equal(rows["Payment reference"], "pi_123");
  assert.equal(rows["Order number"], ORDER.id);
  assert.equal(rows.Buyer, "#24");
  assert.ok(rows["Paid on"]);
  for (const absent of ["Refunded", "Refunded on", "Pay before", "Message"]) {
    assert.equal(rows[absent], undefined, absent);
  }
  const refunded = Object.fromEntries(receiptRows({ ...ORDER, state: "refunded",
    amount_refunded: 5000, refunded_at: "2026-12-02T17:00:00Z" }));
  assert.equal(refunded.Refunded, "$50.00");
  assert.equal(refunded.Status, "Refunded");
  assert.ok(refunded["Refunded on"]);
  const tip = Object.fromEntries(receiptRows(TIP));
  assert.equal(tip.Message, "great show");
  assert.equal(tip["Tip number"], "tip_abc");
  assert.equal(tip.Buyer, undefined);
  const waiting = Object.fromEntries(receiptRows({ ...ORDER, state: "payment_pending",
    amount_paid: 0, paid_at: null, hold_expires_at: "2026-12-02T16:40:00Z" }));
  assert.equal(waiting.Paid, undefined);
  assert.ok(waiting["Pay before"]);
});

test("the order events that change a receipt; order.held does not (no row yet)", () => {
  for (const ev of ["order.payment", "order.paid", "order.failed", "order.expired",
    "order.cancelled", "order.refunded"]) {
    assert.equal(changedOrder(ev, { order_id: "o1" }), "o1", ev);
  }
  assert.equal(changedOrder("order.held", { order_id: "o1" }), null);
  assert.equal(changedOrder("stock", { order_id: "o1" }), null);
  assert.equal(changedOrder("order.paid", {}), null);
});

test("a receipt read again replaces its old self; a new one goes on top", () => {
  let list = [TIP, ORDER];
  list = mergeReceipt(list, { ...ORDER, state: "refunded" });
  assert.deepEqual(list.map((r) => [r.id, r.state]),
    [["tip_abc", "paid"], [ORDER.id, "refunded"]]);
  const newer = { ...ORDER, id: "42-7-88-ffff", created_at: "2026-12-02T17:00:00Z" };
  list = mergeReceipt(list, newer);
  assert.deepEqual(list.map((r) => r.id), [newer.id, "tip_abc", ORDER.id]);
});
