// Check a giveaway's draw in the browser, as the server's docs describe it
// (docs/topics/giveaways.md, "The draw, precisely"): the seed against its commitment,
// then the winners recomputed from the seed and the published tickets. Web Crypto
// only (crypto.subtle: HMAC-SHA256, SHA-256); nothing is taken on trust but the
// tickets list itself. Tested with `node --test` against the server's own draw.

const enc = new TextEncoder();

function hex(buf) {
  return [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function bytes(hexText) {
  const out = new Uint8Array(hexText.length / 2);
  for (let i = 0; i < out.length; i += 1) out[i] = parseInt(hexText.slice(2 * i, 2 * i + 2), 16);
  return out;
}

async function hmacKey(seed) {
  return crypto.subtle.importKey("raw", seed, { name: "HMAC", hash: "SHA-256" }, false,
    ["sign"]);
}

/** HMAC-SHA256(seed, userId), hex: a viewer's ticket. */
export async function ticketOf(seedHex, userId) {
  const key = await hmacKey(bytes(seedHex));
  return hex(await crypto.subtle.sign("HMAC", key, enc.encode(userId)));
}

const TWO_64 = 1n << 64n;

/** The winning tickets in rank order: the partial Fisher-Yates shuffle of the sorted
 * tickets, driven by HMAC-SHA256(seed, "draw" || counter), rejection sampling. */
export async function draw(seedHex, tickets, winners) {
  const key = await hmacKey(bytes(seedHex));
  const pool = [...new Set(tickets)].sort();
  let counter = 0n;
  async function uniform(bound) {
    const b = BigInt(bound);
    const limit = TWO_64 - (TWO_64 % b);
    for (;;) {
      const msg = new Uint8Array(12);
      msg.set(enc.encode("draw"), 0);
      new DataView(msg.buffer).setBigUint64(4, counter, false);
      counter += 1n;
      const block = new DataView(await crypto.subtle.sign("HMAC", key, msg));
      const x = block.getBigUint64(0, false);
      if (x < limit) return Number(x % b);
    }
  }
  const k = Math.min(winners, pool.length);
  for (let i = 0; i < k; i += 1) {
    const j = i + await uniform(pool.length - i);
    [pool[i], pool[j]] = [pool[j], pool[i]];
  }
  return pool.slice(0, k);
}

/** {ok, problem, expected}: whether the announced winners follow from the seed. */
export async function verifyDraw({ seed, commitment, tickets, winners, announced }) {
  const digest = hex(await crypto.subtle.digest("SHA-256", bytes(seed)));
  if (digest !== commitment) {
    return { ok: false, problem: "the seed does not match the commitment", expected: null };
  }
  const expected = await draw(seed, tickets, winners);
  const ok = expected.length === announced.length && expected.every((t, i) => t === announced[i]);
  return { ok, problem: ok ? "" : "the winners do not follow from the seed", expected };
}
