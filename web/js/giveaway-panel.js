// The viewer page's giveaway panel: the prize, the server-timed countdown, ENTER
// (the `giveaway.enter` command on the page's socket), the live entrant count, the
// winners and how to check the draw. State is giveaway-state.js (pure); text from the
// server is rendered with textContent.

import { fetchJson } from "./api.js";
import { enterButton, phase, reduceGiveaway, secondsLeft } from "./giveaway-state.js";
import { verifyDraw } from "./giveaway-verify.js";
import { formatClock } from "./viewer-state.js";

const $ = (id) => document.getElementById(id);

/**
 * Mount the panel (the `#giveaway` section of index.html). `command(type, data)` sends
 * a socket command (DropClient.command). Returns the hooks the page calls.
 */
export function mountGiveaways({ dropId, command }) {
  let g = null;

  function dispatch(event, data) {
    g = reduceGiveaway(g, event, data);
    window.__giveaway = g; // tests and debugging
    render();
  }

  function render() {
    const panel = $("giveaway");
    panel.hidden = !g;
    if (!g) return;
    const p = phase(g);
    panel.dataset.phase = p;
    $("gw-prize").textContent = g.prize;
    $("gw-winners").textContent = g.winners === 1 ? "1 winner" : `${g.winners} winners`;
    const left = secondsLeft(g);
    $("gw-timer").textContent = p === "open" ? `ends in ${formatClock(left)}`
      : p === "closing" ? "drawing…" : "drawn";
    $("gw-entries").textContent = `${g.entries.toLocaleString()} entered`;
    const btn = enterButton(g);
    $("gw-enter").textContent = btn.text;
    $("gw-enter").disabled = !btn.enabled;
    $("gw-enter").hidden = p === "drawn";
    $("gw-error").hidden = !g.error;
    $("gw-error").textContent = g.error ? g.error.message : "";
    const result = $("gw-result");
    result.hidden = p !== "drawn";
    if (p === "drawn") {
      result.textContent = g.won ? (g.won.prizeError
        ? `You won (#${g.won.rank})! The prize ran out of stock: the creator will be in touch.`
        : `You won (#${g.won.rank})!`)
        : g.results.length ? "The winners are drawn." : "Nobody entered.";
      result.dataset.won = g.won ? "1" : "";
    }
    const list = $("gw-winner-list");
    list.hidden = p !== "drawn" || g.results.length === 0;
    list.replaceChildren(...g.results.map((w) => {
      const li = document.createElement("li");
      li.textContent = `${w.name || "a viewer"} · ticket ${w.ticket.slice(0, 10)}…`;
      return li;
    }));
    $("gw-commitment").textContent = g.commitment;
    $("gw-seed-row").hidden = !g.drawn;
    $("gw-seed").textContent = g.seed || "";
    const base = `/v1/drops/${dropId}/giveaways/${g.id}`;
    $("gw-result-link").href = base;
    $("gw-entrants-link").href = `${base}/entrants`;
    $("gw-check").hidden = !g.drawn;
  }

  async function check() {
    // Recompute the winners in this browser from the seed and the published tickets.
    if (!g || !g.drawn) return;
    const out = $("gw-check-result");
    out.hidden = false;
    out.dataset.ok = "";
    out.textContent = "Checking…";
    try {
      const listed = await fetchJson(`/v1/drops/${dropId}/giveaways/${g.id}/entrants`);
      const res = await verifyDraw({ seed: listed.seed, commitment: g.commitment,
        tickets: listed.tickets, winners: listed.winners,
        announced: g.results.map((w) => w.ticket) });
      out.dataset.ok = res.ok ? "1" : "0";
      out.textContent = res.ok
        ? `Checked in your browser: the seed matches the commitment and the ${
          g.results.length === 1 ? "winner follows" : "winners follow"} from it and the ${
          listed.tickets.length.toLocaleString()} ${
          listed.tickets.length === 1 ? "ticket" : "tickets"}.`
        : `The check failed: ${res.problem}.`;
    } catch (err) {
      out.dataset.ok = "0";
      out.textContent = `Could not check: ${err.message}`;
    }
  }

  async function enter() {
    if (!g) return;
    dispatch("enter.requested");
    try {
      const reply = await command("giveaway.enter", { giveaway_id: g.id });
      dispatch("enter.done", reply);
    } catch (err) {
      dispatch("enter.refused", { code: err.code, message: err.message });
    }
  }

  async function refresh() {
    // the latest giveaway of the drop: one a viewer joining late should see
    const body = await fetchJson(`/v1/drops/${dropId}/giveaways`);
    const latest = (body?.giveaways || []).at(-1);
    if (latest) dispatch("giveaway.resource", latest);
  }

  $("gw-enter").addEventListener("click", enter);
  $("gw-check").addEventListener("click", check);
  setInterval(() => { if (g && !g.drawn) render(); }, 250);

  return {
    onJoined() { refresh().catch((err) => console.warn(err)); },
    onEvent(event, data) {
      if (event.startsWith("giveaway.")) dispatch(event, data);
    },
  };
}
