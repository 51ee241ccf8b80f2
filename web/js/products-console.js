// The console's "Products and variants" panel. Before the drop goes live (draft,
// scheduled) it edits the products and their variants (options such as size and
// colour, each variant's stock, per-buyer limit, price override and image) and saves
// them with one PATCH /v1/drops/{id} (If-Match: the version it was edited from, so a
// change made meanwhile in another tab is refused, not overwritten). On air and after,
// it shows each product's and variant's units, what is left and what is sold, kept
// current from the room's `stock` events. Text from the server goes in with
// textContent and input values.

import { fetchJson } from "./api.js";
import {
  EDITABLE_STATES, applyStock, blankProduct, blankVariant, bodyFromEditor, editorFromDrop,
  leftFromDrop, liveRows, parseOptionNames, productUnits, renameOptions,
} from "./products-state.js";
import { formatMoney } from "./viewer-state.js";

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
}

/**
 * Mount the panel (`#products-panel` of console.html). `drop()` and `token()` give the
 * open drop and the creator's token; `saved(drop)` takes the drop a save answered;
 * `reload()` reads the drop again (a promise); `log(text)` writes to the console's
 * event log.
 */
export function mountProductsConsole({ drop, token, saved, reload, log }) {
  const state = {
    model: null, // the editor's model (products-state.js), while editable
    dirty: false, // typed into since it was built from the drop
    shownVersion: null, // {id, version} the panel was built from
    left: { products: {}, variants: {} },
    seeded: null, // the products list of the resource `left` last took figures from
    saving: false,
  };
  window.__consoleProducts = state; // tests and debugging

  function showError(err) {
    $("products-error").hidden = !err;
    $("products-error").textContent = err ? (err.message || String(err)) : "";
    if (err) log(`products: ${err.code ? `${err.code}: ` : ""}${err.message || err}`);
  }

  function status(text) {
    $("products-status").textContent = text;
  }

  // --- the editor ----------------------------------------------------------------

  function input(label, value, data, attrs = {}) {
    return el("input", { value, ariaLabel: label, title: label, placeholder: label,
      dataset: data, ...attrs });
  }

  /** An input with its name shown above it (a placeholder goes once it is filled). */
  function field(label, node, cls = "") {
    return el("label", { className: `field ${cls}`.trim() },
      el("span", { textContent: label }), node);
  }

  function renderEditor() {
    const m = state.model;
    const currency = m.currency.toUpperCase();
    $("products-editor").replaceChildren(...m.products.map((p, pi) => {
      const hasVariants = p.variants.length > 0;
      const head = el("div", { className: "row" },
        field("Product", input("Product title", p.title, { p: pi, f: "title" },
          { maxLength: 200 }), "wide"),
        field(`Price (${currency})`, input(`Price (${currency})`, p.price,
          { p: pi, f: "price" }, { type: "number", min: "0.01", step: "0.01" })),
        field(hasVariants ? "Units (all)" : "Units", input(
          hasVariants ? "Units (the sum of the variants')" : "Units",
          hasVariants ? String(productUnits(p)) : p.units, { p: pi, f: "units" },
          { type: "number", min: "1", step: "1", disabled: hasVariants })),
        field("Per buyer", input("Limit per buyer (every variant together)", p.limit,
          { p: pi, f: "limit" }, { type: "number", min: "1", max: "100", step: "1" })));
      const image = el("div", { className: "row" },
        input("Image URL (optional)", p.imageUrl, { p: pi, f: "imageUrl" },
          { maxLength: 2000 }),
        el("button", { type: "button", className: "link", textContent: "Remove product",
          dataset: { do: "remove-product", p: pi } }));
      const options = el("div", { className: "row" },
        el("span", { className: "label", textContent: "Options" }),
        input("Option names, like: size, colour", p.optionNames.join(", "),
          { p: pi, f: "optionNames" }, { className: "option-names" }));
      const cols = [...p.optionNames, "Units", "Limit", `Price (${currency})`, "Image URL", ""];
      const table = el("table", { className: "variant-table" },
        el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", { textContent: c })))),
        el("tbody", {}, ...p.variants.map((v, vi) => {
          const at = { p: pi, v: vi };
          const cell = (node) => el("td", {}, node);
          return el("tr", { className: "variant-row",
            dataset: { variant: v.variantId ?? "", index: vi } },
          ...p.optionNames.map((name, oi) => cell(input(name, v.values[oi] ?? "",
            { ...at, f: "value", o: oi }, { maxLength: 100 }))),
          cell(input("Units", v.units, { ...at, f: "units" },
            { type: "number", min: "1", step: "1", className: "num" })),
          cell(input("Limit per buyer (empty: the product's)", v.limit, { ...at, f: "limit" },
            { type: "number", min: "1", max: "100", step: "1", className: "num" })),
          cell(input("Price (empty: the product's)", v.price, { ...at, f: "price" },
            { type: "number", min: "0.01", step: "0.01", className: "num" })),
          cell(input("Image URL (optional)", v.imageUrl, { ...at, f: "imageUrl" },
            { maxLength: 2000 })),
          cell(el("button", { type: "button", className: "link", textContent: "Remove",
            dataset: { do: "remove-variant", p: pi, v: vi } })));
        })));
      const add = el("button", { type: "button", textContent: "Add variant",
        dataset: { do: "add-variant", p: pi } });
      return el("fieldset", { className: "product-edit",
        dataset: { productIndex: pi, product: p.productId ?? "" } },
      head, image, options, hasVariants ? table : "", add);
    }));
  }

  function onInput(ev) {
    const t = ev.target;
    const m = state.model;
    if (!m || t.dataset.p === undefined || !t.dataset.f) return;
    const p = m.products[Number(t.dataset.p)];
    if (!p) return;
    state.dirty = true;
    status("unsaved changes");
    const f = t.dataset.f;
    if (f === "optionNames") {
      if (ev.type !== "change") return; // renamed when the field is left, not per key
      m.products[Number(t.dataset.p)] = renameOptions(p, parseOptionNames(t.value));
      renderEditor();
      return;
    }
    if (t.dataset.v !== undefined) {
      const v = p.variants[Number(t.dataset.v)];
      if (f === "value") v.values[Number(t.dataset.o)] = t.value;
      else v[f] = t.value;
      if (f === "units") updateSum(Number(t.dataset.p));
    } else {
      p[f] = t.value;
    }
  }

  function updateSum(pi) {
    const units = document.querySelector(
      `#products-editor fieldset[data-product-index="${pi}"] input[data-f="units"]:not([data-v])`);
    if (units) units.value = String(productUnits(state.model.products[pi]));
  }

  function onClick(ev) {
    const b = ev.target.closest("button[data-do]");
    if (!b || !state.model) return;
    const m = state.model;
    const p = m.products[Number(b.dataset.p)];
    if (b.dataset.do === "add-variant") {
      if (!p.optionNames.length) {
        p.optionNames = ["size"]; // a start; the creator renames it
      }
      p.variants.push(blankVariant(p.optionNames));
    } else if (b.dataset.do === "remove-variant") {
      const total = productUnits(p);
      p.variants.splice(Number(b.dataset.v), 1);
      if (!p.variants.length) p.units = String(total || 1); // the product's stock again
    } else if (b.dataset.do === "remove-product") {
      m.products.splice(Number(b.dataset.p), 1);
    } else {
      return;
    }
    state.dirty = true;
    status("unsaved changes");
    renderEditor();
  }

  async function save(ev) {
    ev.preventDefault();
    const d = drop();
    const m = state.model;
    if (!d || !m || state.saving) return;
    showError(null);
    let body;
    try {
      body = bodyFromEditor(m);
    } catch (err) {
      showError(err);
      return;
    }
    state.saving = true;
    $("products-save").disabled = true;
    try {
      const answer = await fetchJson(`/v1/drops/${d.id}`, { method: "PATCH", token: token(),
        body, headers: { "if-match": `"${m.version}"` } });
      state.dirty = false;
      state.shownVersion = null; // rebuilt from the answer
      status(`saved (version ${answer.version})`);
      log(`products saved: ${answer.products.map((p) => `${p.title} `
        + `(${p.variants.length ? `${p.variants.length} variants, ` : ""}${p.units} units)`)
        .join(", ")}`);
      saved(answer);
    } catch (err) {
      if (err.status === 412) {
        err.message = "the drop changed since you opened it (another tab?): "
          + "Discard reloads it, then edit again";
      } else if (err.details?.field) {
        err.message = `${err.details.field}: ${err.message}`;
      }
      showError(err);
    } finally {
      state.saving = false;
      $("products-save").disabled = false;
    }
  }

  /** Forget the edits and show the drop as the server has it now. */
  async function discard() {
    state.dirty = false;
    state.shownVersion = null;
    showError(null);
    status("");
    try {
      await reload();
    } catch (err) {
      showError(err);
    }
    render();
  }

  // --- on air: left and sold --------------------------------------------------------

  function renderLive() {
    const d = drop();
    const rows = liveRows(d, state.left);
    const cur = d.currency || "usd";
    const n = (x) => (x === null ? "-" : String(x));
    $("products-live").replaceChildren(...rows.map((p) => {
      const head = el("div", { className: "product-live-head" },
        el("strong", { textContent: p.title }),
        el("span", { className: "muted", textContent: ` ${formatMoney(p.price, cur)} · `
          + `${p.units} units · ` }),
        el("span", { className: "left", textContent: `${n(p.remaining)} left` }),
        el("span", { className: "muted", textContent: " · " }),
        el("span", { className: "sold", textContent: `${n(p.sold)} sold` }));
      const li = el("li", { dataset: { product: p.productId } }, head);
      if (p.variants.length) {
        li.append(el("table", { className: "variant-table" },
          el("thead", {}, el("tr", {}, ...["Variant", "Price", "Limit", "Units", "Left",
            "Sold"].map((c) => el("th", { textContent: c })))),
          el("tbody", {}, ...p.variants.map((v) => el("tr", {
            dataset: { variant: v.variantId }, className: v.remaining === 0 ? "gone" : "" },
          el("td", { textContent: v.title }),
          el("td", { textContent: formatMoney(v.price, cur) }),
          el("td", { textContent: String(v.limit) }),
          el("td", { textContent: String(v.units) }),
          el("td", { className: "left", textContent: n(v.remaining) }),
          el("td", { className: "sold", textContent: n(v.sold) }))))));
      }
      return li;
    }));
  }

  // --- both -------------------------------------------------------------------------

  function render() {
    const d = drop();
    $("products-panel").hidden = !d;
    if (!d) return;
    const editable = EDITABLE_STATES.has(d.state);
    $("products-form").hidden = !editable;
    $("products-live").hidden = editable;
    if (editable) {
      const same = state.shownVersion && state.shownVersion.id === d.id
        && state.shownVersion.version === d.version;
      if (!same && !(state.dirty && state.model?.dropId === d.id)) {
        state.model = editorFromDrop(d);
        state.dirty = false;
        state.shownVersion = { id: d.id, version: d.version };
        renderEditor();
      }
    } else {
      state.model = null;
      state.dirty = false;
      state.shownVersion = { id: d.id, version: d.version };
      renderLive();
    }
  }

  $("products-editor").addEventListener("input", onInput);
  $("products-editor").addEventListener("change", onInput);
  $("products-editor").addEventListener("click", onClick);
  $("products-form").addEventListener("submit", save);
  $("products-discard").addEventListener("click", discard);
  $("products-add").addEventListener("click", () => {
    if (!state.model) return;
    state.model.products.push(blankProduct());
    state.dirty = true;
    status("unsaved changes");
    renderEditor();
  });

  return {
    /** Another drop is being opened: forget the last one's edits and figures. */
    reset() {
      state.model = null;
      state.dirty = false;
      state.shownVersion = null;
      state.left = { products: {}, variants: {} };
      state.seeded = null;
      showError(null);
      status("");
    },
    /** The console's drop resource changed (opened, saved, an action, a drop.state
     * event): rebuild from it unless the creator is editing. What is left is taken
     * from the resource when it is a newly read one (its products list), else from the
     * stock events since. */
    onDrop() {
      const d = drop();
      if (d && state.seeded !== d.products) {
        state.left = applyStock(state.left, leftFromDrop(d));
        state.seeded = d.products;
      }
      render();
    },
    onEvent(event, data) {
      if (event !== "stock" || !drop()) return;
      state.left = applyStock(state.left, data);
      if (!EDITABLE_STATES.has(drop().state)) renderLive();
    },
  };
}
