// One chat message as a list item, shared by the viewer page and the console: the
// author's name, the text (always textContent, never innerHTML), a paid tip
// highlighted with its amount, and the staff's tools after it when given.

import { formatMoney } from "./viewer-state.js";

/** The <li> of message `m` (viewer-state.js's chat entry); `tools(m)` gives the
 * buttons to append (none for a tip or a message without an id). */
export function chatItem(m, tools = null) {
  const li = document.createElement("li");
  li.dataset.id = m.id ?? "";
  if (m.userId) li.dataset.user = m.userId;
  if (m.role) li.dataset.role = m.role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = m.name;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = m.text;
  if (m.tip) {
    li.className = "tip";
    const amount = document.createElement("span");
    amount.className = "tip-amount";
    amount.textContent = `tipped ${formatMoney(m.tip.amount, m.tip.currency)}`;
    li.append(who, amount, text);
    return li;
  }
  li.append(who, text);
  if (tools && m.id) li.append(...tools(m));
  return li;
}
