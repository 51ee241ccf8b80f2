// "My orders" on the viewer page, the pure part: what a receipt (GET /v1/me/orders,
// GET /v1/orders/{id}/receipt; docs/http-api.md "A buyer's orders and receipts") says
// in words, and how the list follows the private order.* events. No DOM, no I/O.

import { formatMoney } from "./viewer-state.js";

// The pipeline's states (checkout/order_states.py; a tip's are a subset), in words.
export const STATE_TEXT = Object.freeze({
  held: "Reserved",
  payment_pending: "Awaiting payment",
  authorized: "Card authorized",
  paid: "Paid",
  failed: "Payment failed",
  expired: "Expired",
  cancelled: "Cancelled",
  refunded: "Refunded",
  disputed: "Disputed",
});

export function stateText(state) {
  return STATE_TEXT[state] || String(state || "").replaceAll("_", " ");
}

/** The private events that change one of the buyer's orders: its id, or null. */
export function changedOrder(event, data) {
  if (!data || typeof data.order_id !== "string") return null;
  // order.held comes with the buy's answer, before the order's row exists: the
  // receipt is read from order.payment on (the first event after the row).
  return /^order\.(payment|paid|failed|expired|cancelled|refunded)$/.test(event)
    ? data.order_id : null;
}

/** The list with `receipt` in it: replacing the one with its id, else newest first. */
export function mergeReceipt(list, receipt) {
  const rest = list.filter((r) => r.id !== receipt.id);
  const out = [...rest, receipt];
  out.sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1
    : a.id < b.id ? 1 : -1));
  return out;
}

/** One line of a receipt in words: "Tee · M / black", quantity, prices. */
export function itemLine(item, currency) {
  const name = item.variant_title ? `${item.title} · ${item.variant_title}` : item.title;
  return {
    name,
    quantity: item.quantity > 1
      ? `${item.quantity} × ${formatMoney(item.unit_price, currency)}` : "",
    amount: formatMoney(item.amount, currency),
  };
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleString();
}

/** What the list shows of a receipt: a title, the state, the total, the date. */
export function summary(r) {
  const first = r.items[0] ? itemLine(r.items[0], r.currency).name : "";
  const more = r.items.length > 1 ? ` and ${r.items.length - 1} more` : "";
  return {
    title: r.kind === "tip" ? `Tip to ${r.seller.name}` : `${first}${more}`,
    state: stateText(r.state),
    total: formatMoney(r.total, r.currency),
    date: when(r.created_at),
    drop: r.drop_title,
  };
}

/** The receipt's rows below its items: [label, value], empty ones left out. */
export function receiptRows(r) {
  const money = (n) => formatMoney(n, r.currency);
  const rows = [
    ["Total", money(r.total)],
    ["Paid", r.amount_paid > 0 ? money(r.amount_paid) : ""],
    ["Refunded", r.amount_refunded > 0 ? money(r.amount_refunded) : ""],
    [r.kind === "tip" ? "Message" : "", r.kind === "tip" ? r.message || "" : ""],
    ["Status", stateText(r.state)],
    ["Pay before", r.hold_expires_at ? when(r.hold_expires_at) : ""],
    [r.kind === "tip" ? "Tip number" : "Order number", r.id],
    ["Buyer", r.buyer_number ? `#${r.buyer_number}` : ""],
    ["Payment reference", r.payment ? r.payment.reference : ""],
    ["Ordered", when(r.created_at)],
    ["Paid on", when(r.paid_at)],
    ["Refunded on", when(r.refunded_at)],
  ];
  return rows.filter(([label, value]) => label && value);
}
