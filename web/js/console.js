// The creator's console: token, drop, its products and variants, camera preview + WHIP
// publishing, drop controls, auctions, giveaways, chat moderation and moderators, and
// live stats. Text from the server is rendered with
// textContent.

import { fetchJson, loadConfig, tokenFromFragment } from "./api.js";
import { initialAuctions, reduceAuctions, secondsLeft } from "./auction-state.js";
import { DropClient } from "./client.js";
import * as creator from "./creator-api.js";
import { mountGiveawayConsole } from "./giveaway-console.js";
import { mountTipsConsole } from "./tips-console.js";
import { mountModerationConsole } from "./moderation-console.js";
import { mountProductsConsole } from "./products-console.js";
import { formatMoney } from "./viewer-state.js";
import { WhipPublisher } from "./whip.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "dropserver.creator_token";
const PINNABLE = new Set(["scheduled", "live", "selling", "sold_out", "closed"]);
// Go live from a draft: scheduled ui.goLiveSeconds (5) ahead, so viewers get a real
// countdown, then live when it runs out (docs/topics/lifecycle.md: every drop had a
// countdown viewers could join).
const NO_STATS = { viewers: 0, sold: 0, revenue: 0, currency: "usd", open_holds: 0,
  remaining: null };

const ui = {
  config: null,
  token: null,
  drop: null, // the drop resource from the HTTP API
  stats: { ...NO_STATS },
  client: null,
  stream: null,
  publisher: null,
  statsTimer: null,
  statsShown: 0, // stats answers shown (tests wait for fresh ones instead of sleeping)
  goLive: null, // {dropId, at (ms), timer} while a draft counts down to live
  goLiveSeconds: 5,
  auctions: initialAuctions(),
  giveaways: null, // the giveaway panel's hooks (giveaway-console.js)
  moderation: null, // the chat and moderators panel's hooks (moderation-console.js)
  products: null, // the products and variants panel's hooks (products-console.js)
};
window.__console = ui; // for tests and debugging

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(li);
  while ($("log").children.length > 200) $("log").lastElementChild.remove();
}

function showError(id, err) {
  const el = $(id);
  el.hidden = !err;
  el.textContent = err ? (err.message || String(err)) : "";
  if (err) log(`error: ${err.code ? `${err.code}: ` : ""}${err.message || err}`);
}

// --- rendering ----------------------------------------------------------------

function renderDrop() {
  const d = ui.drop;
  $("drop-label").textContent = d ? `· #${d.id} ${d.title}` : "";
  $("drop-state").textContent = d ? d.state : "-";
  $("drop-state").dataset.state = d ? d.state : "";
  const link = $("viewer-link");
  link.hidden = !d;
  if (d) link.href = `/d/${d.id}`;
  const sel = $("product-select");
  const current = sel.value;
  sel.replaceChildren(...(d?.products || []).map((p) => {
    const opt = document.createElement("option");
    opt.value = String(p.product_id ?? p.id);
    opt.textContent = `${p.title} · ${formatMoney(p.price, d.currency)} · ${p.units} units`;
    return opt;
  }));
  if (current && [...sel.options].some((o) => o.value === current)) sel.value = current;
  // the server says which creator actions are legal next (drop.allowed_actions)
  const allowed = new Set(d?.allowed_actions || []);
  if (allowed.has("schedule")) allowed.add("go_live"); // a draft: countdown, then live
  if (d && PINNABLE.has(d.state)) allowed.add("pin");
  const counting = ui.goLive !== null && ui.goLive.dropId === d?.id;
  for (const btn of document.querySelectorAll("[data-action]")) {
    const action = btn.dataset.action;
    btn.disabled = !d || (d.allowed_actions !== undefined && !allowed.has(action))
      || (counting && action !== "go_live");
  }
  renderGoLive();
  $("publish-btn").disabled = !d || !ui.stream;
  ui.products?.onDrop();
}

/** The Go live button: the countdown (and a way to cancel it) while there is one. */
function renderGoLive() {
  const counting = ui.goLive !== null && ui.goLive.dropId === ui.drop?.id;
  const goLive = document.querySelector("[data-action='go_live']");
  goLive.textContent = counting
    ? `Going live in ${Math.max(0, Math.ceil((ui.goLive.at - Date.now()) / 1000))}… (cancel)`
    : "Go live";
  if (counting) goLive.disabled = false;
}

function renderStats() {
  const s = ui.stats;
  $("stat-viewers").textContent = String(s.viewers ?? 0);
  $("stat-sold").textContent = String(s.sold ?? 0);
  $("stat-revenue").textContent = formatMoney(s.revenue ?? 0, s.currency || "usd");
  $("stat-holds").textContent = String(s.open_holds ?? 0);
  $("stat-remaining").textContent = s.remaining === null || s.remaining === undefined ? "-"
    : String(s.remaining);
}

function setConn(state) {
  $("conn").dataset.state = state;
  $("conn").textContent = state === "open" ? "connected" : state;
}

// --- token and drop ------------------------------------------------------------

async function useToken(token) {
  ui.token = token;
  showError("auth-error", null);
  try {
    const me = await fetchJson("/v1/me", { token });
    if (me.guest || (me.role !== "creator" && me.role !== "admin")) {
      throw new Error(`this token is for a ${me.role || "guest"}; a creator token is needed`);
    }
    localStorage.setItem(TOKEN_KEY, token);
    $("whoami").textContent = `signed in as ${me.name || me.user_id} (${me.role})`;
    log(`signed in as ${me.user_id}`);
    return true;
  } catch (err) {
    localStorage.removeItem(TOKEN_KEY);
    ui.token = null;
    $("whoami").textContent = "";
    showError("auth-error", err);
    return false;
  }
}

async function openDrop(id) {
  showError("drop-error", null);
  try {
    const drop = await creator.getDrop(id, ui.token);
    const another = ui.drop?.id !== drop.id;
    if (another) {
      ui.products.reset(); // nothing of the previous drop's products or edits
      cancelGoLive();
      ui.stats = { ...NO_STATS }; // nothing of the previous drop's numbers
      renderStats();
      ui.auctions = initialAuctions();
    }
    ui.drop = drop;
    history.replaceState(null, "", `/console?drop=${id}`);
    renderDrop();
    ui.giveaways.onDropOpened();
    ui.tips.onDropOpened();
    ui.moderation.onDropOpened();
    connectSocket();
    refreshStats();
    refreshAuctions();
    clearInterval(ui.statsTimer);
    ui.statsTimer = setInterval(refreshStats, 2000);
    log(`opened drop #${id} (${ui.drop.state})`);
  } catch (err) {
    showError("drop-error", err);
  }
}

async function createDrop(ev) {
  ev.preventDefault();
  showError("drop-error", null);
  try {
    const price = Math.round(Number($("new-price").value) * 100);
    const drop = await creator.createDrop({
      title: $("new-title").value.trim(),
      products: [{ title: $("new-product").value.trim(), price,
        units: Number($("new-units").value) }],
    }, ui.token);
    log(`created drop #${drop.id}`);
    $("create-details").open = false;
    await openDrop(drop.id);
  } catch (err) {
    showError("drop-error", err);
  }
}

async function refreshStats() {
  if (!ui.drop) return;
  const dropId = ui.drop.id;
  try {
    const { remaining, ...s } = await creator.getStats(dropId, ui.token);
    if (ui.drop?.id !== dropId) return; // another drop was opened meanwhile
    const sel = ui.drop.selling_product_id ?? ui.drop.pinned_product_id;
    ui.stats = { ...ui.stats, ...s,
      remaining: sel != null && remaining && remaining[sel] !== undefined ? remaining[sel]
        : ui.stats.remaining };
    renderStats();
    ui.statsShown += 1;
  } catch (err) {
    if (err.status !== 404) log(`stats: ${err.message}`);
  }
}

function connectSocket() {
  if (ui.client) ui.client.stop();
  ui.client = new DropClient({ url: ui.config.ws_path, dropId: ui.drop.id, token: ui.token,
    minDelayMs: ui.config.reconnect_min_ms, maxDelayMs: ui.config.reconnect_max_ms });
  ui.client.addEventListener("state", (e) => setConn(e.detail.state));
  ui.client.addEventListener("joined", (e) => {
    ui.moderation.onJoined(e.detail.data?.snapshot);
    // the drop's viewer count as of the join (this console is not one of them)
    const viewers = e.detail.data?.viewers;
    if (typeof viewers === "number") {
      ui.stats.viewers = viewers;
      renderStats();
    }
  });
  ui.client.addEventListener("event", (e) => {
    const { event, data } = e.detail;
    ui.giveaways.onEvent(event, data);
    ui.tips.onEvent(event, data);
    ui.moderation.onEvent(event, data);
    ui.products.onEvent(event, data);
    if (event.startsWith("auction.")) {
      auctionDispatch(event, data);
      if (event !== "auction.bid") log(`${event} ${JSON.stringify(data)}`);
      if (event === "auction.closed") refreshStats();
      return;
    }
    if (event === "viewers") {
      ui.stats.viewers = data.count;
      renderStats();
      return;
    }
    if (event === "stock") {
      const sel = ui.drop?.selling_product_id;
      if (sel != null && data.products && data.products[sel] !== undefined) {
        ui.stats.remaining = data.products[sel];
        renderStats();
      }
      return;
    }
    if (event.startsWith("drop.")) {
      log(`${event} ${JSON.stringify(data)}`);
      if (event === "drop.state" && ui.drop && (data.version ?? 0) > (ui.drop.version ?? 0)) {
        ui.drop = { ...ui.drop, state: data.state, version: data.version };
        renderDrop();
        // the full resource carries allowed_actions for the new state
        creator.getDrop(ui.drop.id, ui.token)
          .then((d) => { ui.drop = creator.fresher(ui.drop, d); renderDrop(); })
          .catch(() => {});
      }
      refreshStats();
    }
  });
  ui.client.start();
}

// --- auctions ------------------------------------------------------------------

function auctionDispatch(event, data) {
  ui.auctions = reduceAuctions(ui.auctions, event, data, Date.now());
  renderAuctions();
}

const OUTCOMES = { sold: "sold", reserve_not_met: "reserve not met", no_bids: "no bids",
  no_stock: "no unit left" };

function renderAuctions() {
  const list = Object.values(ui.auctions.byId).sort((a, b) => b.id - a.id);
  const currency = ui.drop?.currency || "usd";
  $("auction-list").replaceChildren(...list.map((a) => {
    const li = document.createElement("li");
    li.dataset.auction = String(a.id);
    li.dataset.state = a.state;
    const product = ui.drop?.products?.find((p) => p.product_id === a.productId);
    const lead = a.leading ? `${formatMoney(a.leading.amount, a.currency || currency)} by `
      + `${a.leading.bidder || a.leading.bidderId}` : "no bids";
    const when = a.state === "running"
      ? `${Math.ceil(secondsLeft(ui.auctions, a, Date.now()) ?? 0)} s left`
      : OUTCOMES[a.outcome] || "ended";
    li.textContent = `#${a.id} ${product?.title || `product ${a.productId}`}: ${lead}, `
      + `${a.bids} bid${a.bids === 1 ? "" : "s"}, ${when}`;
    if (a.state === "closed" && a.outcome === "sold") {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "Offer to runner-up";
      b.title = "when the winner did not pay within the hold";
      b.addEventListener("click", () => offerSecondChance(a.id));
      li.append(" ", b);
    }
    return li;
  }));
}

async function startAuction(ev) {
  ev.preventDefault();
  showError("auction-error", null);
  if (!ui.drop) return;
  const cents = (id) => Math.round(Number($(id).value) * 100);
  const body = {
    product_id: Number($("product-select").value),
    start_price: cents("auction-start"),
    increment: cents("auction-increment"),
    duration_s: Number($("auction-duration").value),
    snipe_window_s: Number($("auction-snipe").value),
  };
  if ($("auction-reserve").value) body.reserve_price = cents("auction-reserve");
  try {
    const a = await creator.startAuction(ui.drop.id, body, ui.token);
    log(`auction #${a.id} started, ends in ${Math.round(a.duration_ms / 1000)} s`);
    auctionDispatch("auctions.list", { auctions: [a], server_time: a.server_time });
  } catch (err) {
    showError("auction-error", err);
  }
}

async function offerSecondChance(auctionId) {
  showError("auction-error", null);
  try {
    const offer = await creator.secondChance(ui.drop.id, auctionId, ui.token);
    log(`auction #${auctionId}: offered to ${offer.bidder || offer.user_id} at `
      + `${formatMoney(offer.amount, ui.drop.currency)}`);
  } catch (err) {
    showError("auction-error", err);
  }
}

function refreshAuctions() {
  if (!ui.drop) return;
  const dropId = ui.drop.id;
  creator.listAuctions(dropId, ui.token).then((body) => {
    if (ui.drop?.id === dropId) auctionDispatch("auctions.list", body);
  }).catch((err) => log(`auctions: ${err.message}`));
}

// --- drop controls -------------------------------------------------------------

function cancelGoLive() {
  if (!ui.goLive) return;
  clearInterval(ui.goLive.timer);
  ui.goLive = null;
  log("go live cancelled (the drop stays scheduled)");
  renderDrop();
}

/** Go live from a draft: schedule it ui.goLiveSeconds ahead (viewers see the
 * countdown), then go live when it runs out. Pressing again cancels. */
async function goLiveFromDraft() {
  const dropId = ui.drop.id;
  const at = Date.now() + ui.goLiveSeconds * 1000;
  const drop = await creator.action(dropId, "schedule", ui.token,
    { starts_at: new Date(at).toISOString() });
  ui.drop = creator.fresher(ui.drop, drop);
  log(`going live in ${ui.goLiveSeconds} s`);
  const timer = setInterval(() => {
    if (!ui.goLive || ui.goLive.timer !== timer) return;
    if (Date.now() < at) {
      renderGoLive();
      return;
    }
    clearInterval(timer);
    ui.goLive = null;
    control("go_live");
  }, 200);
  ui.goLive = { dropId, at, timer };
  renderDrop();
}

async function control(action) {
  if (!ui.drop) return;
  showError("control-error", null);
  const productId = Number($("product-select").value) || null;
  try {
    let drop;
    if (action === "go_live" && ui.goLive) {
      cancelGoLive();
      return;
    }
    if (action === "go_live" && ui.drop.state === "draft") {
      await goLiveFromDraft();
      return;
    }
    const body = ["pin", "buy_now"].includes(action) ? { product_id: productId } : {};
    drop = await creator.action(ui.drop.id, action, ui.token, body);
    if (!(drop && drop.id)) drop = await creator.getDrop(ui.drop.id, ui.token);
    ui.drop = creator.fresher(ui.drop, drop);
    log(`${action} -> ${ui.drop.state}`);
    renderDrop();
    refreshStats();
  } catch (err) {
    showError("control-error", err);
  }
}

// --- camera and WHIP -----------------------------------------------------------

async function startCamera() {
  showError("camera-error", null);
  try {
    if (ui.stream) {
      for (const t of ui.stream.getTracks()) t.stop();
      ui.stream = null;
      $("preview").srcObject = null;
      $("camera-btn").textContent = "Start camera";
      renderDrop();
      return;
    }
    ui.stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
      audio: true,
    });
    $("preview").srcObject = ui.stream;
    $("camera-btn").textContent = "Stop camera";
    log("camera on");
  } catch (err) {
    showError("camera-error", err);
  }
  renderDrop();
}

async function togglePublish() {
  showError("camera-error", null);
  if (ui.publisher) {
    await ui.publisher.stop();
    ui.publisher = null;
    $("publish-btn").textContent = "Publish";
    $("publish-state").textContent = "not publishing";
    log("publishing stopped");
    return;
  }
  if (!ui.stream || !ui.drop) return;
  const url = ui.config.whip_url_template.replace("{drop_id}", String(ui.drop.id));
  const pub = new WhipPublisher(url, ui.token);
  pub.addEventListener("state", (e) => {
    $("publish-state").textContent = e.detail.state === "connected" ? "publishing"
      : e.detail.state;
    $("publish-state").dataset.state = e.detail.state;
    console.info(`whip: ${e.detail.state}`);
    if (e.detail.state === "connected") log("publishing over WHIP");
  });
  $("publish-btn").disabled = true;
  try {
    await pub.start(ui.stream);
    ui.publisher = pub;
    $("publish-btn").textContent = "Stop publishing";
  } catch (err) {
    console.error(`whip: ${err.message}`);
    showError("camera-error", err);
    $("publish-state").textContent = "not publishing";
  } finally {
    $("publish-btn").disabled = false;
  }
}

// --- wiring ----------------------------------------------------------------------

async function main() {
  ui.config = await loadConfig();
  ui.giveaways = mountGiveawayConsole({ drop: () => ui.drop, token: () => ui.token, log });
  ui.tips = mountTipsConsole({ drop: () => ui.drop, token: () => ui.token, log });
  ui.products = mountProductsConsole({ drop: () => ui.drop, token: () => ui.token, log,
    saved: (drop) => {
      ui.drop = creator.fresher(ui.drop, drop);
      renderDrop();
    },
    reload: async () => {
      if (!ui.drop) return;
      const drop = await creator.getDrop(ui.drop.id, ui.token);
      ui.drop = creator.fresher(ui.drop, drop);
      renderDrop();
    } });
  ui.moderation = mountModerationConsole({ drop: () => ui.drop, token: () => ui.token, log,
    command: (type, data) => {
      if (!ui.client) throw new Error("open a drop first");
      return ui.client.command(type, data);
    } });
  renderDrop();
  renderStats();
  $("token-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = $("token-input").value.trim();
    if (t && await useToken(t)) $("token-input").value = "";
  });
  $("open-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = $("open-drop-id").value.trim();
    if (/^\d+$/.test(id)) openDrop(Number(id));
  });
  $("create-form").addEventListener("submit", createDrop);
  $("auction-form").addEventListener("submit", startAuction);
  setInterval(renderAuctions, 500);
  $("camera-btn").addEventListener("click", startCamera);
  $("publish-btn").addEventListener("click", togglePublish);
  for (const btn of document.querySelectorAll("[data-action]")) {
    btn.addEventListener("click", () => control(btn.dataset.action));
  }
  window.addEventListener("pagehide", () => { ui.publisher?.stop({ unloading: true }); });

  const token = tokenFromFragment(TOKEN_KEY);
  if (token && await useToken(token)) {
    const q = new URLSearchParams(location.search).get("drop");
    if (q && /^\d+$/.test(q)) await openDrop(Number(q));
  }
  document.body.dataset.ready = "1";
}

main().catch((err) => log(`error: ${err.message}`));
