"""The giveaway draw (drops/giveaway.py): commitment, tickets, the shuffle, no bias."""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter

import pytest

from drops import giveaway
from drops.giveaway import _Stream

SEED = bytes.fromhex("00" * 31 + "01")


def test_commitment_is_sha256_of_the_seed():
    seed = giveaway.new_seed()
    assert len(seed) == 32
    assert giveaway.commitment(seed) == hashlib.sha256(seed).hexdigest()


def test_ticket_is_hmac_of_the_user_id():
    assert giveaway.ticket(SEED, "viewer-7") == hmac.new(
        SEED, b"viewer-7", hashlib.sha256).hexdigest()
    assert giveaway.ticket(SEED, "viewer-7") != giveaway.ticket(SEED, "viewer-8")


def test_draw_is_deterministic_and_ignores_input_order_and_duplicates():
    tickets = [giveaway.ticket(SEED, f"u{i}") for i in range(50)]
    first = giveaway.draw(SEED, tickets, 5)
    assert giveaway.draw(SEED, list(reversed(tickets)) + tickets[:3], 5) == first
    assert len(first) == 5 and len(set(first)) == 5 and set(first) <= set(tickets)
    assert giveaway.draw(giveaway.new_seed(), tickets, 5) != first  # 1 in ~2.5e8 to fail


def test_draw_matches_the_documented_algorithm_written_out():
    tickets = sorted(giveaway.ticket(SEED, f"u{i}") for i in range(10))

    def block(c: int) -> int:
        d = hmac.new(SEED, b"draw" + c.to_bytes(8, "big"), hashlib.sha256).digest()
        return int.from_bytes(d[:8], "big")

    pool, c = list(tickets), 0
    for i in range(3):
        bound = 10 - i
        while True:
            x = block(c)
            c += 1
            if x < 2**64 - 2**64 % bound:
                break
        j = i + x % bound
        pool[i], pool[j] = pool[j], pool[i]
    assert giveaway.draw(SEED, tickets, 3) == pool[:3]


def test_fewer_entrants_than_winners_all_win_and_none_is_none():
    assert sorted(giveaway.draw(SEED, ["b", "a"], 5)) == ["a", "b"]
    assert giveaway.draw(SEED, [], 3) == []
    with pytest.raises(ValueError):
        giveaway.draw(SEED, ["a"], 0)


def test_uniform_rejects_the_biased_tail():
    stream = _Stream(SEED)
    bound = 2**63 + 1  # half of all 64-bit values are rejected
    values = [stream.uniform(bound) for _ in range(200)]
    assert all(0 <= v < bound for v in values)
    # every rejection consumed a block: more blocks than values
    assert stream.counter > 200


def test_every_position_is_equally_likely():
    tickets = [f"{i:02x}" for i in range(6)]
    wins = Counter()
    for s in range(3000):
        seed = s.to_bytes(32, "big")
        wins[giveaway.draw(seed, tickets, 1)[0]] += 1
    # 500 expected each; 5 sigma is ~102
    assert all(abs(n - 500) < 110 for n in wins.values()), wins


def test_verify():
    seed = giveaway.new_seed()
    tickets = [giveaway.ticket(seed, f"u{i}") for i in range(20)]
    won = giveaway.draw(seed, tickets, 3)
    commit = giveaway.commitment(seed)
    assert giveaway.verify(seed.hex(), commit, tickets, 3, won).ok
    assert not giveaway.verify(seed.hex(), "0" * 64, tickets, 3, won).ok
    assert not giveaway.verify(seed.hex(), commit, tickets, 3, list(reversed(won))).ok


def test_the_vector_the_browser_check_is_held_to():
    """web/tests/giveaway-verify.test.js holds the page's Web Crypto draw to these
    values: they must stay the server's."""
    import re
    from pathlib import Path

    js = (Path(__file__).parents[1] / "web" / "tests" / "giveaway-verify.test.js").read_text()
    seed = bytes.fromhex("5f" * 32)
    tickets = re.findall(r'"([0-9a-f]{64})"', js.split("const TICKETS", 1)[1].split("];")[0])
    assert tickets == sorted(giveaway.ticket(seed, f"viewer-{i}") for i in range(12))
    assert f'"{giveaway.commitment(seed)}"' in js
    won = giveaway.draw(seed, tickets, 3)
    assert won == [tickets[0], tickets[4], tickets[5]]  # WINNERS in the JS test
