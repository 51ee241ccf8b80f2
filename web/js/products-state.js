// The console's products and variants, without the DOM: the editor's model built from
// the drop resource, the PATCH body built from the model (docs/http-api.md, "Drops":
// products[].variants), and what is left and sold of each variant while the drop is on
// air, kept current from `stock` events (docs/protocol.md).

import { minorPerMajor } from "./viewer-state.js";

/** States in which a drop's products may still be edited (PATCH /v1/drops/{id}). */
export const EDITABLE_STATES = new Set(["draft", "scheduled"]);

export class EditorError extends Error {
  constructor(field, message) {
    super(`${field}: ${message}`);
    this.field = field;
  }
}

const text = (v) => (v === null || v === undefined ? "" : String(v));
const major = (minor, per) => (minor === null || minor === undefined ? ""
  : String(Number(minor) / per));

/** A variant's default title: its option values joined with " / " (as the server). */
export function defaultTitle(values) {
  return values.map((v) => String(v).trim()).join(" / ");
}

/** An empty variant row of a product whose variants name `optionNames`. */
export function blankVariant(optionNames) {
  return { variantId: null, values: optionNames.map(() => ""), title: "", units: "1",
    limit: "", price: "", imageUrl: "" };
}

/** An empty product (the editor's "Add product"). */
export function blankProduct() {
  return { productId: null, title: "", description: "", imageUrl: "", price: "", units: "1",
    limit: "1", cogs: 0, optionNames: [], variants: [] };
}

/**
 * The editor's model of `drop` (its private view): every product with its variants,
 * money in major units as the inputs show it. A variant's title is kept only where it
 * is not the default (its option values joined), so editing the options renames it.
 */
export function editorFromDrop(drop) {
  const per = minorPerMajor(drop.currency);
  return {
    dropId: drop.id,
    version: drop.version,
    currency: drop.currency || "usd",
    products: (drop.products || []).map((p) => {
      const variants = p.variants || [];
      const optionNames = variants.length ? Object.keys(variants[0].options) : [];
      return {
        productId: p.product_id, title: text(p.title), description: text(p.description),
        imageUrl: text(p.image_url), price: major(p.price, per), units: text(p.units),
        limit: text(p.per_buyer_limit), cogs: p.cogs ?? 0, optionNames,
        variants: variants.map((v) => {
          const values = optionNames.map((n) => text(v.options[n]));
          return { variantId: v.variant_id, values,
            title: v.title === defaultTitle(values) ? "" : text(v.title),
            units: text(v.units), limit: text(v.per_buyer_limit), price: major(v.price, per),
            imageUrl: text(v.image_url) };
        }),
      };
    }),
  };
}

/** Option names from what the creator typed: "size, colour" -> ["size", "colour"]. */
export function parseOptionNames(raw) {
  return String(raw).split(",").map((s) => s.trim()).filter(Boolean);
}

/** The product with new option names; each variant keeps its values by position. */
export function renameOptions(product, names) {
  return { ...product, optionNames: names,
    variants: product.variants.map((v) => ({ ...v,
      values: names.map((_, i) => v.values[i] ?? "") })) };
}

function integer(raw, field, { min = 1, optional = false } = {}) {
  const s = text(raw).trim();
  if (s === "") {
    if (optional) return undefined;
    throw new EditorError(field, "is required");
  }
  const n = Number(s);
  if (!Number.isInteger(n) || n < min) throw new EditorError(field, `must be a whole number >= ${min}`);
  return n;
}

function money(raw, field, per, { optional = false } = {}) {
  const s = text(raw).trim();
  if (s === "") {
    if (optional) return undefined;
    throw new EditorError(field, "is required");
  }
  const n = Number(s);
  if (!Number.isFinite(n) || n <= 0) throw new EditorError(field, "must be a positive amount");
  return Math.round(n * per);
}

/**
 * The body of `PATCH /v1/drops/{id}` for the model: the whole product list (items with
 * their `product_id` are updated, variants with their `variant_id` too; what is left
 * out leaves the drop). Fields are named by their API path in an EditorError.
 */
export function bodyFromEditor(model) {
  const per = minorPerMajor(model.currency);
  if (!model.products.length) throw new EditorError("products", "a drop needs a product");
  const products = model.products.map((p, i) => {
    const at = `products[${i}]`;
    const title = p.title.trim();
    if (!title) throw new EditorError(`${at}.title`, "is required");
    const out = { title, price: money(p.price, `${at}.price`, per),
      per_buyer_limit: integer(p.limit, `${at}.per_buyer_limit`) };
    if (p.productId != null) out.product_id = p.productId;
    if (p.description) out.description = p.description;
    if (p.imageUrl.trim()) out.image_url = p.imageUrl.trim();
    if (p.cogs) out.cogs = p.cogs;
    if (!p.variants.length) {
      out.units = integer(p.units, `${at}.units`);
      return out;
    }
    if (!p.optionNames.length) {
      throw new EditorError(`${at}.variants`, "name the options first, like: size, colour");
    }
    out.variants = p.variants.map((v, j) => {
      const vat = `${at}.variants[${j}]`;
      const options = {};
      p.optionNames.forEach((name, k) => {
        const value = text(v.values[k]).trim();
        if (!value) throw new EditorError(`${vat}.options.${name}`, "is required");
        options[name] = value;
      });
      const item = { options, units: integer(v.units, `${vat}.units`) };
      if (v.variantId != null) item.variant_id = v.variantId;
      if (v.title.trim()) item.title = v.title.trim();
      const limit = integer(v.limit, `${vat}.per_buyer_limit`, { optional: true });
      if (limit !== undefined) item.per_buyer_limit = limit;
      const price = money(v.price, `${vat}.price`, per, { optional: true });
      if (price !== undefined) item.price = price;
      if (v.imageUrl.trim()) item.image_url = v.imageUrl.trim();
      return item;
    });
    return out;
  });
  return { products };
}

/** The units a product has: the sum of its variants' when it has them. */
export function productUnits(product) {
  if (!product.variants.length) return Number(product.units) || 0;
  return product.variants.reduce((n, v) => n + (Number(v.units) || 0), 0);
}

/** What is left of each product and variant, as the drop resource says it (on air). */
export function leftFromDrop(drop) {
  const left = { products: {}, variants: {} };
  for (const p of drop?.products || []) {
    if (typeof p.remaining === "number") left.products[p.product_id] = p.remaining;
    for (const v of p.variants || []) {
      if (typeof v.remaining === "number") {
        (left.variants[p.product_id] ||= {})[v.variant_id] = v.remaining;
      }
    }
  }
  return left;
}

/** `left` after a `stock` event (`{products, variants?}`; ids may be string keys). */
export function applyStock(left, data) {
  const next = { products: { ...left.products }, variants: { ...left.variants } };
  for (const [pid, n] of Object.entries(data?.products || {})) next.products[pid] = Number(n);
  for (const [pid, byVariant] of Object.entries(data?.variants || {})) {
    next.variants[pid] = { ...(next.variants[pid] || {}) };
    for (const [vid, n] of Object.entries(byVariant || {})) next.variants[pid][vid] = Number(n);
  }
  return next;
}

/**
 * The live table: per product and variant its units, what is left and what is sold
 * (units - left: held or paid, as the API's `sold`); `null` where nothing is known yet
 * (the drop is not on air).
 */
export function liveRows(drop, left) {
  return (drop?.products || []).map((p) => {
    const pl = left.products[p.product_id];
    const remaining = typeof pl === "number" ? pl : null;
    return {
      productId: p.product_id, title: p.title, price: p.price, units: p.units, remaining,
      sold: remaining === null ? null : Math.max(0, p.units - remaining),
      variants: (p.variants || []).map((v) => {
        const vl = left.variants[p.product_id]?.[v.variant_id];
        const vr = typeof vl === "number" ? vl : null;
        return { variantId: v.variant_id, title: v.title, price: v.price ?? p.price,
          units: v.units, limit: v.per_buyer_limit ?? p.per_buyer_limit, remaining: vr,
          sold: vr === null ? null : Math.max(0, v.units - vr) };
      }),
    };
  });
}
