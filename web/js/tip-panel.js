// The viewer page's tip panel: the creator's amounts as buttons, an optional message,
// then the payment -- Stripe.js with the tip's client secret, or the fake gateway's
// dev confirm (docs/http-api.md, "Tips"). The tip shows in the chat, highlighted, when
// the room hears it paid (the `tip` event, viewer-state.js). Text from the server is
// rendered with textContent.

import { fetchJson } from "./api.js";
import { formatMoney } from "./viewer-state.js";

const $ = (id) => document.getElementById(id);

function newKey() {
  if (globalThis.crypto?.randomUUID) return `tip-${crypto.randomUUID()}`;
  return `tip-${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

/**
 * Mount the panel (`#tips` of index.html). `token()` gives the viewer's token (null:
 * a guest, who cannot tip); `payments()` gives {gateway, stripe} for paying.
 */
export function mountTips({ dropId, token, payments }) {
  let amounts = [];
  let currency = "usd";
  let sending = false; // a tip is being sent or paid
  let lastTipId = null; // the viewer's latest tip, until the room hears it
  // Tips the room was heard paying. The `tip` event may come before the answer of the
  // request that paid it (the socket is faster than the HTTP answer on a busy server):
  // the answer then must not say "on its way" over "shown to everyone".
  const heard = new Set();
  let card = null;

  function status(text, kind = "") {
    const el = $("tip-status");
    el.hidden = !text;
    el.textContent = text || "";
    el.dataset.kind = kind;
  }

  function render() {
    const panel = $("tips");
    panel.hidden = amounts.length === 0 || !token();
    $("tip-amounts").replaceChildren(...amounts.map((a) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "tip-amount";
      b.dataset.amount = String(a);
      b.textContent = formatMoney(a, currency);
      b.disabled = sending;
      b.addEventListener("click", () => send(a));
      return b;
    }));
  }

  async function refresh() {
    const body = await fetchJson(`/v1/drops/${dropId}/tips`);
    amounts = body.amounts || [];
    currency = body.currency || "usd";
    render();
  }

  async function pay(tip) {
    const { gateway, stripe } = payments();
    if (stripe) {
      if (!card) {
        card = stripe.elements().create("card");
        $("tip-card").hidden = false;
        card.mount("#tip-card");
      }
      const result = await stripe.confirmCardPayment(tip.client_secret,
        { payment_method: { card } });
      if (result.error) throw new Error(result.error.message);
      return; // paid: the `tip` event follows from Stripe's webhook
    }
    if (gateway === "fake") {
      const res = await fetchJson(`/v1/dev/tips/${encodeURIComponent(tip.tip_id)}/confirm`,
        { method: "POST", token: token(), body: { payment_method: "pm_card_visa" } });
      if (res.state !== "paid") throw new Error(res.error || "the payment did not go through");
      return;
    }
    throw new Error("payments are not available");
  }

  function shown(tip) {
    status(`Your ${formatMoney(tip.amount, tip.currency || currency)} tip was shown to everyone.`,
      "ok");
    lastTipId = null;
  }

  async function send(amount) {
    if (sending) return;
    const message = $("tip-message").value.trim();
    sending = true;
    render();
    status(`Sending ${formatMoney(amount, currency)}…`);
    try {
      const tip = await fetchJson(`/v1/drops/${dropId}/tips`, {
        method: "POST", token: token(),
        body: { amount, message, idempotency_key: newKey() },
      });
      lastTipId = tip.tip_id;
      if (tip.state !== "paid" && !heard.has(tip.tip_id)) await pay(tip);
      if (heard.has(tip.tip_id)) {
        shown(tip);
      } else {
        status(`Thank you! Your ${formatMoney(amount, currency)} tip is on its way.`, "ok");
      }
      $("tip-message").value = "";
    } catch (err) {
      status(`Your tip did not go through: ${err.message}`, "error");
    }
    sending = false;
    render();
  }

  return {
    onJoined() { refresh().catch((err) => console.warn(err)); },
    onEvent(event, data) {
      if (event !== "tip" || !sending && data.tip_id !== lastTipId) return;
      // while a tip is being sent its id may not be known yet: remember the room's
      heard.add(data.tip_id);
      if (heard.size > 50) heard.delete(heard.values().next().value);
      if (data.tip_id === lastTipId) shown(data);
    },
    refresh,
  };
}
