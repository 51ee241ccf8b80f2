// The creator HTTP API as the console uses it (docs/http-api.md, "Drops", "Auctions").

import { fetchJson } from "./api.js";

// console action -> path segment under /v1/drops/{id}/
const ACTIONS = Object.freeze({
  schedule: "schedule",
  go_live: "go-live",
  pin: "pin",
  buy_now: "buy-now",
  close: "close",
  end: "end", // also closes the replay's sales
  sell_replay: "replay-sales", // after the end: what is left sells on the replay
});

export function createDrop(body, token) {
  return fetchJson("/v1/drops", { method: "POST", token, body });
}

export function getDrop(id, token) {
  return fetchJson(`/v1/drops/${id}`, { token });
}

/**
 * The drop resource to keep: `incoming` unless `current` is the same drop at a
 * later version. Answers to requests sent at different moments can arrive out of
 * order (a GET sent on an old `drop.state` event, after a newer POST's answer);
 * every change bumps `version`, so the older one is dropped.
 */
export function fresher(current, incoming) {
  if (!incoming) return current;
  if (current && current.id === incoming.id && (current.version ?? 0) > (incoming.version ?? 0)) {
    return current;
  }
  return incoming;
}

export function getStats(id, token) {
  return fetchJson(`/v1/drops/${id}/stats`, { token });
}

export function action(id, name, token, body = {}) {
  const seg = ACTIONS[name];
  if (!seg) throw new Error(`unknown action ${name}`);
  return fetchJson(`/v1/drops/${id}/${seg}`, { method: "POST", token, body });
}

export function startAuction(id, body, token) {
  return fetchJson(`/v1/drops/${id}/auctions`, { method: "POST", token, body });
}

export function listAuctions(id, token) {
  return fetchJson(`/v1/drops/${id}/auctions`, { token });
}

export function secondChance(id, auctionId, token) {
  return fetchJson(`/v1/drops/${id}/auctions/${auctionId}/second-chance`,
    { method: "POST", token, body: {} });
}
