// "My orders" on the viewer page: what the signed-in buyer bought -- in this drop, or
// in every drop -- each with its state and its receipt (GET /v1/me/orders; one
// order's receipt: GET /v1/orders/{id}/receipt). The list follows the private order.*
// events (the order's receipt is read again), and once the current order is paid its
// receipt shows in the order panel (`#order-receipt`). Pure parts: orders-state.js.
// On a drop's page the list is read when the viewer opens the panel, never on load:
// tens of thousands of viewers open the page at once when a drop starts, and a query
// each would be a stampede on PostgreSQL for a panel few of them open.
// Text from the server is rendered with textContent, never innerHTML.

import { fetchJson } from "./api.js";
import { changedOrder, itemLine, mergeReceipt, receiptRows, summary } from "./orders-state.js";

const $ = (id) => document.getElementById(id);
const PAGE = 10;

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

/** A receipt as a block of the page (the list's open item, and the order panel's). */
export function receiptElement(r) {
  const box = el("div", "receipt");
  box.dataset.id = r.id;
  box.dataset.state = r.state;
  const head = el("div", "receipt-head");
  head.append(el("strong", "", "Receipt"),
    el("span", "muted", ` from ${r.seller.name} · ${r.drop_title}`));
  const items = el("ul", "receipt-items");
  for (const item of r.items) {
    const line = itemLine(item, r.currency);
    const li = el("li", "receipt-item");
    li.append(el("span", "receipt-item-name", line.name),
      el("span", "muted receipt-item-qty", line.quantity),
      el("span", "receipt-item-amount", line.amount));
    items.append(li);
  }
  const dl = el("dl", "receipt-rows");
  for (const [label, value] of receiptRows(r)) {
    const row = el("div", "receipt-row");
    row.dataset.label = label;
    row.append(el("dt", "", label), el("dd", "", value));
    dl.append(row);
  }
  box.append(head, items, dl);
  return box;
}

/**
 * Mount the panel (`#my-orders` of index.html). `dropId`: the page's drop (null: the
 * page without one lists every drop); `token()` the viewer's token (null: a guest,
 * who has no orders); `currentOrder()` the id of the order the page is buying, whose
 * receipt shows in the order panel once it is paid.
 */
export function mountOrders({ dropId, token, currentOrder = () => null }) {
  let list = [];
  let cursor = null;
  let allDrops = dropId === null;
  let open = null; // the receipt shown in full in the list
  let loading = false;
  let loaded = false;

  const scope = () => (allDrops ? "" : `&drop_id=${dropId}`);

  function render() {
    const panel = $("my-orders");
    panel.hidden = !token();
    $("my-orders-count").textContent = loaded && list.length
      ? `(${list.length}${cursor ? "+" : ""})` : "";
    $("my-orders-all").checked = allDrops;
    $("my-orders-all").parentElement.hidden = dropId === null;
    $("my-orders-empty").hidden = !loaded || list.length > 0;
    $("my-orders-more").hidden = !cursor;
    $("my-orders-more").disabled = loading;
    $("my-orders-list").replaceChildren(...list.map((r) => {
      const s = summary(r);
      const li = el("li", "my-order");
      li.dataset.id = r.id;
      li.dataset.state = r.state;
      const btn = el("button", "my-order-head");
      btn.type = "button";
      btn.setAttribute("aria-expanded", open === r.id ? "true" : "false");
      btn.append(el("span", "my-order-title", s.title),
        el("span", "my-order-state badge", s.state),
        el("span", "my-order-total", s.total));
      btn.addEventListener("click", () => {
        open = open === r.id ? null : r.id;
        render();
      });
      const meta = el("div", "muted my-order-meta",
        allDrops ? `${s.date} · ${s.drop}` : s.date);
      li.append(btn, meta);
      if (open === r.id) li.append(receiptElement(r));
      return li;
    }));
    renderOrderReceipt();
  }

  // the order panel's receipt: the page's current order, once paid (or refunded)
  function renderOrderReceipt() {
    const box = $("order-receipt");
    const id = currentOrder();
    const r = id ? list.find((x) => x.id === id) : null;
    const show = r && ["paid", "refunded", "authorized"].includes(r.state);
    box.hidden = !show;
    if (!show) {
      box.replaceChildren();
      box.dataset.key = "";
      return;
    }
    const key = `${r.id}|${r.state}|${r.paid_at}|${r.refunded_at}`;
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.replaceChildren(receiptElement(r));
  }

  async function load({ more = false } = {}) {
    if (!token() || loading) return;
    loading = true;
    try {
      const after = more && cursor ? `&cursor=${encodeURIComponent(cursor)}` : "";
      const body = await fetchJson(`/v1/me/orders?limit=${PAGE}${scope()}${after}`,
        { token: token() });
      list = more ? [...list, ...body.orders.filter((r) => !list.some((x) => x.id === r.id))]
        : body.orders;
      cursor = body.next_cursor;
      loaded = true;
    } finally {
      loading = false;
      render();
    }
  }

  async function reread(orderId) {
    if (!token()) return;
    const r = await fetchJson(`/v1/orders/${encodeURIComponent(orderId)}/receipt`,
      { token: token() });
    if (allDrops || r.drop_id === dropId) list = mergeReceipt(list, r);
    render();
  }

  $("my-orders-all").addEventListener("change", () => {
    allDrops = $("my-orders-all").checked;
    cursor = null;
    load().catch((err) => console.warn(err));
  });
  $("my-orders-details").addEventListener("toggle", () => {
    if ($("my-orders-details").open && !loaded) load().catch((err) => console.warn(err));
  });
  $("my-orders-more").addEventListener("click", () => {
    load({ more: true }).catch((err) => console.warn(err));
  });

  if (dropId === null) $("my-orders-details").open = true; // the page's one panel
  render();

  return {
    /** Read the list again, if it was read before (the panel was opened). */
    refresh: () => (loaded ? load() : Promise.resolve()),
    /** A private event: the order it names is read again. */
    onEvent(event, data, me) {
      const id = changedOrder(event, data);
      if (id) {
        reread(id).catch((err) => console.warn(err));
        return;
      }
      // the viewer's own tip, paid: it joins the list
      if (event === "tip" && me && data && data.user_id === me && loaded) {
        load().catch((err) => console.warn(err));
      }
    },
    /** The page's current order changed (a new buy, paid, dismissed). */
    showCurrent: renderOrderReceipt,
    get receipts() { return list; },
  };
}
