// node --test web/tests/ (run by tests/test_web_js.py): the product list, variants and
// the "sold" figure of the viewer's page state (viewer-state.js).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  chosenVariant, initialState, overlay, priceOf, productList, reduce, sellingProduct, soldOf,
} from "../js/viewer-state.js";

const SNAPSHOT = { drop: { title: "Tees", state: "live", currency: "usd" }, products: [
  { product_id: 9, title: "Mug", price: 900, units: 4, remaining: 4, variants: [] },
  { product_id: 3, title: "Tee", price: 2000, units: 6, remaining: 6,
    description: "Heavy cotton", image_url: "/static/img/tee.svg", variants: [
      { variant_id: 31, title: "S", options: { size: "S" }, price: null, units: 2,
        remaining: 2 },
      { variant_id: 32, title: "M", options: { size: "M" }, price: 2500, units: 3,
        remaining: 3 },
      { variant_id: 33, title: "L", options: { size: "L" }, price: null, units: 1,
        remaining: 1 },
    ] },
] };

const play = (events, s = initialState(7)) =>
  events.reduce((acc, [ev, data]) => reduce(acc, ev, data), s);

test("the product list keeps the drop's order, with variants and descriptions", () => {
  const s = play([["snapshot", SNAPSHOT]]);
  assert.deepEqual(productList(s).map((p) => p.title), ["Mug", "Tee"]);
  const tee = s.products["3"];
  assert.equal(tee.description, "Heavy cotton");
  assert.equal(tee.imageUrl, "/static/img/tee.svg");
  assert.deepEqual(tee.variants.map((v) => [v.id, v.remaining]),
    [["31", 2], ["32", 3], ["33", 1]]);
});

test("stock updates every variant and the coalesced sold figure", () => {
  let s = play([["snapshot", SNAPSHOT]]);
  assert.equal(soldOf(s.products["3"]), 0);
  s = reduce(s, "stock", { products: { 3: 3, 9: 4 }, variants: { 3: { 31: 0, 32: 2 } } });
  assert.deepEqual(s.products["3"].variants.map((v) => v.remaining), [0, 2, 1]);
  assert.equal(soldOf(s.products["3"]), 3);
  assert.equal(soldOf(s.products["9"]), 0);
  // JSON turns the ids into strings: the same result.
  s = reduce(s, "stock", { products: { "3": "2" }, variants: { "3": { "33": "0" } } });
  assert.equal(s.products["3"].variants[2].remaining, 0);
  assert.equal(soldOf(s.products["3"]), 4);
});

test("the chosen variant is the pick while it has stock, else the first with stock", () => {
  let s = play([["snapshot", SNAPSHOT], ["drop.buy_now", { product_id: 3, price: 2000,
    remaining: 6 }]]);
  const tee = () => sellingProduct(s);
  assert.equal(chosenVariant(s, tee()).id, "31");
  s = reduce(s, "variant.picked", { product_id: 3, variant_id: 32 });
  assert.equal(chosenVariant(s, tee()).id, "32");
  assert.equal(priceOf(tee(), chosenVariant(s, tee())), 2500);
  assert.equal(priceOf(tee(), tee().variants[0]), 2000); // no override: the product's
  s = reduce(s, "stock", { products: { 3: 1 }, variants: { 3: { 31: 0, 32: 0 } } });
  assert.equal(chosenVariant(s, tee()).id, "33");
  assert.equal(overlay(s), "open");
  s = reduce(s, "stock", { products: { 3: 0 }, variants: { 3: { 33: 0 } } });
  assert.equal(chosenVariant(s, tee()), null);
  assert.equal(overlay(s), "sold_out");
  assert.equal(chosenVariant(s, s.products["9"]), null); // no variants
});

test("a held order remembers its variant", () => {
  let s = play([["snapshot", SNAPSHOT]]);
  s = reduce(s, "buy.requested", { product_id: 3, variant_id: 32 });
  assert.equal(s.order.variantId, "32");
  s = reduce(s, "order.held", { order_id: "1-3-32-00", product_id: 3, variant_id: 32,
    buyer_number: 1, amount: 2500, currency: "usd" });
  assert.equal(s.order.variantId, "32");
});

test("BUY NOW of a product with variants brings the picker's variants", () => {
  const s = play([["drop.buy_now", { product_id: 4, price: 1000, remaining: 3, variants: [
    { variant_id: 41, title: "Red", options: { colour: "red" }, price: null, remaining: 0 },
    { variant_id: 42, title: "Blue", options: { colour: "blue" }, price: 1200,
      remaining: 3 }] }]]);
  const p = sellingProduct(s);
  assert.deepEqual(p.variants.map((v) => [v.id, v.remaining]), [["41", 0], ["42", 3]]);
  assert.equal(chosenVariant(s, p).id, "42");
  assert.equal(priceOf(p, chosenVariant(s, p)), 1200);
});
