// The viewer's live page: player, drop state, BUY NOW, buy flow, auctions, chat,
// viewers, the host, a share link, "Remind me", the pinned chat message and, for the
// drop's staff (creator, moderators, admins), the chat's moderation tools. After the
// live it plays the replay with its moments and sells what is left from it. State lives
// in viewer-state.js and auction-state.js (pure); this file does I/O and rendering only.
// All user-supplied text is rendered with textContent, never innerHTML.

import { fetchJson, loadConfig, viewerToken } from "./api.js";
import {
  currentAuction, initialAuctions, nextAmounts, reduceAuctions, secondsLeft, statusText,
} from "./auction-state.js";
import { chatItem } from "./chat-view.js";
import { DropClient } from "./client.js";
import { mountGiveaways } from "./giveaway-panel.js";
import { mountOrders } from "./orders-panel.js";
import { mountTips } from "./tip-panel.js";
import { startPlayer } from "./player.js";
import {
  chosenVariant, countdown, DropState, formatClock, formatMoney, initialState, isOver, isStaff,
  OrderPhase, overlay, priceOf, productList, reduce, secondsUntil, sellingProduct, shareUrl,
  soldOf, timeline, wantsPlayer, wantsReplay,
} from "./viewer-state.js";

const $ = (id) => document.getElementById(id);

function dropIdFromLocation() {
  const m = location.pathname.match(/^\/d\/(\d+)\/?$/);
  if (m) return Number(m[1]);
  const q = new URLSearchParams(location.search).get("drop");
  return q && /^\d+$/.test(q) ? Number(q) : null;
}

let state = initialState(dropIdFromLocation());
let client = null;
let config = null;
let player = null;
let stripe = null;
let stripeCard = null;
let viewerTokenValue = null;
const seenBuyNow = { productId: null };
let auctions = initialAuctions();
let me = null; // GET /v1/me: who the token says we are (staff tools need it)
const reminder = { known: false, on: false, busy: false, error: "" };
let myOrders = null; // "My orders" and the paid order's receipt (orders-panel.js)

function auctionDispatch(event, data) {
  auctions = reduceAuctions(auctions, event, data, Date.now());
  renderAuction();
  window.__auctions = auctions; // tests and debugging
}

function dispatch(event, data) {
  state = reduce(state, event, data);
  render();
  // expose for tests and debugging
  window.__dropState = state;
}

// --- rendering ------------------------------------------------------------------

// The socket's state, not the drop's (the badge on the video says that).
const CONN_TEXT = {
  connecting: "connecting…",
  open: "connected",
  reconnecting: "reconnecting…",
  offline: "offline",
  closed: "disconnected",
};

function render() {
  const s = state;
  document.title = s.drop.title ? `${s.drop.title} · live drop` : "Live drop";
  $("drop-title").textContent = s.drop.title || (s.dropId ? `Drop #${s.dropId}` : "Live drop");

  const conn = $("conn");
  conn.dataset.state = s.conn.state;
  let connText = CONN_TEXT[s.conn.state] || s.conn.state;
  if (s.conn.state === "reconnecting" && s.conn.retryInMs) {
    connText = `reconnecting in ${Math.ceil(s.conn.retryInMs / 1000)}s`;
  }
  if (s.unavailable) connText = "not available";
  conn.textContent = connText;

  renderHost();
  renderRemind();
  renderPinnedChat();

  $("viewers").hidden = s.viewers === null;
  $("viewer-count").textContent = s.viewers === null ? "" : s.viewers.toLocaleString();

  const badge = $("drop-state");
  badge.dataset.state = s.drop.state || "";
  badge.textContent = (s.drop.state || "-").replace("_", " ");

  renderCountdown();

  const streamLive = s.stream.status === "live";
  const replaying = !!s.replay?.active;
  $("stream-status").hidden = (streamLive && !isOver(s) && !s.unavailable) || replaying;
  $("stream-status").textContent = s.unavailable
    ? "This drop is not available: the link may be wrong, or the drop is not public yet."
    : isOver(s) ? (s.replay ? "The live has ended: its moments are below." : "This drop has ended.")
      : streamLive ? "" : "Waiting for the stream…";
  // "replay" on the state badge already says so while the replay sells
  $("replay-badge").hidden = !replaying || s.drop.state === DropState.REPLAY;
  $("chat-form").hidden = !viewerTokenValue || s.unavailable;

  // pinned product
  const pinned = s.drop.pinnedProductId ? s.products[s.drop.pinnedProductId] : null;
  $("pinned").hidden = !pinned;
  if (pinned) {
    $("pinned-title").textContent = pinned.title || `Product ${pinned.id}`;
    $("pinned-price").textContent = formatMoney(pinned.price, pinned.currency);
  }

  // BUY NOW overlay
  const mode = overlay(s);
  const ov = $("buy-overlay");
  ov.hidden = mode === "hidden";
  ov.dataset.mode = mode;
  const product = sellingProduct(s);
  const variant = chosenVariant(s, product);
  if (product) {
    $("buy-title").textContent = product.title || `Product ${product.id}`;
    $("buy-price").textContent = formatMoney(priceOf(product, variant), product.currency);
    const left = variant ? variant.remaining : product.remaining;
    $("buy-remaining").textContent = mode === "sold_out" ? "sold out"
      : left === null ? "" : `${left} left${variant ? ` in ${variant.title}` : ""}`;
    if (seenBuyNow.productId !== product.id && mode === "open" && !replaying) {
      seenBuyNow.productId = product.id;
      // Browsers refuse (and log an error) until the viewer has tapped the page.
      if (navigator.userActivation?.hasBeenActive) navigator.vibrate?.(80);
    }
  }
  const busy = [OrderPhase.REQUESTING, OrderPhase.HELD, OrderPhase.PAYING]
    .includes(s.order.phase);
  const btn = $("buy-btn");
  btn.textContent = mode === "sold_out" ? "SOLD OUT" : busy ? "HELD" : "BUY NOW";
  btn.disabled = mode !== "open" || busy || s.conn.state !== "open";

  renderVariantPicker(product, variant, mode);
  renderReplay();
  renderProducts();
  renderOrder();
  renderCampaign();
  renderChat();
  renderAuction();
}

// The variant picker of the product on sale: one button per variant with what is
// left of it; a sold-out variant cannot be picked.
let renderedPicker = "";
function renderVariantPicker(product, variant, mode) {
  const picker = $("variant-picker");
  const variants = product && mode === "open" ? product.variants : [];
  picker.hidden = variants.length === 0;
  const key = variants.map((v) => `${v.id}:${v.remaining}`).join(",") +
    `|${variant ? variant.id : ""}`;
  if (key === renderedPicker) return;
  renderedPicker = key;
  picker.replaceChildren(...variants.map((v) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "variant-btn";
    b.setAttribute("role", "radio");
    b.dataset.variantId = v.id;
    const chosen = variant !== null && variant.id === v.id;
    b.setAttribute("aria-checked", chosen ? "true" : "false");
    b.disabled = v.remaining !== null && v.remaining <= 0;
    b.textContent = v.remaining === null ? v.title : `${v.title} · ${v.remaining} left`;
    b.addEventListener("click", () => dispatch("variant.picked",
      { product_id: product.id, variant_id: v.id }));
    return b;
  }));
}

// The replay's moments: a bar with a mark per moment and the list to jump to each
// (BUY NOW of every product, sold out, auctions, giveaways), with what is still on
// sale from the replay.
let renderedMoments = "";
function renderReplay() {
  const r = state.replay;
  $("replay").hidden = !r || !isOver(state);
  if (!r) return;
  $("replay-sale").hidden = state.drop.state !== DropState.REPLAY;
  const duration = Math.max(1, r.durationMs);
  $("replay-progress").style.width = r.active
    ? `${Math.min(100, (100 * r.ms) / duration).toFixed(2)}%` : "0";
  const items = timeline(state);
  const key = JSON.stringify(items.map((m) => [m.mediaMs, m.title, m.current, m.buyable,
    m.remaining]));
  if (key === renderedMoments) return;
  renderedMoments = key;
  $("replay-bar").replaceChildren($("replay-progress"), ...items.map((m) => {
    const mark = document.createElement("span");
    mark.className = "replay-mark";
    mark.dataset.kind = m.kind;
    mark.style.left = `${Math.min(100, (100 * m.mediaMs) / duration).toFixed(2)}%`;
    return mark;
  }));
  $("moment-list").replaceChildren(...items.map((m) => {
    const li = document.createElement("li");
    li.dataset.kind = m.kind;
    li.dataset.ms = String(m.mediaMs);
    li.dataset.current = m.current ? "1" : "0";
    if (m.productId !== null) li.dataset.productId = m.productId;
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "moment-btn";
    const clock = document.createElement("span");
    clock.className = "clock";
    clock.textContent = m.clock;
    const what = document.createElement("span");
    what.className = "what";
    what.textContent = m.title ? `${m.label} · ${m.title}` : m.label;
    btn.append(clock, what);
    btn.addEventListener("click", () => jumpTo(m.mediaMs));
    li.append(btn);
    if (m.buyable) {
      const sale = document.createElement("span");
      sale.className = "moment-sale";
      sale.textContent = m.remaining === null ? "on sale" : `on sale · ${m.remaining} left`;
      li.append(sale);
    }
    return li;
  }));
}

// The drop's product list: picture (or a local placeholder), title, price, what is
// left and the "N sold" figure (from the coalesced stock events), the variants.
const PLACEHOLDER = "/static/img/product-placeholder.svg";
let renderedProducts = "";
function renderProducts() {
  const list = productList(state);
  $("products").hidden = list.length === 0;
  // outlined: the product under BUY NOW (on the replay: the one the replay shows)
  const selling = overlay(state) === "hidden" ? null : sellingProduct(state)?.id ?? null;
  const key = JSON.stringify([selling, list.map((p) => [p.id, p.title, p.price, p.remaining,
    p.units, p.imageUrl, p.description, p.variants.map((v) => [v.id, v.remaining])])]);
  if (key === renderedProducts) return;
  renderedProducts = key;
  $("product-list").replaceChildren(...list.map((p) => {
    const li = document.createElement("li");
    li.className = "product-item";
    li.dataset.productId = p.id;
    li.dataset.selling = p.id === selling ? "1" : "0";
    const img = document.createElement("img");
    img.alt = "";
    img.loading = "lazy";
    img.src = p.imageUrl || PLACEHOLDER;
    const body = document.createElement("div");
    body.className = "product-body";
    const name = document.createElement("div");
    name.className = "product-name";
    name.textContent = p.title || `Product ${p.id}`;
    const meta = document.createElement("div");
    meta.className = "product-meta";
    const price = document.createElement("span");
    price.textContent = formatMoney(p.price, p.currency);
    const left = document.createElement("span");
    left.className = "muted product-left";
    left.textContent = p.remaining === null ? "" : p.remaining > 0 ? `${p.remaining} left`
      : "sold out";
    const sold = document.createElement("span");
    sold.className = "product-sold";
    const n = soldOf(p);
    sold.textContent = n > 0 ? `${n.toLocaleString()} sold` : "";
    meta.append(price, left, sold);
    body.append(name, meta);
    if (p.description) {
      const desc = document.createElement("p");
      desc.className = "muted product-desc";
      desc.textContent = p.description;
      body.append(desc);
    }
    if (p.variants.length) {
      const vs = document.createElement("p");
      vs.className = "muted product-variants";
      vs.textContent = p.variants.map((v) => (v.remaining === null ? v.title
        : `${v.title}: ${v.remaining > 0 ? v.remaining : "sold out"}`)).join(" · ");
      body.append(vs);
    }
    li.append(img, body);
    return li;
  }));
}

// The auction panel: the leading bid, the server's countdown, bid buttons for the
// next amounts, what happened to the viewer's own bid.
let renderedBids = "";
function renderAuction() {
  const a = currentAuction(auctions);
  $("auction").hidden = !a;
  if (!a) return;
  $("auction").dataset.state = a.state;
  const product = a.productId == null ? null : state.products[String(a.productId)];
  $("auction-title").textContent = product?.title || `Product ${a.productId ?? ""}`;
  $("auction-amount").textContent = formatMoney(a.leading ? a.leading.amount : a.startPrice,
    a.currency);
  $("auction-status").textContent = statusText(a);
  renderAuctionTimer();
  const err = a.error && !["bid_too_low"].includes(a.error) ? a.error : "";
  $("auction-error").hidden = !err;
  $("auction-error").textContent = err ? `Bid refused: ${err.replaceAll("_", " ")}` : "";
  const open = a.state === "running" && !!viewerTokenValue && state.conn.state === "open";
  const amounts = open ? nextAmounts(a) : [];
  const key = `${a.id}:${amounts.join(",")}:${a.pending ?? ""}:${a.mine ?? ""}`;
  if (key === renderedBids) return;
  renderedBids = key;
  $("bid-buttons").replaceChildren(...amounts.map((amount) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "bid-btn";
    b.dataset.amount = String(amount);
    b.textContent = `Bid ${formatMoney(amount, a.currency)}`;
    b.disabled = a.pending != null || a.mine === "leading";
    b.addEventListener("click", () => placeBid(a.id, amount));
    return b;
  }));
}

function renderAuctionTimer() {
  const a = currentAuction(auctions);
  if (!a) return;
  const secs = a.state === "running" ? secondsLeft(auctions, a, Date.now()) : null;
  const el = $("auction-timer");
  el.hidden = secs === null;
  if (secs !== null) el.textContent = formatClock(Math.ceil(secs));
}

function renderCountdown() {
  const s = state;
  const el = $("countdown");
  const secs = countdown(s);
  el.hidden = secs === null;
  if (secs !== null) el.textContent = `starts in ${formatClock(secs)}`;
  const hold = s.order.phase === OrderPhase.HELD || s.order.phase === OrderPhase.PAYING;
  $("hold").hidden = !hold;
  if (hold) $("hold-countdown").textContent = formatClock(secondsUntil(s.order.expiresAt) ?? 0);
}

const ORDER_TEXT = {
  requesting: ["Reserving…", ""],
  held: ["", "Pay before the timer runs out to keep it."],
  paying: ["Paying…", ""],
  paid: ["Paid! It's yours.", "Your receipt is below; it stays in My orders."],
  authorized: ["You're in!", "Your card is charged only if the goal is reached."],
  failed: ["Payment failed", ""],
  expired: ["Your hold expired", "The unit went back on sale."],
  cancelled: ["Order cancelled", ""],
  refunded: ["Refunded", ""],
  rejected: ["Could not reserve", ""],
};

function renderOrder() {
  const o = state.order;
  const panel = $("order");
  panel.hidden = o.phase === OrderPhase.IDLE;
  panel.dataset.phase = o.phase;
  if (o.phase === OrderPhase.IDLE) return;
  const [head, detail] = ORDER_TEXT[o.phase] || [o.phase, ""];
  let headline = head;
  if (o.buyerNumber && [OrderPhase.HELD, OrderPhase.PAYING, OrderPhase.PAID]
    .includes(o.phase)) {
    headline = o.phase === OrderPhase.PAID ? `Paid! You're buyer #${o.buyerNumber}`
      : `You're buyer #${o.buyerNumber}`;
  }
  let det = detail;
  if (o.phase === OrderPhase.PAID && o.prize) {
    headline = "The prize is yours!";
    det = "A giveaway prize: nothing to pay.";
  }
  $("order-headline").textContent = headline;
  if (o.phase === OrderPhase.FAILED || o.phase === OrderPhase.REJECTED) det = o.reason || "";
  if (o.amount && o.phase === OrderPhase.HELD) {
    det = `${formatMoney(o.amount, o.currency)}. ${detail}`;
  }
  $("order-detail").textContent = det;
  const pay = $("pay-btn");
  pay.hidden = !(o.phase === OrderPhase.HELD || o.phase === OrderPhase.PAYING);
  pay.disabled = o.phase === OrderPhase.PAYING || !o.clientSecret;
  pay.textContent = !o.clientSecret ? "Preparing payment…"
    : o.phase === OrderPhase.PAYING ? "Paying…"
      : o.amount ? `Pay ${formatMoney(o.amount, o.currency)}` : "Pay";
  $("cancel-btn").hidden = o.phase !== OrderPhase.HELD;
  $("card-element").hidden = !stripeCard || !(o.phase === OrderPhase.HELD ||
    o.phase === OrderPhase.PAYING);
  myOrders?.showCurrent();
  $("order-dismiss").hidden = ![OrderPhase.PAID, OrderPhase.AUTHORIZED, OrderPhase.FAILED,
    OrderPhase.EXPIRED, OrderPhase.CANCELLED, OrderPhase.REFUNDED, OrderPhase.REJECTED]
    .includes(o.phase);
}

function renderCampaign() {
  const c = state.campaign;
  $("campaign").hidden = !c;
  if (!c) return;
  $("campaign-bar").style.width = `${Math.min(100, Number(c.percent) || 0)}%`;
  $("campaign-text").textContent = `${c.backers} of ${c.goal} backers`;
}

let renderedChat = [];
let renderedStaff = false;
function renderChat() {
  const staff = isStaff(state, me);
  $("mod-tools").hidden = !staff;
  if (renderedChat === state.chat && renderedStaff === staff) return;
  const list = $("chat-list");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren(...state.chat.map((m) => chatItem(m, staff ? modButtons : null)));
  renderedChat = state.chat;
  renderedStaff = staff;
  if (atBottom) list.scrollTop = list.scrollHeight;
}

// A staff member's buttons on a message: pin, delete, and mute or ban its author (not
// another member of the staff: the server refuses that to a moderator).
function modButtons(m) {
  const make = (label, action, frame) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "mod";
    b.dataset.mod = action;
    b.textContent = label;
    b.addEventListener("click", () => moderate(action, frame, m.name));
    return b;
  };
  const out = [make("Pin", "pin", { t: "chat.pin", message_id: m.id }),
    make("Delete", "delete", { t: "chat.delete", message_id: m.id })];
  if (!m.role && m.userId && m.userId !== me?.user_id) {
    out.push(make("Mute", "mute", { t: "chat.mute", user_id: m.userId, seconds: 600 }),
      make("Ban", "ban", { t: "chat.ban", user_id: m.userId }));
  }
  return out;
}

async function moderate(action, frame, name = "") {
  if (!client) return;
  const { t, ...data } = frame;
  const status = $("mod-status");
  status.replaceChildren();
  try {
    await client.command(t, data);
    if (action === "mute") status.textContent = `${name} muted for 10 minutes`;
    if (action === "ban") {
      // a ban holds in every drop of the creator until lifted: undo is one tap away
      const undo = document.createElement("button");
      undo.type = "button";
      undo.className = "link";
      undo.id = "mod-undo";
      undo.textContent = "Undo";
      undo.addEventListener("click", () => moderate("unban",
        { t: "chat.unban", user_id: data.user_id }, name));
      status.append(`${name} banned until lifted`, undo);
    }
    if (action === "unban") status.textContent = `${name} may chat again`;
  } catch (err) {
    status.textContent = `${action}: ${err.message}`;
  }
}

function renderPinnedChat() {
  const p = state.chatPinned;
  $("chat-pinned").hidden = !p;
  if (!p) return;
  $("chat-pinned-name").textContent = p.name;
  $("chat-pinned-text").textContent = p.text; // never innerHTML
  $("chat-unpin").hidden = !isStaff(state, me);
}

let renderedHost = null;
function renderHost() {
  const h = state.drop.host;
  $("host").hidden = !h;
  $("share-btn").hidden = state.dropId === null || state.unavailable;
  if (!h || renderedHost === h) return;
  renderedHost = h;
  $("host-name").textContent = h.name;
  $("host-initial").textContent = (h.name || "?").slice(0, 1).toUpperCase();
  const img = $("host-avatar");
  const safe = /^(https?:\/\/|\/)/.test(h.avatarUrl) ? h.avatarUrl : "";
  img.hidden = !safe;
  $("host-initial").hidden = !!safe;
  img.alt = h.name;
  if (safe && img.getAttribute("src") !== safe) img.src = safe;
}

function renderRemind() {
  const scheduled = state.drop.state === "scheduled";
  $("remind").hidden = !(scheduled && viewerTokenValue && reminder.known);
  const btn = $("remind-btn");
  btn.textContent = reminder.on ? "Reminder set: cancel" : "Remind me";
  btn.classList.toggle("primary", !reminder.on);
  btn.disabled = reminder.busy;
  $("remind-text").textContent = reminder.error
    || (reminder.on ? "We'll tell you 10 minutes before it starts, and when it's live."
      : "");
}

// --- reminders and sharing ---------------------------------------------------------

async function loadReminder() {
  if (!viewerTokenValue || state.drop.state !== "scheduled" || reminder.known) return;
  reminder.known = true; // asked once per page
  try {
    const body = await fetchJson(`/v1/drops/${state.dropId}/reminder`,
      { token: viewerTokenValue });
    reminder.on = !!body.reminded;
  } catch (err) {
    reminder.error = err.message;
  }
  renderRemind();
}

async function toggleReminder() {
  if (reminder.busy) return;
  reminder.busy = true;
  reminder.error = "";
  renderRemind();
  try {
    const body = await fetchJson(`/v1/drops/${state.dropId}/reminder`, {
      method: reminder.on ? "DELETE" : "POST", token: viewerTokenValue });
    reminder.on = body ? !!body.reminded : false;
  } catch (err) {
    reminder.error = err.message;
  } finally {
    reminder.busy = false;
    renderRemind();
  }
}

async function share() {
  const url = shareUrl(location.origin, state.dropId);
  const title = state.drop.title || "Live drop";
  $("share").hidden = false;
  $("share-link").value = url;
  $("share-link").select();
  if (navigator.share && navigator.userActivation?.isActive) {
    try {
      await navigator.share({ title, url });
      $("share-status").textContent = "Shared";
      return;
    } catch {
      // cancelled, or not allowed here: the link stays on the page to copy
    }
  }
  try {
    await navigator.clipboard.writeText(url);
    $("share-status").textContent = "Link copied";
  } catch {
    $("share-status").textContent = "Copy the link above";
  }
}

// --- actions --------------------------------------------------------------------

async function buy() {
  const product = sellingProduct(state);
  if (!product || !client) return;
  const variant = chosenVariant(state, product);
  if (product.variants.length && !variant) return; // every variant is gone
  dispatch("buy.requested", { product_id: product.id, variant_id: variant?.id ?? null });
  try {
    const reply = await client.command("buy", {
      product_id: Number(product.id),
      ...(variant ? { variant_id: Number(variant.id) } : {}),
      quantity: 1,
      idempotency_key: crypto.randomUUID(),
    });
    // The reply is the hold (checkout/reserve.py Hold.reply); "order.held" may also
    // arrive as a private event: both lead to the same state.
    if (reply && (reply.order_id || reply.hold_id)) {
      dispatch("order.held", { ...reply, order_id: reply.order_id ?? reply.hold_id,
        product_id: reply.product_id ?? product.id });
    }
  } catch (err) {
    dispatch("buy.rejected", { code: err.code, message: err.message });
  }
}

async function placeBid(auctionId, amount) {
  if (!client) return;
  auctionDispatch("bid.sent", { auction_id: auctionId, amount });
  try {
    const reply = await client.command("bid", {
      auction_id: auctionId, amount, idempotency_key: crypto.randomUUID(),
    });
    auctionDispatch("bid.accepted", reply);
  } catch (err) {
    auctionDispatch("bid.rejected", { auction_id: auctionId, code: err.code,
      details: err.details || {} });
  }
}

function fetchAuctions() {
  fetchJson(`/v1/drops/${state.dropId}/auctions`)
    .then((body) => auctionDispatch("auctions.list", body))
    .catch(() => {});
}

async function pay() {
  const o = state.order;
  if (!client || !o.orderId || !o.clientSecret) return;
  dispatch("pay.started", { order_id: o.orderId });
  try {
    if (stripe && stripeCard) {
      // Stripe.js confirms the PaymentIntent; "order.paid" follows from the webhook.
      const result = await stripe.confirmCardPayment(o.clientSecret, {
        payment_method: { card: stripeCard },
      });
      if (result.error) {
        dispatch("order.failed", { order_id: o.orderId, reason: result.error.message });
      }
      return;
    }
    if (config.payment_gateway === "fake") {
      // Development: the fake gateway's stand-in for Stripe.js (docs/http-api.md).
      const res = await fetchJson(`/v1/dev/orders/${encodeURIComponent(o.orderId)}/confirm`,
        { method: "POST", token: viewerTokenValue, body: { payment_method: "pm_card_visa" } });
      if (res.state === "paid") dispatch("order.paid", { order_id: o.orderId });
      else if (res.error) dispatch("order.failed", { order_id: o.orderId, reason: res.error });
      return;
    }
    dispatch("order.failed", { order_id: o.orderId, reason: "payments are not available" });
  } catch (err) {
    dispatch("order.failed", { order_id: o.orderId, reason: err.message });
  }
}

async function cancelHold() {
  const o = state.order;
  if (!client || !o.orderId) return;
  try {
    await client.command("cancel_hold", { hold_id: o.orderId });
    dispatch("order.cancelled", { order_id: o.orderId });
  } catch (err) {
    dispatch("order.failed", { order_id: o.orderId, reason: err.message });
  }
}

async function sendChat(ev) {
  ev.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || !client) return;
  $("chat-error").hidden = true;
  try {
    await client.command("chat.send", { text });
    input.value = "";
  } catch (err) {
    $("chat-error").textContent = err.message;
    $("chat-error").hidden = false;
  }
}

async function setupStripe() {
  if (config.payment_gateway !== "stripe" || !config.stripe_publishable_key) return;
  // Stripe.js must be loaded from Stripe's own host (never bundled or copied).
  await new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = "https://js.stripe.com/v3/";
    s.onload = resolve;
    s.onerror = () => reject(new Error("Stripe.js could not be loaded"));
    document.head.append(s);
  });
  stripe = window.Stripe(config.stripe_publishable_key);
  stripeCard = stripe.elements().create("card");
  stripeCard.mount("#card-element");
}

// --- wiring ---------------------------------------------------------------------

async function main() {
  if (state.dropId === null) {
    document.body.classList.add("no-drop");
    $("pick-drop").hidden = false;
    $("pick-drop").addEventListener("submit", (ev) => {
      ev.preventDefault();
      location.href = `/d/${$("pick-drop-id").value}`;
    });
    dispatch("conn", { state: "closed" });
    listLiveDrops().catch(() => {});
    // a signed-in viewer's orders in every drop
    config = await loadConfig();
    viewerTokenValue = await viewerToken(config);
    myOrders = mountOrders({ dropId: null, token: () => viewerTokenValue });
    return;
  }
  config = await loadConfig();
  const token = await viewerToken(config);
  viewerTokenValue = token;
  if (token) {
    fetchJson("/v1/me", { token }).then((who) => {
      me = who;
      auctionDispatch("me", who);
      render();
    }).catch(() => {});
  }
  $("remind-btn").addEventListener("click", toggleReminder);
  $("share-btn").addEventListener("click", share);
  $("chat-unpin").addEventListener("click", () => moderate("unpin", { t: "chat.unpin" }));
  $("mod-slow").addEventListener("change", () => moderate("slow mode",
    { t: "chat.slow", seconds: Number($("mod-slow").value) }));
  $("buy-btn").addEventListener("click", buy);
  $("pay-btn").addEventListener("click", pay);
  $("cancel-btn").addEventListener("click", cancelHold);
  $("order-dismiss").addEventListener("click", () => dispatch("order.reset"));
  $("chat-form").addEventListener("submit", sendChat);
  $("video").addEventListener("timeupdate", () => {
    if (state.replay?.active) dispatch("replay.time", { ms: $("video").currentTime * 1000 });
  });
  $("unmute").addEventListener("click", () => {
    $("video").muted = false;
    $("unmute").hidden = true;
  });
  setupStripe().catch((err) => console.warn(err));

  // The drop itself comes with the socket's join answer (a draft or a wrong number
  // is refused there: "not available"); the stream's status comes from /stream,
  // then from stream.status events.
  fetchStreamStatus();

  client = new DropClient({
    url: config.ws_path, dropId: state.dropId, token,
    minDelayMs: config.reconnect_min_ms, maxDelayMs: config.reconnect_max_ms,
  });
  window.__dropClient = client; // tests and debugging
  const giveaways = mountGiveaways({ dropId: state.dropId,
    command: (type, data) => client.command(type, data) });
  const tips = mountTips({ dropId: state.dropId, token: () => viewerTokenValue,
    payments: () => ({ gateway: config.payment_gateway, stripe }) });
  myOrders = mountOrders({ dropId: state.dropId, token: () => viewerTokenValue,
    currentOrder: () => state.order.orderId ?? null });
  client.addEventListener("state", (e) => dispatch("conn", {
    state: e.detail.state, attempt: e.detail.attempt, retryInMs: e.detail.retryInMs,
    recovered: e.detail.recovered,
  }));
  client.addEventListener("joined", (e) => {
    // realtime/hub.py joined_frame: {recovered, pos, events, viewers, snapshot?, stock?}
    const d = e.detail.data || {};
    if (d.snapshot) {
      dispatch("snapshot", d.snapshot);
      syncReplay();
      if (typeof d.snapshot.chat_slow_seconds === "number") {
        $("mod-slow").value = String(d.snapshot.chat_slow_seconds);
      }
      loadReminder();
    }
    if (typeof d.viewers === "number") dispatch("viewers", { count: d.viewers });
    if (d.stock) dispatch("stock", d.stock.data || d.stock);
    // Back after a gap the server could not replay: a stream.status may be missed.
    if (e.detail.recovered === false) fetchStreamStatus();
    // Auctions are not in the join snapshot: read them, then events keep them current
    // (the higher seq wins either way round).
    if (e.detail.recovered !== true) fetchAuctions();
    giveaways.onJoined();
    tips.onJoined();
    // back after a gap: an order may have changed meanwhile (the list is read again)
    if (e.detail.recovered === false) myOrders.refresh().catch((err) => console.warn(err));
  });
  client.addEventListener("join-error", async (e) => {
    if (e.detail.code === "drop_not_found") {
      dispatch("unavailable", { code: e.detail.code });
      syncPlayer();
      return;
    }
    if (e.detail.code === "token_expired" || e.detail.code === "token_invalid") {
      // a stale stored token: get a fresh one (dev) or watch as a guest
      localStorage.removeItem("dropserver.viewer_token");
      client.token = await viewerToken(config);
      client.stop();
      client.start();
    }
  });
  client.addEventListener("event", (e) => {
    if (e.detail.event.startsWith("auction.")) {
      auctionDispatch(e.detail.event, e.detail.data);
      return;
    }
    dispatch(e.detail.event, e.detail.data);
    giveaways.onEvent(e.detail.event, e.detail.data);
    tips.onEvent(e.detail.event, e.detail.data);
    myOrders.onEvent(e.detail.event, e.detail.data, me?.user_id);
    if (e.detail.event === "stream.status") syncPlayer();
    syncReplay();
    if (e.detail.event === "chat.slow") $("mod-slow").value = String(e.detail.data.seconds);
  });
  client.start();
  setInterval(() => { renderCountdown(); renderAuctionTimer(); }, 250);
}

async function listLiveDrops() {
  const body = await fetchJson("/v1/drops?state=live,selling,sold_out,closed&limit=20");
  const drops = body?.drops || [];
  $("live-drops").hidden = drops.length === 0;
  $("live-drops-list").replaceChildren(...drops.map((d) => {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `/d/${Number(d.id)}`;
    a.textContent = d.title;
    li.append(a);
    return li;
  }));
}

function fetchStreamStatus() {
  fetchJson(`/v1/drops/${state.dropId}/stream`).then((st) => {
    streamKnown = true;
    // An event may have come first: a fresher "live" is not undone by this answer.
    if (st && st.status && state.stream.status !== "live") {
      dispatch("stream.status", { status: st.status, hls: st.hls, replay: st.replay ?? null });
      syncPlayer();
      syncReplay();
    }
  }).catch(() => {});
}

// The player runs while the stream is on air and is started then, never before:
// a waiting page polls no playlist. Once the stream ended (offline), the player
// plays out what it has; if the stream goes live again, it reloads the playlist.
let playerSawOffline = false;
function syncPlayer() {
  if (state.dropId === null || !config || state.replay?.active) return;
  if (!wantsPlayer(state)) {
    if (player && state.stream.status === "offline") playerSawOffline = true;
    if (player && state.unavailable) {
      player.stop();
      player = null;
    }
    return;
  }
  if (player) {
    if (playerSawOffline && state.stream.status === "live") {
      playerSawOffline = false;
      player.reload();
    }
    return;
  }
  sawLive = true;
  const url = state.stream.hls
    || config.hls_url_template.replace("{drop_id}", String(state.dropId));
  player = startPlayer($("video"), url, {
    onPlaying: () => { $("unmute").hidden = !$("video").muted; },
    onStalled: () => {},
  });
}

// The replay: once the drop is over and its stream is off air, the page reads the
// replay's playlist and moments (GET /v1/drops/{id}/stream says whether there is one,
// GET /v1/drops/{id}/replay gives them). A page opened after the end plays the replay
// at once; a page that watched the live plays out its end and switches to the replay
// when the viewer picks a moment. Buying on the replay is the live's buy: the overlay
// shows the product whose BUY NOW the replay last passed, while it is on sale again.
let replayStep = "idle"; // idle -> asking -> loaded | none
let sawLive = false; // this page watched the live: its viewers' requests are spread
let streamKnown = false; // the page's own GET /stream answered
function syncReplay() {
  if (state.dropId === null || !config || state.unavailable || !isOver(state)) return;
  if (!streamKnown) return; // its answer calls this again
  if (state.stream.status === "live" || state.stream.status === "reconnecting") return;
  if (state.replay) {
    if (!player && wantsReplay(state)) startReplay();
    return;
  }
  if (replayStep !== "idle") return;
  replayStep = "asking";
  // Every viewer of a big room learns of the end at once: spread their two requests
  // over the two seconds the live player still plays.
  setTimeout(() => loadReplay().catch(() => { replayStep = "idle"; }),
    sawLive ? Math.random() * 2000 : 0);
}

async function loadReplay() {
  let url = state.stream.replay;
  if (!url) {
    const st = await fetchJson(`/v1/drops/${state.dropId}/stream`);
    url = st?.replay ?? null;
    if (st?.status) {
      dispatch("stream.status", { status: st.status, hls: st.hls, replay: url });
    }
  }
  if (!url) {
    replayStep = "none";
    return;
  }
  const body = await fetchJson(`/v1/drops/${state.dropId}/replay`);
  replayStep = "loaded";
  dispatch("replay.loaded", body);
  syncReplay();
}

function startReplay() {
  const video = $("video");
  player = startPlayer(video, state.replay.playlist, {
    onPlaying: () => { $("unmute").hidden = !video.muted; },
    onStalled: () => {},
  });
  dispatch("replay.playing");
}

/** Jump to a moment of the replay (and play it there). */
function jumpTo(ms) {
  if (!state.replay) return;
  if (!player) {
    startReplay();
  } else if (!state.replay.active) {
    player.switchTo(state.replay.playlist); // the live's player, played out
    dispatch("replay.playing");
  }
  dispatch("replay.time", { ms });
  player.seek(ms / 1000);
}

main().catch((err) => {
  console.error(err);
  dispatch("conn", { state: "closed" });
});
