// A drop's giveaway as the pages show it, with no I/O: events in, a new state out.
//
// `reduceGiveaway(g, event, data, now)` takes the server's giveaway events
// (docs/protocol.md: "giveaway.opened", "giveaway.entries", "giveaway.drawn",
// "giveaway.won") plus the API's giveaway resource ("giveaway.resource") and the
// page's own ("enter.requested", "enter.done", "enter.refused"). `null` is "no
// giveaway". Tested with `node --test` (web/tests/).

export const GiveawayPhase = Object.freeze({
  OPEN: "open",
  CLOSING: "closing", // the window ended by the server's clock; the draw is coming
  DRAWN: "drawn",
});

function base(data, now) {
  const serverNow = data.server_time ?? null;
  return {
    id: Number(data.giveaway_id ?? data.id),
    prize: String(data.prize ?? ""),
    productId: data.product_id ?? null,
    winners: Number(data.winners ?? 1),
    commitment: String(data.commitment ?? ""),
    closesAtMs: Number(data.closes_at),
    // server clock - page clock, so the countdown follows the server's end time
    offsetMs: serverNow === null ? 0 : serverNow - now,
    entries: Number(data.entries ?? 0),
    drawn: false,
    seed: null,
    entrants: null,
    results: [],
    entered: false,
    entering: false,
    error: null,
    won: null, // {rank, orderId, prizeError} for this viewer
  };
}

function drawnFields(g, data) {
  const results = (data.winners && Array.isArray(data.winners) ? data.winners
    : data.results || []).map((w) => ({ rank: Number(w.rank), ticket: String(w.ticket),
    name: String(w.name ?? "") }));
  return { ...g, drawn: true, seed: String(data.seed ?? ""),
    entrants: Number(data.entrants ?? data.entries ?? 0),
    entries: Number(data.entrants ?? data.entries ?? g.entries), results };
}

export function reduceGiveaway(g, event, data = {}, now = Date.now()) {
  data = data || {};
  const sameId = g && Number(data.giveaway_id ?? data.id) === g.id;
  switch (event) {
    case "giveaway.opened":
      return base(data, now);

    case "giveaway.resource": {
      // GET /v1/drops/{id}/giveaways[/{gid}]: the latest one, open or drawn
      const next = sameId ? { ...g, entries: Math.max(g.entries, Number(data.entries ?? 0)) }
        : base(data, now);
      return data.state === "drawn" ? drawnFields(next, data) : next;
    }

    case "giveaway.entries":
      // processes publish their reads independently: the count never goes down
      if (!sameId) return g;
      return { ...g, entries: Math.max(g.entries, Number(data.entries ?? 0)) };

    case "giveaway.drawn":
      if (!g || !sameId) return drawnFields(base(data, now), data);
      return drawnFields(g, data);

    case "giveaway.won":
      if (!sameId) return g;
      return { ...g, won: { rank: Number(data.rank), orderId: data.order_id ?? null,
        prizeError: data.prize_error ?? null } };

    case "enter.requested":
      return g && { ...g, entering: true, error: null };

    case "enter.done":
      if (!g) return g;
      return { ...g, entering: false, entered: true,
        entries: Math.max(g.entries, Number(data.entries ?? 0)) };

    case "enter.refused":
      if (!g) return g;
      return { ...g, entering: false, entered: data.code === "already_entered",
        error: { code: String(data.code ?? "error"), message: String(data.message ?? "") } };

    default:
      return g;
  }
}

/** Whole seconds left in the entry window by the server's clock, or null. */
export function secondsLeft(g, now = Date.now()) {
  if (!g || g.drawn) return null;
  return Math.max(0, Math.ceil((g.closesAtMs - (now + g.offsetMs)) / 1000));
}

export function phase(g, now = Date.now()) {
  if (!g) return null;
  if (g.drawn) return GiveawayPhase.DRAWN;
  return secondsLeft(g, now) > 0 ? GiveawayPhase.OPEN : GiveawayPhase.CLOSING;
}

/** What the ENTER button says and whether it can be pressed. */
export function enterButton(g, now = Date.now()) {
  const p = phase(g, now);
  if (p !== GiveawayPhase.OPEN) return { text: p === GiveawayPhase.DRAWN ? "Drawn" : "Closed",
    enabled: false };
  if (g.entered) return { text: "You're in", enabled: false };
  if (g.entering) return { text: "Entering…", enabled: false };
  return { text: "ENTER", enabled: true };
}
