"""MSE selection: resolve raw values, and select() / Selector against a brute-force reference."""

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from climber.data.sequences import ResolvedStrategy, Selector, Strategy, resolve, select

ACTIONS = ("like", "play", "skip")  # dense ids 1, 2, 3
SCENARIOS = ("home", "search")  # dense ids 1, 2


def one_of_each_kind(length: int, window_s: int) -> list[Strategy]:
    return [
        Strategy("recent", "recency", length),
        Strategy("liked", "action", length, ("like", "play")),
        Strategy("search", "scenario", length, ("search",)),
        Strategy("day", "window", length, window_s=window_s),
        Strategy("pos", "positive", length),
    ]


def random_events(rng: np.random.Generator, n: int, max_gap: int = 3) -> SimpleNamespace:
    """One user's events: ts ascending with ties (gaps 0..max_gap), random action / scenario / label."""
    return SimpleNamespace(
        ts=1000 + np.cumsum(rng.integers(0, max_gap + 1, size=n)),
        action=rng.integers(1, len(ACTIONS) + 1, size=n).astype(np.int32),
        scenario=rng.integers(1, len(SCENARIOS) + 1, size=n).astype(np.int32),
        label=rng.integers(0, 2, size=n).astype(np.int8),
    )


def reference(r: ResolvedStrategy, ev, cut: int) -> list[int]:
    """What a strategy selects, spelled out event by event."""
    s = r.strategy
    matches = {
        "recency": lambda p: True,
        "action": lambda p: ev.action[p] in r.ids,
        "scenario": lambda p: ev.scenario[p] in r.ids,
        "window": lambda p: ev.ts[p] >= ev.ts[cut] - s.window_s,
        "positive": lambda p: ev.label[p] == 1,
    }[s.kind]
    keep = [p for p in range(cut) if matches(p)]
    return keep[max(0, len(keep) - s.length):]


def test_resolve_maps_raw_values_to_dense_ids():
    r = resolve(one_of_each_kind(8, 10), ACTIONS, SCENARIOS)
    assert [x.ids for x in r] == [(), (1, 2), (2,), (), ()]
    assert r[1].strategy.name == "liked"


@pytest.mark.parametrize("kind, values", [("action", ("love",)), ("scenario", ("feed",))])
def test_resolve_names_strategy_value_and_known_values(kind, values):
    with pytest.raises(ValueError) as e:
        resolve([Strategy("bad", kind, 4, values)], ACTIONS, SCENARIOS)
    msg = str(e.value)
    known = ACTIONS if kind == "action" else SCENARIOS
    assert "'bad'" in msg and repr(values[0]) in msg and ", ".join(known) in msg


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 60),
    length=st.integers(1, 12),
    window_s=st.integers(1, 20),
    cut_frac=st.floats(0, 1, exclude_max=True),
)
def test_select_matches_reference(seed, n, length, window_s, cut_frac):
    ev = random_events(np.random.default_rng(seed), n)
    cut = int(cut_frac * n)
    for r in resolve(one_of_each_kind(length, window_s), ACTIONS, SCENARIOS):
        assert select(r, ev, cut).tolist() == reference(r, ev, cut), r.strategy.kind


def test_selector_over_many_users_matches_select_per_user():
    """Batched selection over CSR users equals select() on each user alone, for every cut at once."""
    rng = np.random.default_rng(1)
    users = [random_events(rng, n) for n in (1, 7, 40, 120)]
    flat = SimpleNamespace(**{k: np.concatenate([getattr(u, k) for u in users]) for k in vars(users[0])})
    offsets = np.cumsum([0, *(len(u.ts) for u in users)])
    starts = np.concatenate([np.full(len(u.ts), o) for u, o in zip(users, offsets)])  # one row per event
    cuts = np.arange(offsets[-1])
    for r in resolve(one_of_each_kind(16, 9), ACTIONS, SCENARIOS):
        index, mask = Selector(r, flat).gather(starts, cuts)
        assert index.shape[1] <= 16
        for row, (start, cut) in enumerate(zip(starts, cuts)):
            expected = start + select(r, users[np.searchsorted(offsets, start, "right") - 1], cut - start)
            assert index[row][mask[row]].tolist() == expected.tolist()


def test_select_on_a_long_user_picks_the_most_recent():
    ev = random_events(np.random.default_rng(2), 100_000)
    for r in resolve(one_of_each_kind(256, 50), ACTIONS, SCENARIOS):
        for cut in (0, 1, 99_999):
            assert select(r, ev, cut).tolist() == reference(r, ev, cut)


def test_select_rejects_a_cut_outside_the_events():
    ev = random_events(np.random.default_rng(3), 5)
    recent, *_, window, _ = resolve(one_of_each_kind(4, 10), ACTIONS, SCENARIOS)
    assert select(recent, ev, 5).tolist() == [1, 2, 3, 4]  # all history
    for r, cut in ((recent, 6), (recent, -1), (window, 5)):
        with pytest.raises(ValueError, match=r.strategy.name):
            select(r, ev, cut)
