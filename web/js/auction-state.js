// Auctions on the pages (pure, no I/O): each auction of the drop from the HTTP list
// and the auction.* events, the server's clock offset, the next bid amounts, the
// bidder's own feedback. docs/protocol.md, "Auction events".
//
// Every auction event carries `server_time`; `offsetMs = server_time - now` when it
// arrives, and a countdown is `ends_at - (now + offsetMs)`, so a viewer whose clock
// is off still sees the server's end. Events carry `seq` (the bids so far): a state
// read over HTTP and the events merge by keeping the higher `seq`.

export function initialAuctions() {
  return { byId: {}, offsetMs: null, me: null };
}

/** "0:100,5000:500" or [{from, step}] -> [[from, step], ...] ascending. */
export function parseIncrements(value) {
  if (Array.isArray(value)) return value.map((b) => [Number(b.from), Number(b.step)]);
  return String(value || "").split(",").filter(Boolean)
    .map((part) => part.split(":").map(Number));
}

export function stepAt(increments, price) {
  let step = 1;
  for (const [from, s] of increments) if (price >= from) step = s;
  return step;
}

/** The next `count` amounts a bidder may tap: the minimum, then one increment more each. */
export function nextAmounts(auction, count = 3) {
  if (!auction || auction.nextMin == null) return [];
  const out = [auction.nextMin];
  while (out.length < count) {
    const last = out[out.length - 1];
    out.push(last + stepAt(auction.increments, last));
  }
  return out;
}

/** Seconds left by the server's clock (null without an end). */
export function secondsLeft(state, auction, now) {
  if (!auction || auction.endsAt == null) return null;
  const serverNow = now + (state.offsetMs ?? 0);
  return Math.max(0, (auction.endsAt - serverNow) / 1000);
}

/** The auction the page shows: a running one (the newest), else the newest closed. */
export function currentAuction(state) {
  const all = Object.values(state.byId).sort((a, b) => b.id - a.id);
  return all.find((a) => a.state === "running") || all[0] || null;
}

function withAuction(state, id, patch) {
  const key = String(id);
  const prev = state.byId[key] || { id: Number(id), productId: null, state: "running",
    currency: "usd", startPrice: null, increments: [[0, 1]], hasReserve: false,
    endsAt: null, nextMin: null, bids: 0, leading: null, outcome: null, extended: false,
    mine: null };
  return { ...state, byId: { ...state.byId, [key]: { ...prev, ...patch } } };
}

function fromResource(a) {
  return {
    productId: a.product_id, state: a.state, currency: a.currency,
    startPrice: a.start_price, increments: parseIncrements(a.increments),
    hasReserve: !!a.has_reserve, endsAt: a.ends_at, nextMin: a.next_min, bids: a.bids,
    leading: a.leading ? { amount: a.leading.amount, bidder: a.leading.bidder ?? "",
      bidderId: a.leading.bidder_id, seq: a.leading.seq } : null,
    outcome: a.outcome,
  };
}

/**
 * One step: `event` is an auction event (`auction.started`, `auction.bid`,
 * `auction.closed`, private `auction.outbid` / `auction.won` / `auction.offer`), the
 * HTTP list (`auctions.list`), or the bidder's own (`me`, `bid.sent`, `bid.accepted`,
 * `bid.rejected`). `now`: Date.now() when it arrived.
 */
export function reduceAuctions(state, event, data = {}, now = Date.now()) {
  let s = state;
  if (typeof data.server_time === "number") s = { ...s, offsetMs: data.server_time - now };
  switch (event) {
    case "me":
      return { ...s, me: data.user_id ?? null };
    case "auctions.list": {
      for (const a of data.auctions || []) {
        const prev = s.byId[String(a.id)];
        // An event newer than this answer wins (a bid may have come meanwhile).
        if (prev && (prev.bids > a.bids || (prev.state === "closed" && a.state !== "closed"))) {
          continue;
        }
        s = withAuction(s, a.id, fromResource(a));
      }
      return s;
    }
    case "auction.started":
      return withAuction(s, data.auction_id, {
        productId: data.product_id, state: "running", currency: data.currency,
        startPrice: data.start_price, increments: parseIncrements(data.increments),
        hasReserve: !!data.has_reserve, endsAt: data.ends_at, nextMin: data.next_min,
        bids: 0, leading: null, outcome: null,
      });
    case "auction.bid": {
      const prev = s.byId[String(data.auction_id)];
      if (prev && prev.bids >= data.seq) return s; // older than what we show
      const mine = prev?.mine && s.me && data.bidder_id !== s.me && prev.mine === "leading"
        ? "outbid" : data.bidder_id === s.me ? "leading" : prev?.mine ?? null;
      return withAuction(s, data.auction_id, {
        productId: data.product_id ?? prev?.productId, bids: data.seq,
        leading: { amount: data.amount, bidder: data.bidder, bidderId: data.bidder_id,
          seq: data.seq },
        endsAt: data.ends_at, nextMin: data.next_min, extended: !!data.extended, mine,
      });
    }
    case "auction.closed": {
      const prev = s.byId[String(data.auction_id)];
      const leading = data.amount == null ? prev?.leading ?? null
        : { amount: data.amount, bidder: data.leader, bidderId: data.leader_id,
          seq: data.bids };
      let mine = prev?.mine ?? null;
      if (s.me && data.leader_id === s.me) mine = data.outcome === "sold" ? "won" : "lost";
      else if (mine) mine = "lost";
      return withAuction(s, data.auction_id, {
        productId: data.product_id ?? prev?.productId, state: "closed",
        outcome: data.outcome, endsAt: data.ends_at, bids: data.bids ?? prev?.bids ?? 0,
        leading, mine,
      });
    }
    case "auction.outbid":
      return withAuction(s, data.auction_id, { mine: "outbid", error: null });
    case "auction.won":
      return withAuction(s, data.auction_id, { mine: "won", holdId: data.hold_id });
    case "auction.offer":
      return withAuction(s, data.auction_id, { mine: "offered", holdId: data.hold_id,
        offerAmount: data.amount });
    case "bid.sent":
      return withAuction(s, data.auction_id, { pending: data.amount, error: null });
    case "bid.accepted": {
      const prev = s.byId[String(data.auction_id)];
      let next = withAuction(s, data.auction_id, { pending: null, error: null,
        mine: "leading" });
      if (!prev || prev.bids < data.seq) {
        next = withAuction(next, data.auction_id, {
          bids: data.seq, endsAt: data.ends_at, nextMin: data.next_min,
          leading: { amount: data.amount, bidder: "you", bidderId: s.me, seq: data.seq },
        });
      }
      return next;
    }
    case "bid.rejected": {
      const patch = { pending: null, error: data.code || "error" };
      if (data.details?.min_amount) patch.nextMin = data.details.min_amount;
      if (data.code === "auction_closed") patch.state = "closed";
      return withAuction(s, data.auction_id, patch);
    }
    default:
      return s;
  }
}

const OUTCOME_TEXT = {
  sold: "Sold",
  reserve_not_met: "Reserve not met: no sale",
  no_bids: "No bids",
  no_stock: "No unit left",
};

/** The headline under the auction, for the viewer. */
export function statusText(auction) {
  if (!auction) return "";
  if (auction.state === "closed") {
    if (auction.mine === "won") return "You won! Pay to keep it.";
    const base = OUTCOME_TEXT[auction.outcome] || "Ended";
    return auction.outcome === "sold" && auction.leading
      ? `${base} to ${auction.leading.bidder}` : base;
  }
  if (auction.mine === "outbid") return "You were outbid";
  if (auction.mine === "leading") return "You're the highest bidder";
  if (auction.error === "bid_too_low") return "Someone bid first: try the next amount";
  return auction.leading ? `${auction.leading.bidder} leads` : "No bids yet";
}
