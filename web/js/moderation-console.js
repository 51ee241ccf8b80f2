// The console's "Chat and moderators" panel: slow mode, the pinned chat message, the
// creator's moderators (appoint, dismiss), the drop's moderation log (who did what,
// when), and how many viewers asked to be reminded. Text from the server is rendered
// with textContent.

import { fetchJson } from "./api.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000;

const ACTION_TEXT = {
  delete: "deleted a message of", mute: "muted", ban: "banned", unban: "lifted the ban of",
  slow: "set slow mode", pin: "pinned a message of", unpin: "unpinned a message of",
  appoint: "appointed moderator", dismiss: "dismissed moderator",
};

/** One line of the moderation log (GET /v1/drops/{id}/moderation). */
export function describe(a) {
  const when = a.at ? new Date(a.at).toLocaleTimeString() : "";
  const what = ACTION_TEXT[a.action] || a.action;
  let line = `${when} ${a.moderator_id} ${what}`;
  if (a.action === "slow") line += a.seconds ? ` to ${a.seconds} s` : " off";
  else if (a.user_id) line += ` ${a.user_id}`;
  if (a.reason) line += ` (${a.reason})`;
  return line.trim();
}

export function mountModerationConsole({ drop, token, command, log }) {
  let timer = null;
  let shownFor = null; // the drop id the panel shows

  function showError(err) {
    $("mod-error").hidden = !err;
    $("mod-error").textContent = err ? (err.message || String(err)) : "";
    if (err) log(`moderation: ${err.code ? `${err.code}: ` : ""}${err.message || err}`);
  }

  async function refresh() {
    const d = drop();
    if (!d || !token()) return;
    try {
      const [audit, mods, reminders] = await Promise.all([
        fetchJson(`/v1/drops/${d.id}/moderation?limit=50`, { token: token() }),
        fetchJson(`/v1/creators/${encodeURIComponent(d.creator_id)}/moderators`,
          { token: token() }),
        fetchJson(`/v1/drops/${d.id}/reminders`, { token: token() }),
      ]);
      if (drop()?.id !== d.id) return;
      $("mod-log").replaceChildren(...audit.actions.map((a) => {
        const li = document.createElement("li");
        li.dataset.kind = a.action;
        li.textContent = describe(a);
        return li;
      }));
      $("mod-list").replaceChildren(...mods.moderators.map((m) => {
        const li = document.createElement("li");
        const name = document.createElement("span");
        name.textContent = m.user_id;
        const b = document.createElement("button");
        b.type = "button";
        b.className = "link";
        b.textContent = "Dismiss";
        b.addEventListener("click", () => dismiss(m.user_id));
        li.append(name, b);
        return li;
      }));
      const sent = reminders.sent.reduce((n, s) => n + s.users, 0);
      $("reminder-count").textContent = `${reminders.reminded} asked to be reminded`
        + (sent ? ` · ${sent} reminders handed off` : "");
      showError(null);
    } catch (err) {
      showError(err);
    }
  }

  async function appoint(ev) {
    ev.preventDefault();
    const d = drop();
    const user = $("mod-user-input").value.trim();
    if (!d || !user) return;
    try {
      await fetchJson(`/v1/creators/${encodeURIComponent(d.creator_id)}/moderators/`
        + encodeURIComponent(user), { method: "PUT", token: token() });
      $("mod-user-input").value = "";
      log(`appointed moderator ${user}`);
      await refresh();
    } catch (err) {
      showError(err);
    }
  }

  async function dismiss(user) {
    const d = drop();
    if (!d) return;
    try {
      await fetchJson(`/v1/creators/${encodeURIComponent(d.creator_id)}/moderators/`
        + encodeURIComponent(user), { method: "DELETE", token: token() });
      log(`dismissed moderator ${user}`);
      await refresh();
    } catch (err) {
      showError(err);
    }
  }

  async function chat(type, data) {
    try {
      await command(type, data);
      await refresh();
    } catch (err) {
      showError(err);
    }
  }

  function showPinned(p) {
    $("console-pinned").hidden = !p;
    if (!p) return;
    $("console-pinned-name").textContent = String(p.name ?? p.user_id ?? "");
    $("console-pinned-text").textContent = String(p.text ?? "");
  }

  $("mod-form").addEventListener("submit", appoint);
  $("console-slow").addEventListener("change",
    () => chat("chat.slow", { seconds: Number($("console-slow").value) }));
  $("console-unpin").addEventListener("click", () => chat("chat.unpin", {}));

  return {
    onDropOpened() {
      const d = drop();
      if (shownFor !== d?.id) {
        $("mod-log").replaceChildren();
        $("mod-list").replaceChildren();
        $("reminder-count").textContent = "";
        showPinned(null);
        shownFor = d?.id ?? null;
      }
      clearInterval(timer);
      timer = setInterval(refresh, REFRESH_MS);
      refresh();
    },
    onJoined(snapshot) {
      if (!snapshot) return;
      showPinned(snapshot.chat_pinned ?? null);
      if (typeof snapshot.chat_slow_seconds === "number") {
        $("console-slow").value = String(snapshot.chat_slow_seconds);
      }
    },
    onEvent(event, data) {
      if (event === "chat.pinned") showPinned(data);
      else if (event === "chat.unpinned") showPinned(null);
      else if (event === "chat.slow") $("console-slow").value = String(data.seconds);
      if (event === "chat.pinned" || event === "chat.unpinned" || event === "chat.deleted"
        || event === "chat.slow") refresh();
    },
  };
}
