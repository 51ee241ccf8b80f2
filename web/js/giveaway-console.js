// The console's giveaway panel: open a giveaway (the selected product or a prize in
// text, winners, window, eligibility) and watch it: entrants live, the countdown,
// the winners. POST /v1/drops/{id}/giveaways (docs/http-api.md, "Giveaways").

import { fetchJson } from "./api.js";
import { phase, reduceGiveaway, secondsLeft } from "./giveaway-state.js";
import { formatClock } from "./viewer-state.js";

const $ = (id) => document.getElementById(id);

/**
 * Mount the panel (`#giveaway-panel` of console.html). `drop()` and `token()` give the
 * open drop and the creator's token; `log(text)` writes to the console's event log.
 */
export function mountGiveawayConsole({ drop, token, log }) {
  let g = null;

  function dispatch(event, data) {
    g = reduceGiveaway(g, event, data);
    window.__consoleGiveaway = g; // tests and debugging
    render();
  }

  function render() {
    const d = drop();
    $("gw-open-btn").disabled = !d || (g !== null && !g.drawn);
    const status = $("gw-status");
    if (!g) {
      status.textContent = "No giveaway yet.";
      $("gw-console-winners").replaceChildren();
      return;
    }
    const p = phase(g);
    status.dataset.phase = p;
    status.textContent = p === "open"
      ? `${g.prize}: ${g.entries} entered, ends in ${formatClock(secondsLeft(g))}`
      : p === "closing" ? `${g.prize}: ${g.entries} entered, drawing…`
        : `${g.prize}: drawn among ${g.entries} ${g.entries === 1 ? "entrant" : "entrants"}`;
    $("gw-console-winners").replaceChildren(...g.results.map((w) => {
      const li = document.createElement("li");
      li.textContent = `${w.name || "a viewer"} (ticket ${w.ticket.slice(0, 10)}…)`;
      return li;
    }));
  }

  function showError(err) {
    const el = $("gw-console-error");
    el.hidden = !err;
    el.textContent = err ? err.message : "";
    if (err) log(`giveaway: ${err.code ? `${err.code}: ` : ""}${err.message}`);
  }

  async function open(ev) {
    ev.preventDefault();
    const d = drop();
    if (!d) return;
    showError(null);
    const prize = $("gw-prize-input").value.trim();
    const body = {
      winners: Number($("gw-winners-input").value) || 1,
      duration_s: Number($("gw-seconds-input").value) || 60,
      must_be_present: $("gw-present-input").checked,
      must_have_bought: $("gw-bought-input").checked,
    };
    if (prize) body.prize = prize;
    else body.product_id = Number($("product-select").value);
    try {
      const created = await fetchJson(`/v1/drops/${d.id}/giveaways`,
        { method: "POST", token: token(), body });
      dispatch("giveaway.resource", created);
      log(`giveaway #${created.id} opened: ${created.prize}`);
    } catch (err) {
      showError(err);
    }
  }

  async function refresh() {
    const d = drop();
    if (!d) return;
    const body = await fetchJson(`/v1/drops/${d.id}/giveaways`);
    const latest = (body?.giveaways || []).at(-1);
    g = null;
    if (latest) dispatch("giveaway.resource", latest);
    else render();
  }

  $("gw-form").addEventListener("submit", open);
  setInterval(() => { if (g && !g.drawn) render(); }, 250);
  render();

  return {
    onDropOpened() { refresh().catch((err) => showError(err)); },
    onEvent(event, data) {
      if (!event.startsWith("giveaway.")) return;
      dispatch(event, data);
      if (event === "giveaway.drawn") log(`giveaway #${data.giveaway_id} drawn`);
    },
  };
}
