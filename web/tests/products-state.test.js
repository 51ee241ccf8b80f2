// node --test web/tests/ (run by tests/test_web_js.py)
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  EditorError, applyStock, blankVariant, bodyFromEditor, editorFromDrop, leftFromDrop,
  liveRows, parseOptionNames, productUnits, renameOptions,
} from "../js/products-state.js";

const drop = () => ({
  id: 7, version: 3, currency: "usd", state: "draft",
  products: [
    { product_id: 31, title: "Hoodie", description: "warm", image_url: "", price: 4500,
      units: 5, per_buyer_limit: 2, cogs: 1200, variants: [
        { variant_id: 88, title: "M / black", options: { size: "M", colour: "black" },
          image_url: "", price: null, units: 3, per_buyer_limit: null },
        { variant_id: 89, title: "Large dark", options: { size: "L", colour: "black" },
          image_url: "/img/l.png", price: 5000, units: 2, per_buyer_limit: 1 }] },
    { product_id: 32, title: "Cap", description: "", image_url: "", price: 1999, units: 10,
      per_buyer_limit: 1, cogs: 0, variants: [] }],
});

test("a drop round-trips through the editor into the PATCH body unchanged", () => {
  const model = editorFromDrop(drop());
  assert.equal(model.version, 3);
  assert.deepEqual(model.products[0].optionNames, ["size", "colour"]);
  assert.equal(model.products[0].price, "45");
  assert.equal(model.products[0].variants[0].title, ""); // the default: not sent
  assert.equal(model.products[0].variants[1].title, "Large dark"); // a custom one: kept
  assert.deepEqual(bodyFromEditor(model), { products: [
    { product_id: 31, title: "Hoodie", price: 4500, per_buyer_limit: 2, description: "warm",
      cogs: 1200, variants: [
        { variant_id: 88, options: { size: "M", colour: "black" }, units: 3 },
        { variant_id: 89, options: { size: "L", colour: "black" }, units: 2,
          title: "Large dark", per_buyer_limit: 1, price: 5000, image_url: "/img/l.png" }] },
    { product_id: 32, title: "Cap", price: 1999, per_buyer_limit: 1, units: 10 }] });
});

test("new variants have no id; the product's units are their sum and are not sent", () => {
  const model = editorFromDrop(drop());
  const cap = model.products[1];
  cap.optionNames = ["colour"];
  cap.variants.push({ ...blankVariant(cap.optionNames), values: ["red"], units: "4",
    price: "21.50" });
  cap.variants.push({ ...blankVariant(cap.optionNames), values: ["blue"], units: "6" });
  assert.equal(productUnits(cap), 10);
  const body = bodyFromEditor(model).products[1];
  assert.equal(body.units, undefined);
  assert.deepEqual(body.variants, [{ options: { colour: "red" }, units: 4, price: 2150 },
    { options: { colour: "blue" }, units: 6 }]);
});

test("renaming options keeps each variant's values by position", () => {
  const p = editorFromDrop(drop()).products[0];
  const renamed = renameOptions(p, parseOptionNames(" size , color, fit ,"));
  assert.deepEqual(renamed.optionNames, ["size", "color", "fit"]);
  assert.deepEqual(renamed.variants[0].values, ["M", "black", ""]);
  assert.throws(() => bodyFromEditor({ ...editorFromDrop(drop()),
    products: [renamed] }), (e) => e instanceof EditorError
    && e.field === "products[0].variants[0].options.fit");
});

test("bad input names its field before anything is sent", () => {
  const cases = [
    [(m) => { m.products[0].variants[1].units = "0"; }, "products[0].variants[1].units"],
    [(m) => { m.products[0].variants[0].price = "-1"; }, "products[0].variants[0].price"],
    [(m) => { m.products[1].units = "2.5"; }, "products[1].units"],
    [(m) => { m.products[1].title = "  "; }, "products[1].title"],
    [(m) => { m.products = []; }, "products"],
  ];
  for (const [change, field] of cases) {
    const model = editorFromDrop(drop());
    change(model);
    assert.throws(() => bodyFromEditor(model), (e) => e.field === field, field);
  }
});

test("a yen price is whole yen", () => {
  const d = { ...drop(), currency: "jpy" };
  d.products[1].price = 1500;
  const model = editorFromDrop(d);
  assert.equal(model.products[1].price, "1500");
  assert.equal(bodyFromEditor(model).products[1].price, 1500);
});

test("left and sold: from the resource, then from stock events (string keys too)", () => {
  const d = drop();
  d.state = "selling";
  d.products[0].remaining = 4;
  d.products[0].variants[0].remaining = 2;
  d.products[0].variants[1].remaining = 2;
  let left = leftFromDrop(d);
  let rows = liveRows(d, left);
  assert.equal(rows[0].sold, 1);
  assert.deepEqual(rows[0].variants.map((v) => [v.remaining, v.sold, v.price, v.limit]),
    [[2, 1, 4500, 2], [2, 0, 5000, 1]]);
  assert.equal(rows[1].remaining, null); // nothing known: shown as "-"
  left = applyStock(left, { products: { 31: 2 }, variants: { 31: { 89: 0 } } });
  left = applyStock(left, { products: { "32": 9 } });
  rows = liveRows(d, left);
  assert.deepEqual([rows[0].remaining, rows[0].sold, rows[1].sold], [2, 3, 1]);
  assert.deepEqual(rows[0].variants.map((v) => [v.remaining, v.sold]), [[2, 1], [0, 2]]);
});
