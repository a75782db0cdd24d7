"""The seeded split helper: exact paper counts, and a pure function of the keys and the seed."""

from fractions import Fraction

import pytest

from anomalib_adfa.data.split import part_sizes, seeded_folds, seeded_order, seeded_partition

KEYS = [f"no/{index} no.jpg" for index in range(1, 99)]


@pytest.mark.parametrize(
    ("count", "fractions", "expected"),
    [
        (98, [Fraction(58, 98), Fraction(40, 98)], [58, 40]),  # BrainMRI
        (133, [Fraction(96, 133), Fraction(32, 133)], [96, 32]),  # BUSI normal (5 unused)
        (647, [Fraction(496, 647)], [496]),  # BUSI abnormal
        (234, [Fraction(180, 234), Fraction(54, 234)], [180, 54]),  # SIPaKMeD normal
        (8, [Fraction(96, 133), Fraction(32, 133)], [6, 2]),  # the real BUSI sample's normal images
        (13, [Fraction(496, 647)], [10]),  # and its abnormal images: 9.97 rounds to 10
        (4, [Fraction(1, 8), Fraction(7, 8)], [1, 3]),  # 0.5 rounds up
    ],
)
def test_part_sizes_give_the_paper_counts(count: int, fractions: list[Fraction], expected: list[int]) -> None:
    assert part_sizes(count, fractions) == expected


def test_part_sizes_reject_fractions_above_one() -> None:
    with pytest.raises(ValueError, match="sum to at most 1"):
        part_sizes(10, [Fraction(2, 3), Fraction(2, 3)])


def test_order_is_pinned_across_machines() -> None:
    # SHA-256 ranks are platform independent; a change here changes every published split.
    assert seeded_order(["a.png", "b.png", "c.png", "d.png", "e.png"], 1024) == [
        "b.png",
        "c.png",
        "d.png",
        "a.png",
        "e.png",
    ]


def test_order_ignores_listing_order_and_case() -> None:
    shuffled = KEYS[::-1][50:] + KEYS[::-1][:50]
    assert seeded_order(shuffled, 1024) == seeded_order(KEYS, 1024)
    upper = seeded_order([key.upper() for key in KEYS], 1024)
    assert [key.casefold() for key in upper] == seeded_order(KEYS, 1024)


def test_other_seeds_give_other_orders() -> None:
    orders = {tuple(seeded_order(KEYS, seed)) for seed in (1024, 213, 317)}
    assert len(orders) == 3


def test_extra_keys_do_not_reorder_the_others() -> None:
    extended = seeded_order([*KEYS, "no/extra.jpg"], 1024)
    assert [key for key in extended if key != "no/extra.jpg"] == seeded_order(KEYS, 1024)


def test_partition_is_disjoint_and_leaves_the_rest_unused() -> None:
    train, test = seeded_partition(KEYS, [Fraction(1, 2), Fraction(1, 4)], seed=7)
    assert (len(train), len(test)) == (49, 25)
    assert not set(train) & set(test)
    assert set(train) | set(test) < set(KEYS)


@pytest.mark.parametrize(("count", "folds"), [(12, 5), (58, 5), (29, 2), (7, 7)])
def test_folds_score_every_key_exactly_once(count: int, folds: int) -> None:
    keys = KEYS[:count]
    parts = seeded_folds(keys, folds, seed=1024)
    assert len(parts) == folds
    assert sorted(key for part in parts for key in part) == sorted(keys)  # each key in exactly one fold
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    for held_out in parts:  # each fold model trains on the others and never on its held-out fold
        trained = {key for part in parts if part is not held_out for key in part}
        assert trained.isdisjoint(held_out)
        assert trained | set(held_out) == set(keys)


def test_folds_are_seeded_and_independent_of_input_order() -> None:
    keys = KEYS[:20]
    assert seeded_folds(keys, 5, seed=1) == seeded_folds(list(reversed(keys)), 5, seed=1)
    assert seeded_folds(keys, 5, seed=1) != seeded_folds(keys, 5, seed=2)


@pytest.mark.parametrize("folds", [1, 0, 13, 2.5, True])
def test_a_fold_count_outside_two_to_n_is_refused(folds: object) -> None:
    with pytest.raises(ValueError, match=r"folds must be an integer from 2 to the number of images \(12\)"):
        seeded_folds(KEYS[:12], folds, seed=0)  # type: ignore[arg-type]
