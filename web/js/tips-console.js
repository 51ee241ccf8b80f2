// The console's tips panel: the amounts viewers may tip (POST /v1/drops/{id}/tip-amounts)
// and the totals (GET /v1/drops/{id}/tips, the creator's view), refreshed when the room
// hears a `tip` (docs/http-api.md, "Tips").

import { fetchJson } from "./api.js";
import { formatMoney, minorPerMajor } from "./viewer-state.js";

const $ = (id) => document.getElementById(id);

/**
 * Mount the panel (`#tips-panel` of console.html). `drop()` and `token()` give the open
 * drop and the creator's token; `log(text)` writes to the console's event log.
 */
export function mountTipsConsole({ drop, token, log }) {
  let view = null; // the last GET /v1/drops/{id}/tips

  function render() {
    const t = view?.totals;
    const cur = view?.currency || drop()?.currency || "usd";
    $("tips-count").textContent = t ? String(t.count) : "0";
    $("tips-net").textContent = formatMoney(t ? t.net : 0, cur);
    $("tips-top").replaceChildren(...(t?.top || []).map((p) => {
      const li = document.createElement("li");
      li.textContent = `${p.name || p.user_id} · ${formatMoney(p.amount, cur)}`;
      return li;
    }));
    window.__consoleTips = view; // tests and debugging
  }

  function showError(err) {
    const el = $("tips-error");
    el.hidden = !err;
    el.textContent = err ? err.message : "";
  }

  async function refresh() {
    const d = drop();
    if (!d) return;
    view = await fetchJson(`/v1/drops/${d.id}/tips`, { token: token() });
    const per = minorPerMajor(view.currency);
    if (document.activeElement !== $("tips-amounts-input")) {
      $("tips-amounts-input").value = view.amounts.map((a) => a / per).join(", ");
    }
    render();
  }

  async function save(ev) {
    ev.preventDefault();
    const d = drop();
    if (!d) return;
    showError(null);
    const per = minorPerMajor(view?.currency || d.currency || "usd");
    const raw = $("tips-amounts-input").value.split(",").map((x) => x.trim()).filter(Boolean);
    const amounts = raw.map((x) => Math.round(Number(x) * per));
    if (amounts.some((a) => !Number.isFinite(a) || a < 1)) {
      showError(new Error("amounts are positive numbers, like 2, 5, 10"));
      return;
    }
    try {
      const body = await fetchJson(`/v1/drops/${d.id}/tip-amounts`,
        { method: "POST", token: token(), body: { amounts } });
      log(`tips: ${body.amounts.length ? body.amounts.map((a) => formatMoney(a, body.currency)).join(", ") : "off"}`);
      await refresh();
    } catch (err) {
      showError(err);
    }
  }

  $("tips-form").addEventListener("submit", save);
  render();

  return {
    onDropOpened() { view = null; render(); refresh().catch((err) => showError(err)); },
    onEvent(event, data) {
      if (event !== "tip") return;
      log(`tip ${formatMoney(data.amount, data.currency)} from ${data.name || data.user_id}`);
      refresh().catch((err) => showError(err));
    },
  };
}
