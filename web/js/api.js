// HTTP helpers shared by the pages: JSON fetch with the bearer token, page config,
// and where the tokens come from (URL fragment, localStorage, dev endpoint).

export class HttpError extends Error {
  constructor(status, code, message, details) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

/** fetch + JSON; non-2xx raises HttpError with the server's {error: {code, message}}. */
export async function fetchJson(path, { method = "GET", token = null, body, headers = {} } = {}) {
  const h = { accept: "application/json", ...headers };
  if (token) h.authorization = `Bearer ${token}`;
  if (body !== undefined) h["content-type"] = "application/json";
  const resp = await fetch(path, { method, headers: h,
    body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (!resp.ok) {
    const err = (json && json.error) || {};
    throw new HttpError(resp.status, err.code || "http_error",
      err.message || `${method} ${path}: HTTP ${resp.status}`, err.details);
  }
  return json;
}

const DEFAULT_CONFIG = {
  dev: false,
  ws_path: "/ws",
  hls_url_template: "/v1/drops/{drop_id}/hls/live.m3u8",
  whip_url_template: "/v1/drops/{drop_id}/whip",
  payment_gateway: "fake",
  stripe_publishable_key: "",
  reconnect_min_ms: 500,
  reconnect_max_ms: 5000,
};

export async function loadConfig() {
  try {
    return { ...DEFAULT_CONFIG, ...(await fetchJson("/v1/web/config")) };
  } catch {
    return { ...DEFAULT_CONFIG };
  }
}

/** A token from the URL fragment (#token=...), remembered in localStorage. */
export function tokenFromFragment(storageKey) {
  const frag = new URLSearchParams(location.hash.slice(1));
  const t = frag.get("token");
  if (t) {
    localStorage.setItem(storageKey, t);
    // keep the token out of the address bar, history and screenshots
    history.replaceState(null, "", location.pathname + location.search);
    return t;
  }
  return localStorage.getItem(storageKey);
}

function expired(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(b64));
    return typeof claims.exp === "number" && claims.exp * 1000 < Date.now() + 60000;
  } catch {
    return true;
  }
}

/** The viewer's token; in dev mode a fresh one comes from /v1/dev/token. */
export async function viewerToken(config) {
  const key = "dropserver.viewer_token";
  let token = tokenFromFragment(key);
  if (token && !expired(token)) return token;
  localStorage.removeItem(key);
  if (!config.dev) return null; // guests may watch; buying needs a sign-in
  try {
    const res = await fetchJson("/v1/dev/token?role=viewer");
    token = res.token;
    localStorage.setItem(key, token);
    return token;
  } catch {
    return null;
  }
}
