"""The pure drop state machine (drops/lifecycle.py): no Redis, no PostgreSQL."""

import itertools

import pytest

from drops.lifecycle import (
    PRODUCT_TRANSITIONS,
    TRANSITIONS,
    Action,
    DropState,
    IllegalTransition,
    ProductState,
    allowed_actions,
    product_transition,
    transition,
)

S, A = DropState, Action


def test_states_match_the_schema_check_constraint():
    from dropserver.db import migrations, schema_path

    schema = schema_path().read_text()
    check = ("CHECK (state IN ('draft', 'scheduled', 'live', 'selling',\n"
             "                                     'sold_out', 'closed', 'ended', 'settled'))")
    assert check in schema
    replay = next(m for m in migrations() if m.name.endswith("_replay_sales.sql")).sql
    assert ("CHECK (state IN ('draft', 'scheduled', 'live', 'selling', 'sold_out', 'closed',\n"
            "                     'ended', 'replay', 'settled'))") in replay
    assert [s.value for s in DropState] == [
        "draft", "scheduled", "live", "selling", "sold_out", "closed", "ended", "replay",
        "settled"]
    assert "CHECK (state IN ('pending', 'selling', 'sold_out', 'closed'))" in schema
    assert [p.value for p in ProductState] == ["pending", "selling", "sold_out", "closed"]


def test_happy_path_with_two_products():
    state = S.DRAFT
    for action, expected in [
        (A.SCHEDULE, S.SCHEDULED), (A.GO_LIVE, S.LIVE),
        (A.BUY_NOW, S.SELLING), (A.SOLD_OUT, S.SOLD_OUT),     # product 1 sells out
        (A.BUY_NOW, S.SELLING), (A.CLOSE, S.CLOSED),          # product 2 closed early
        (A.END, S.ENDED), (A.SETTLE, S.SETTLED),
    ]:
        state = transition(state, action)
        assert state is expected


def test_accepts_plain_strings():
    assert transition("draft", "schedule") is S.SCHEDULED


# Every pair not in the table is refused: the full cross product, not a sample.
ILLEGAL = [(s, a) for s, a in itertools.product(DropState, Action)
           if (s, a) not in TRANSITIONS]


@pytest.mark.parametrize(("state", "action"), ILLEGAL)
def test_every_other_pair_is_illegal(state, action):
    with pytest.raises(IllegalTransition) as info:
        transition(state, action)
    err = info.value
    assert err.status == 409
    assert err.code == "illegal_transition"
    assert err.details["from"] == state.value
    assert err.details["action"] == action.value
    assert err.details["allowed"] == [a.value for a in allowed_actions(state)]
    assert state.value in err.message and action.value in err.message


def test_illegal_count_is_the_complement_of_the_table():
    assert len(ILLEGAL) + len(TRANSITIONS) == len(DropState) * len(Action)
    assert len(TRANSITIONS) == 16


def test_skipping_steps_is_illegal():
    with pytest.raises(IllegalTransition) as info:
        transition(S.DRAFT, A.BUY_NOW)
    assert info.value.details["to"] == "selling"
    with pytest.raises(IllegalTransition):
        transition(S.DRAFT, A.GO_LIVE)        # must be scheduled first
    with pytest.raises(IllegalTransition):
        transition(S.SELLING, A.BUY_NOW)      # one product under BUY NOW at a time


def test_settled_is_terminal():
    assert allowed_actions(S.SETTLED) == []
    assert allowed_actions(S.ENDED) == [A.SELL_REPLAY, A.SETTLE]


def test_selling_on_the_replay_comes_after_the_end_and_before_settlement():
    """ended -> replay -> ended: only an ended drop sells on its replay, and a drop
    selling on its replay cannot be settled (its sales would escape the ledger)."""
    assert transition(S.ENDED, A.SELL_REPLAY) is S.REPLAY
    assert allowed_actions(S.REPLAY) == [A.END]
    assert transition(S.REPLAY, A.END) is S.ENDED
    for state in (S.LIVE, S.SELLING, S.CLOSED, S.SETTLED, S.REPLAY):
        with pytest.raises(IllegalTransition):
            transition(state, A.SELL_REPLAY)
    with pytest.raises(IllegalTransition):
        transition(S.REPLAY, A.SETTLE)
    P = ProductState
    assert product_transition(P.CLOSED, A.SELL_REPLAY, drop_state=S.ENDED,
                              product_id=1) is P.SELLING
    assert product_transition(P.SELLING, A.END, drop_state=S.REPLAY,
                              product_id=1) is P.CLOSED
    with pytest.raises(IllegalTransition):  # never dropped on the live
        product_transition(P.PENDING, A.SELL_REPLAY, drop_state=S.ENDED, product_id=1)


def test_every_state_is_reachable_from_draft():
    seen, frontier = {S.DRAFT}, [S.DRAFT]
    while frontier:
        state = frontier.pop()
        for (src, _act), dst in TRANSITIONS.items():
            if src is state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == set(DropState)


def test_product_machine():
    P = ProductState
    assert product_transition(P.PENDING, A.BUY_NOW, drop_state=S.LIVE, product_id=1) \
        is P.SELLING
    assert product_transition(P.SELLING, A.SOLD_OUT, drop_state=S.SELLING, product_id=1) \
        is P.SOLD_OUT
    assert product_transition(P.SOLD_OUT, A.RESTOCK, drop_state=S.SOLD_OUT, product_id=1) \
        is P.SELLING
    assert product_transition(P.SOLD_OUT, A.CLOSE, drop_state=S.SOLD_OUT, product_id=1) \
        is P.CLOSED
    # A product sells once: no BUY NOW again after it sold out or was closed.
    for done in (P.SOLD_OUT, P.CLOSED, P.SELLING):
        with pytest.raises(IllegalTransition) as info:
            product_transition(done, A.BUY_NOW, drop_state=S.CLOSED, product_id=7)
        assert info.value.details["product_id"] == 7
        assert "product 7" in info.value.message
    assert (P.PENDING, A.CLOSE) not in PRODUCT_TRANSITIONS


def test_edit_and_pin_are_state_checked():
    from drops.lifecycle import EDITABLE, PINNABLE, WrongState, require_state

    assert require_state("draft", EDITABLE, "edit") is S.DRAFT
    with pytest.raises(WrongState) as info:
        require_state(S.LIVE, EDITABLE, "edit")
    assert info.value.status == 409
    assert info.value.code == "wrong_state"
    assert info.value.details == {"state": "live", "operation": "edit",
                                  "allowed_states": ["draft", "scheduled"]}
    with pytest.raises(WrongState):
        require_state(S.DRAFT, PINNABLE, "pin")
    assert require_state(S.SOLD_OUT, PINNABLE, "pin") is S.SOLD_OUT
