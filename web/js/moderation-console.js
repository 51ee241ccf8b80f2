// The console's "Chat and moderators" panel: the drop's chat with each message's
// tools (pin, delete, mute or ban its author) and a field to write in it, slow mode,
// the pinned chat message, the creator's moderators (appoint, dismiss), the drop's
// moderation log (who did what, when; a mute or ban still in force can be lifted), and
// how many viewers asked to be reminded. Text from the server is rendered with
// textContent.

import { fetchJson } from "./api.js";
import { chatItem } from "./chat-view.js";
import { initialState, reduce } from "./viewer-state.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000;
const MUTE_SECONDS = 600;
// The room events the console's chat list follows (viewer-state.js reduces them).
const CHAT_EVENTS = new Set(["chat.message", "chat.deleted", "chat.pinned", "chat.unpinned",
  "tip"]);

/** Whether a log entry is a mute or ban still in force (it gets a Lift button). */
export function inForce(a, now = Date.now()) {
  return (a.action === "mute" || a.action === "ban") && !a.lifted_at
    && (!a.expires_at || Date.parse(a.expires_at) > now);
}

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
  let room = initialState(null); // the chat as the console's socket heard it
  let renderedChat = null;
  window.__consoleChat = () => room.chat; // tests and debugging

  function button(label, action, onClick, cls = "mod") {
    const b = document.createElement("button");
    b.type = "button";
    b.className = cls;
    b.dataset.mod = action;
    b.textContent = label;
    b.addEventListener("click", onClick);
    return b;
  }

  /** A message's tools: Pin and Delete; a viewer's also Mute and Ban of its author. */
  function tools(m) {
    const out = [
      button("Pin", "pin", () => act("pin", "chat.pin", { message_id: m.id })),
      button("Delete", "delete", () => act("delete", "chat.delete", { message_id: m.id }))];
    if (!m.role && m.userId) {
      out.push(
        button("Mute", "mute", () => act(`mute ${m.name}`, "chat.mute",
          { user_id: m.userId, seconds: MUTE_SECONDS })),
        button("Ban", "ban", () => act(`ban ${m.name}`, "chat.ban", { user_id: m.userId })));
    }
    return out;
  }

  /** The chat list: every message with Pin and Delete; a viewer's (not the staff's:
   * `role`) also with Mute (10 minutes, this drop) and Ban (every drop of the creator,
   * until lifted). A tip is shown, not moderated. */
  function renderChat() {
    if (renderedChat === room.chat) return;
    const list = $("console-chat");
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.replaceChildren(...room.chat.map((m) => chatItem(m, tools)));
    renderedChat = room.chat;
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  /** A moderation command over the console's socket; the log is read again after it. */
  async function act(what, type, data) {
    $("console-chat-status").textContent = "";
    try {
      const reply = await command(type, data);
      const done = { mute: "muted for 10 minutes", ban: "banned until lifted" }[type.slice(5)];
      if (done) $("console-chat-status").textContent = `${data.user_id} ${done}`;
      log(`${what}${done ? `: ${done}` : ""}`);
      await refresh();
      return reply;
    } catch (err) {
      $("console-chat-status").textContent = `${what}: ${err.message}`;
      showError(err);
      return null;
    }
  }

  async function send(ev) {
    ev.preventDefault();
    const input = $("console-chat-input");
    const text = input.value.trim();
    if (!text) return;
    try {
      await command("chat.send", { text });
      input.value = "";
    } catch (err) {
      showError(err);
    }
  }

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
        if (inForce(a)) {
          li.append(button("Lift", "unban", () => act(`lift ${a.action} of ${a.user_id}`,
            "chat.unban", { user_id: a.user_id }), "link"));
        }
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
  $("console-chat-form").addEventListener("submit", send);
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
        $("console-chat-status").textContent = "";
        showPinned(null);
        room = initialState(d?.id ?? null);
        renderChat();
        shownFor = d?.id ?? null;
      }
      clearInterval(timer);
      timer = setInterval(refresh, REFRESH_MS);
      refresh();
    },
    onJoined(snapshot) {
      if (!snapshot) return; // resumed: the events missed were replayed
      room = reduce(initialState(drop()?.id ?? null), "snapshot", snapshot);
      renderChat();
      showPinned(snapshot.chat_pinned ?? null);
      if (typeof snapshot.chat_slow_seconds === "number") {
        $("console-slow").value = String(snapshot.chat_slow_seconds);
      }
    },
    onEvent(event, data) {
      if (CHAT_EVENTS.has(event)) {
        room = reduce(room, event, data);
        renderChat();
      }
      if (event === "chat.pinned") showPinned(data);
      else if (event === "chat.unpinned") showPinned(null);
      else if (event === "chat.slow") $("console-slow").value = String(data.seconds);
      if (event === "chat.pinned" || event === "chat.unpinned" || event === "chat.deleted"
        || event === "chat.slow") refresh();
    },
  };
}
