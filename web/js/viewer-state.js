// The viewer page's state machine, with no I/O: events in, a new state out.
//
// `reduce(state, event, data)` takes the server's event names (docs/protocol.md:
// "drop.state", "drop.buy_now", "stock", "order.held", ...) plus a few local ones
// ("conn", "snapshot", "buy.requested", "buy.rejected") and returns a new object;
// the page renders whatever comes out. Tested with `node --test` (web/tests/).

export const Conn = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  OFFLINE: "offline",
  CLOSED: "closed",
});

// schema.sql drops.state
export const DropState = Object.freeze({
  DRAFT: "draft",
  SCHEDULED: "scheduled",
  LIVE: "live",
  SELLING: "selling",
  SOLD_OUT: "sold_out",
  CLOSED: "closed",
  ENDED: "ended",
  REPLAY: "replay", // ended, and what is left sells on the replay
  SETTLED: "settled",
});

// What the buy panel shows; follows the private "order.*" events.
export const OrderPhase = Object.freeze({
  IDLE: "idle",
  REQUESTING: "requesting", // buy command sent, no answer yet
  HELD: "held", // a hold exists: countdown to hold expiry, pay button
  PAYING: "paying", // payment started (client secret or fake gateway)
  PAID: "paid",
  AUTHORIZED: "authorized", // campaign: card authorized, charged if the goal is reached
  FAILED: "failed",
  EXPIRED: "expired",
  CANCELLED: "cancelled",
  REFUNDED: "refunded",
  REJECTED: "rejected", // the buy command was refused (sold out, limit, rate)
});

const CHAT_KEEP = 100;
const ENDED_STATES = new Set([DropState.ENDED, DropState.REPLAY, DropState.SETTLED]);

// Replay moments the timeline lists (streaming/replay.py MOMENT_EVENTS; bids and
// pins are left out: a busy auction would bury the BUY NOWs).
export const MOMENT_LABELS = Object.freeze({
  buy_now: "BUY NOW",
  sold_out: "Sold out",
  auction_started: "Auction",
  auction_closed: "Auction closed",
  giveaway_opened: "Giveaway",
  giveaway_drawn: "Giveaway draw",
});

export function initialState(dropId = null) {
  return {
    dropId,
    conn: { state: Conn.CONNECTING, attempt: 0, retryInMs: 0, recovered: null },
    drop: {
      title: "",
      state: null,
      startsAt: null,
      pinnedProductId: null,
      sellingProductId: null,
      currency: "usd",
      creatorId: null,
      host: null, // {id, name, avatarUrl}: who hosts the drop
    },
    products: {}, // product_id -> {id, title, price, currency, remaining, units,
    //               description, imageUrl, variants: [{id, title, options, price,
    //               units, remaining, imageUrl}]}
    productOrder: [], // product ids in the drop's order (the product list)
    picks: {}, // product_id -> the variant id the viewer picked
    viewers: null,
    chat: [],
    chatPinned: null, // the pinned chat message {id, name, text, userId, pinnedBy}
    campaign: null,
    stream: { status: "offline", hls: null, replay: null }, // replay: its playlist, once one exists
    // The replay of an ended drop (GET /v1/drops/{id}/replay): its playlist, length and
    // moments; `active` once the player plays it, `ms` where it is.
    replay: null, // {playlist, durationMs, moments: [{kind, productId, mediaMs}], active, ms}
    unavailable: false, // the drop cannot be joined (no such drop, or a draft)
    order: { phase: OrderPhase.IDLE },
  };
}

function hostOf(h) {
  if (!h || typeof h !== "object") return null;
  return { id: String(h.id ?? ""), name: String(h.name || h.id || ""),
    avatarUrl: typeof h.avatar_url === "string" ? h.avatar_url : "" };
}

function pinnedOf(m) {
  if (!m || typeof m !== "object" || m.id == null) return null;
  return { id: String(m.id), name: String(m.name ?? m.user_id ?? ""), text: String(m.text ?? ""),
    userId: m.user_id == null ? null : String(m.user_id), pinnedBy: m.pinned_by ?? null };
}

/** Whether the signed-in user (``/v1/me``) moderates this drop's chat: its creator, an
 * admin, or one of the creator's moderators. */
export function isStaff(state, me) {
  if (!me || me.guest || !me.user_id) return false;
  const creator = state.drop.creatorId;
  if (me.role === "admin") return true;
  if (!creator) return false;
  return me.user_id === creator || (me.moderator_of || []).includes(creator);
}

/** The drop's shareable address (its page), from the page's own origin. */
export function shareUrl(origin, dropId) {
  return `${origin}/d/${Number(dropId)}`;
}

function withProduct(state, id, fields) {
  if (id === undefined || id === null) return state.products;
  const key = String(id);
  const prev = state.products[key] || { id: key, title: "", price: null, currency: null,
    remaining: null, units: null, description: "", imageUrl: "", variants: [], state: null };
  return { ...state.products, [key]: { ...prev, ...fields } };
}

function variantOf(v) {
  return {
    id: String(v.variant_id ?? v.id),
    title: v.title ?? "",
    options: v.options || {},
    price: v.price ?? null, // null: the product's price
    units: v.units ?? null,
    remaining: v.remaining ?? v.units ?? null,
    imageUrl: v.image_url ?? "",
  };
}

// A product put on sale (drop.buy_now, or each of drop.replay_sales' products).
function onSale(currency, data) {
  return {
    price: data.price ?? null,
    currency: data.currency ?? currency,
    remaining: data.remaining ?? null,
    state: "selling",
    ...(data.title ? { title: data.title } : {}),
    ...(Array.isArray(data.variants) ? { variants: data.variants.map(variantOf) } : {}),
  };
}

function idOrNull(value, fallback) {
  if (value === undefined) return fallback;
  return value === null ? null : String(value);
}

function applyOrder(state, phase, data, extra = {}) {
  const cur = state.order;
  // Events for another order (a stale hold) never overwrite the current one.
  if (data && data.order_id !== undefined && cur.orderId !== undefined &&
      cur.orderId !== null && String(data.order_id) !== String(cur.orderId) &&
      phase !== OrderPhase.HELD) {
    return state;
  }
  return { ...state, order: { ...cur, phase, ...extra } };
}

export function reduce(state, event, data = {}) {
  data = data || {};
  switch (event) {
    case "conn":
      return {
        ...state,
        conn: {
          state: data.state,
          attempt: data.attempt ?? 0,
          retryInMs: data.retryInMs ?? 0,
          recovered: data.recovered ?? state.conn.recovered,
        },
      };

    case "snapshot": {
      // The gateway's join snapshot (realtime/snapshot.py: {drop: {...}, state,
      // countdown, pinned_product_id, selling_product_id, products, chat, viewers}) or
      // the HTTP drop resource (the same fields at the top level).
      const d = data.drop || {};
      const pick = (name) => d[name] ?? data[name];
      let next = { ...state };
      const startsAt = data.countdown ? data.countdown.starts_at : pick("starts_at");
      next.drop = {
        ...state.drop,
        title: pick("title") ?? state.drop.title,
        state: data.state ?? d.state ?? state.drop.state,
        startsAt: startsAt === undefined ? state.drop.startsAt : startsAt,
        pinnedProductId: idOrNull(pick("pinned_product_id"), state.drop.pinnedProductId),
        sellingProductId: idOrNull(pick("selling_product_id"), state.drop.sellingProductId),
        currency: pick("currency") ?? state.drop.currency,
        creatorId: pick("creator_id") ?? state.drop.creatorId,
        host: hostOf(pick("host")) ?? state.drop.host,
      };
      if (data.chat_pinned !== undefined) next.chatPinned = pinnedOf(data.chat_pinned);
      const order = [];
      for (const p of pick("products") || []) {
        const id = p.product_id ?? p.id;
        order.push(String(id));
        next = { ...next, products: withProduct(next, id, {
          title: p.title ?? "",
          price: p.price ?? null,
          currency: p.currency ?? next.drop.currency,
          remaining: p.remaining ?? p.units ?? null,
          units: p.units ?? null,
          description: p.description ?? "",
          imageUrl: p.image_url ?? "",
          variants: (p.variants || []).map(variantOf),
          state: p.state ?? null,
        }) };
      }
      if (order.length) next.productOrder = order;
      const stock = data.stock || d.stock;
      if (stock) next = reduce(next, "stock", stock.products ? stock : { products: stock });
      if (typeof data.viewers === "number") next.viewers = data.viewers;
      if (Array.isArray(data.chat)) {
        next.chat = [];
        for (const m of data.chat) next = reduce(next, "chat.message", m);
      }
      if (data.campaign && data.campaign.goal) {
        next.campaign = { ...(next.campaign || { backers: 0, percent: 0 }),
          goal: data.campaign.goal };
      }
      if (data.stream && data.stream.status) next = reduce(next, "stream.status", data.stream);
      return next;
    }

    case "drop.state": {
      const drop = { ...state.drop, state: data.state };
      if (data.product_id !== undefined && data.state === DropState.SELLING) {
        drop.sellingProductId = String(data.product_id);
      }
      if (data.state !== DropState.SELLING && data.state !== DropState.SOLD_OUT) {
        drop.sellingProductId = null;
      }
      return { ...state, drop };
    }

    case "drop.countdown":
      return { ...state, drop: { ...state.drop, startsAt: data.starts_at ?? null } };

    case "drop.pinned":
      return {
        ...state,
        drop: { ...state.drop, pinnedProductId: data.product_id == null ? null
          : String(data.product_id) },
      };

    case "drop.buy_now":
      return {
        ...state,
        drop: { ...state.drop, state: DropState.SELLING,
          sellingProductId: String(data.product_id) },
        products: withProduct(state, data.product_id, onSale(state.drop.currency, data)),
      };

    case "drop.replay_sales": {
      // After the live: these products sell again, all at once, on the replay.
      let products = state.products;
      for (const p of data.products || []) {
        products = withProduct({ products }, p.product_id, onSale(state.drop.currency, p));
      }
      return { ...state, drop: { ...state.drop, state: DropState.REPLAY,
        sellingProductId: null }, products };
    }

    case "drop.sold_out":
      return {
        ...state,
        drop: { ...state.drop, state: DropState.SOLD_OUT },
        products: withProduct(state, data.product_id, { remaining: 0, state: "sold_out" }),
      };

    case "drop.closed":
      return {
        ...state,
        drop: { ...state.drop, state: DropState.CLOSED, sellingProductId: null },
        products: withProduct(state, data.product_id ?? state.drop.sellingProductId,
          { state: "closed" }),
      };

    case "drop.ended": {
      // Every sale closes (the live's, or the replay's).
      const products = {};
      for (const [id, p] of Object.entries(state.products)) {
        products[id] = p.state === "selling" || p.state === "sold_out"
          ? { ...p, state: "closed" } : p;
      }
      return {
        ...state,
        drop: { ...state.drop, state: DropState.ENDED, sellingProductId: null },
        products,
      };
    }

    case "stock": {
      // Coalesced per product (every variant together), with per-variant remaining
      // for products that have variants (docs/protocol.md).
      let products = state.products;
      for (const [id, remaining] of Object.entries(data.products || {})) {
        products = withProduct({ products }, id, { remaining: Number(remaining) });
      }
      for (const [id, left] of Object.entries(data.variants || {})) {
        const p = products[String(id)];
        if (!p) continue;
        const variants = p.variants.map((v) => (left[v.id] === undefined ? v
          : { ...v, remaining: Number(left[v.id]) }));
        products = withProduct({ products }, id, { variants });
      }
      return { ...state, products };
    }

    case "variant.picked":
      return { ...state, picks: { ...state.picks,
        [String(data.product_id)]: String(data.variant_id) } };

    case "viewers":
      return { ...state, viewers: Number(data.count) };

    case "chat.message": {
      const msg = { id: data.id ?? null, name: String(data.name ?? data.user_name ??
        data.user_id ?? "viewer"), text: String(data.text ?? ""), at: data.at ?? null,
        userId: data.user_id == null ? null : String(data.user_id), role: data.role ?? null };
      if (msg.id !== null && state.chat.some((m) => m.id === msg.id)) return state;
      return { ...state, chat: [...state.chat, msg].slice(-CHAT_KEEP) };
    }

    case "tip": {
      // A paid tip: highlighted in the chat (docs/protocol.md, `tip`).
      const msg = { id: `tip:${data.tip_id}`, name: String(data.name || "a viewer"),
        text: String(data.message ?? ""), at: null,
        tip: { amount: Number(data.amount), currency: String(data.currency || "usd") } };
      if (state.chat.some((m) => m.id === msg.id)) return state;
      return { ...state, chat: [...state.chat, msg].slice(-CHAT_KEEP) };
    }

    case "chat.deleted":
      return { ...state, chat: state.chat.filter((m) => m.id !== data.id),
        chatPinned: state.chatPinned && state.chatPinned.id === data.id ? null
          : state.chatPinned };

    case "chat.pinned":
      return { ...state, chatPinned: pinnedOf(data) };

    case "chat.unpinned":
      return state.chatPinned && state.chatPinned.id === data.id
        ? { ...state, chatPinned: null } : state;

    case "campaign.progress":
      return { ...state, campaign: { backers: data.backers, goal: data.goal,
        percent: data.percent } };

    case "stream.status":
      return { ...state, stream: { status: data.status, hls: data.hls ?? state.stream.hls,
        replay: data.replay === undefined ? state.stream.replay : data.replay } };

    case "replay.loaded":
      // GET /v1/drops/{id}/replay: {playlist, duration_ms, moments: [{kind, product_id,
      // media_ms, at}]}
      return { ...state, replay: {
        playlist: String(data.playlist),
        durationMs: Number(data.duration_ms) || 0,
        moments: (data.moments || []).filter((m) => MOMENT_LABELS[m.kind]).map((m) => ({
          kind: m.kind, productId: m.product_id == null ? null : String(m.product_id),
          mediaMs: Number(m.media_ms) || 0 })),
        active: state.replay?.active ?? false,
        ms: state.replay?.ms ?? 0,
      } };

    case "replay.playing":
      return state.replay ? { ...state, replay: { ...state.replay, active: true } } : state;

    case "replay.time":
      return state.replay ? { ...state, replay: { ...state.replay,
        ms: Math.max(0, Math.round(Number(data.ms) || 0)) } } : state;

    case "unavailable":
      return { ...state, unavailable: true };

    // --- the buy flow ---------------------------------------------------------
    case "buy.requested":
      return { ...state, order: { phase: OrderPhase.REQUESTING,
        productId: String(data.product_id),
        variantId: data.variant_id == null ? null : String(data.variant_id) } };

    case "buy.rejected":
      return { ...state, order: { ...state.order, phase: OrderPhase.REJECTED,
        code: data.code ?? "error", reason: data.message ?? "" } };

    case "order.held":
      return {
        ...state,
        order: {
          phase: OrderPhase.HELD,
          orderId: data.order_id,
          productId: data.product_id == null ? state.order.productId
            : String(data.product_id),
          variantId: data.variant_id == null ? (state.order.variantId ?? null)
            : String(data.variant_id),
          buyerNumber: data.buyer_number,
          expiresAt: data.expires_at,
          amount: data.amount,
          currency: data.currency,
        },
      };

    case "pay.started":
      return applyOrder(state, OrderPhase.PAYING, data);

    case "order.payment": {
      // The payment is ready for the buyer (client secret) or, for a campaign
      // backer, authorized (charged only if the goal is reached). It does not move a
      // held order on: the buyer still has to press Pay.
      const extra = { paymentStatus: data.status ?? null };
      if (data.client_secret) extra.clientSecret = data.client_secret;
      let phase = state.order.phase;
      if (data.status === "authorized") phase = OrderPhase.AUTHORIZED;
      return applyOrder(state, phase, data, extra);
    }
    case "order.paid":
      // amount 0: a giveaway's prize (docs/topics/giveaways.md), not a purchase
      return applyOrder(state, OrderPhase.PAID, data, data.amount === 0 ? { prize: true } : {});
    case "order.failed":
      return applyOrder(state, OrderPhase.FAILED, data, { reason: data.reason ?? "" });
    case "order.expired":
      return applyOrder(state, OrderPhase.EXPIRED, data);
    case "order.cancelled":
      return applyOrder(state, OrderPhase.CANCELLED, data);
    case "order.refunded":
      return applyOrder(state, OrderPhase.REFUNDED, data);
    case "order.reset":
      return { ...state, order: { phase: OrderPhase.IDLE } };

    default:
      return state;
  }
}

// --- derived values the page shows ---------------------------------------------

export function sellingProduct(state) {
  if (state.replay?.active) return replayProduct(state);
  const id = state.drop.sellingProductId;
  return id == null ? null : state.products[String(id)] || null;
}

/** The product the replay is showing: the one whose BUY NOW is the last at or before
 * the replay's position (null before the first). */
export function replayProduct(state, ms = state.replay?.ms ?? 0) {
  if (!state.replay) return null;
  let id = null;
  for (const m of state.replay.moments) {
    if (m.mediaMs > ms) break;
    if (m.kind === "buy_now" && m.productId !== null) id = m.productId;
  }
  return id === null ? null : state.products[id] || null;
}

/** Whether `product` can be bought on the replay: the drop sells on its replay
 * (state "replay") and the product is one of those on sale again. */
export function onReplaySale(state, product) {
  return !!product && state.drop.state === DropState.REPLAY && product.state === "selling";
}

/** The replay's timeline: the moments worth a jump, each with its label, its time and
 * its product; `current` is the last one at or before the replay's position. */
export function timeline(state) {
  if (!state.replay) return [];
  const ms = state.replay.ms;
  let current = -1;
  state.replay.moments.forEach((m, i) => { if (m.mediaMs <= ms) current = i; });
  return state.replay.moments.map((m, i) => {
    const product = m.productId === null ? null : state.products[m.productId] || null;
    const title = product ? product.title || `Product ${product.id}` : "";
    return { ...m, index: i, label: MOMENT_LABELS[m.kind], title, current: i === current,
      clock: formatClock(Math.floor(m.mediaMs / 1000)),
      buyable: m.kind === "buy_now" && onReplaySale(state, product) &&
        (product.remaining === null || product.remaining > 0),
      remaining: product ? product.remaining : null };
  });
}

/** Whether the page plays the drop's replay: the drop is over, its stream is not on
 * air, and the replay is known. */
export function wantsReplay(state) {
  return !state.unavailable && isOver(state) && !!state.replay &&
    state.stream.status !== "live" && state.stream.status !== "reconnecting";
}

/** The variant a buy of `product` names: the viewer's pick while it has stock, else
 * the first variant with stock; null for a product without variants (or all gone). */
export function chosenVariant(state, product) {
  if (!product || !product.variants || product.variants.length === 0) return null;
  const picked = product.variants.find((v) => v.id === state.picks[product.id]);
  if (picked && (picked.remaining === null || picked.remaining > 0)) return picked;
  return product.variants.find((v) => v.remaining === null || v.remaining > 0) || null;
}

/** The price a buy of `product` (and its chosen variant) costs. */
export function priceOf(product, variant) {
  return variant && variant.price !== null ? variant.price : product.price;
}

/** Units taken of a product (held or paid, every variant together): its units less
 * what the coalesced stock says is left. The page's "12 sold"; 0 before it sells. */
export function soldOf(product) {
  if (!product || product.units === null || product.remaining === null) return 0;
  return Math.max(0, product.units - product.remaining);
}

/** The drop's products in the drop's order (the product list). */
export function productList(state) {
  const ids = state.productOrder.length ? state.productOrder : Object.keys(state.products);
  return ids.map((id) => state.products[id]).filter(Boolean);
}

/** BUY NOW overlay: "hidden", "open" (can buy) or "sold_out". */
export function overlay(state) {
  if (state.replay?.active) {
    // On the replay: the product the video is showing, while it is on replay sale.
    const shown = replayProduct(state);
    if (!onReplaySale(state, shown)) return "hidden";
    return shown.remaining !== null && shown.remaining <= 0 ? "sold_out" : "open";
  }
  const product = sellingProduct(state);
  if (state.drop.state === DropState.SOLD_OUT) return product ? "sold_out" : "hidden";
  if (state.drop.state !== DropState.SELLING || !product) return "hidden";
  if (product.remaining !== null && product.remaining <= 0) return "sold_out";
  return "open";
}

export function isOver(state) {
  return ENDED_STATES.has(state.drop.state);
}

/** Seconds to show in "starts in", or null: only before the drop is on air (a
 * creator may go live before `starts_at`). */
export function countdown(state, now = Date.now()) {
  if (state.unavailable || ![DropState.DRAFT, DropState.SCHEDULED].includes(state.drop.state)) {
    return null;
  }
  const secs = secondsUntil(state.drop.startsAt, now);
  return secs === null || secs <= 0 ? null : secs;
}

/** Whether the page should run the player: only while the stream is on air (live,
 * or its publisher reconnecting), so a page opened early requests no playlist. */
export function wantsPlayer(state) {
  return !state.unavailable && (state.stream.status === "live"
    || state.stream.status === "reconnecting");
}

/** Whole seconds from `now` (ms) to an ISO time or epoch seconds/ms; never negative. */
export function secondsUntil(when, now = Date.now()) {
  if (when === null || when === undefined || when === "") return null;
  let ms;
  if (typeof when === "number") ms = when < 1e12 ? when * 1000 : when;
  else ms = Date.parse(when);
  if (Number.isNaN(ms)) return null;
  return Math.max(0, Math.ceil((ms - now) / 1000));
}

export function formatClock(seconds) {
  if (seconds === null) return "";
  if (seconds >= 86400) { // weeks ahead: "12d 03:04:05", not "291:04:05"
    const rest = seconds % 86400;
    const hms = [Math.floor(rest / 3600), Math.floor((rest % 3600) / 60), rest % 60];
    return `${Math.floor(seconds / 86400)}d ${hms.map((n) => String(n).padStart(2, "0")).join(":")}`;
  }
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0");
  const ss = String(s).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

/** Minor units -> "$12.50" with Intl (falls back to "12.50 USD"). */
/** Minor units per major unit of `currency` (100 for usd, 1 for jpy): money inputs in
 * major units (4.99) become the API's integer minor units (499). */
export function minorPerMajor(currency) {
  try {
    const fmt = new Intl.NumberFormat("en", { style: "currency",
      currency: String(currency || "usd").toUpperCase() });
    return 10 ** fmt.resolvedOptions().maximumFractionDigits;
  } catch {
    return 100;
  }
}

export function formatMoney(amount, currency = "usd") {
  if (amount === null || amount === undefined) return "";
  const cur = String(currency || "usd").toUpperCase();
  try {
    const fmt = new Intl.NumberFormat(undefined, { style: "currency", currency: cur });
    const digits = fmt.resolvedOptions().maximumFractionDigits;
    return fmt.format(Number(amount) / 10 ** digits);
  } catch {
    return `${(Number(amount) / 100).toFixed(2)} ${cur}`;
  }
}
