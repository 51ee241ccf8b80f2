import assert from "node:assert/strict";
import test from "node:test";

import { draw, ticketOf, verifyDraw } from "../js/giveaway-verify.js";

// Computed by the server's own draw (drops/giveaway.py) for this seed and
// the tickets of viewer-0 .. viewer-11.
const SEED = "5f".repeat(32);
const COMMITMENT = "0ebe2fe703bb2c4235a5946026926bd4abe8ae48ad5920981ceb5d6df4bbe37a";
const TICKETS = [
  "0390906888baf365802caeb27bc44e10652c6ec9798ae8398d60ec43527ae640",
  "1a0adeedb8c1c6e35db592e5bb51adc08e9b8d4977a994f1886b8c9a14d73aed",
  "21b43fae7034ab9d7d9f4f4446d128c84ef036c0b87fd4aea11ac6aa9aeb4fc4",
  "4e8d9238ed2fb4c9d4322a43676d8b27f444635677df07ac198b0ca694896112",
  "6e50116364864e4f96b4bc11a8f33672685aeb9960161c6552cda40dfb192fc9",
  "78921074b39287c7e37176fa7b6455a4e37a1138bf8ac0fcc140270617a94640",
  "8ee546c3b4e1291173d8c7c90bfa7e06adfc489656dc73a6537acf764338456a",
  "ade2d33c682c7b6d0d3b5385207fb4e662c840a38a7fe6e5d0e1964edeea31f0",
  "b93a9f916139ebae23df80808ccf3a7d1ca488432cdfbe961965f251151fbadf",
  "bca53a3997a7fef9295cdf8ac55d262cf6a5bb30303d28cd6ee71005e9358231",
  "eec9e8b0cfa9956f3592cae94d8c5d466493034396d217336af00e1ef685796a",
  "f9cf9142f55914cac75fb82479ae6fbb1ee24325266f02adf2340243e8eb6455",
];
const WINNERS = [TICKETS[0], TICKETS[4], TICKETS[5]];

test("the browser's draw is the server's", async () => {
  assert.deepEqual(await draw(SEED, [...TICKETS].reverse(), 3), WINNERS);
  assert.equal(await ticketOf(SEED, "viewer-3"), TICKETS[6]);
});

test("verify: a matching draw, a wrong seed, other winners", async () => {
  const base = { seed: SEED, commitment: COMMITMENT, tickets: TICKETS, winners: 3 };
  assert.equal((await verifyDraw({ ...base, announced: WINNERS })).ok, true);
  const wrongSeed = await verifyDraw({ ...base, commitment: "00".repeat(32),
    announced: WINNERS });
  assert.equal(wrongSeed.ok, false);
  assert.match(wrongSeed.problem, /commitment/);
  const swapped = await verifyDraw({ ...base, announced: [WINNERS[1], WINNERS[0], WINNERS[2]] });
  assert.equal(swapped.ok, false);
  assert.deepEqual(swapped.expected, WINNERS);
});
