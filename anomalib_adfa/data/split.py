"""Seeded, machine-independent splits of a list of image keys.

Each key is ranked by the SHA-256 digest of ``"<seed>/<key>"``. The ranking depends only on the
keys and the seed: not on the order the file system lists them in, not on Python's hash
randomisation or random-number generator, and not on other files (adding an image shifts the cut
points but never reorders the others). Part sizes are rounded fractions of the number of keys,
computed with exact rational arithmetic so that, for example, ``Fraction(58, 98)`` of 98 images is
58 on every platform.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def seeded_order(keys: Iterable[str], seed: int) -> list[str]:
    """Order keys pseudo-randomly, as a pure function of the set of keys and the seed.

    Keys are compared case-insensitively, so ``Y1.JPG`` and ``y1.jpg`` rank the same.

    Args:
        keys: Keys to order (e.g. ``"no/12 no.jpg"``).
        seed: Seed selecting the permutation.

    Returns:
        The keys, shuffled.
    """

    def rank(key: str) -> tuple[str, str]:
        digest = hashlib.sha256(f"{seed}/{key.casefold()}".encode()).hexdigest()
        return digest, key

    return sorted(keys, key=rank)


def part_sizes(count: int, fractions: Sequence[Fraction]) -> list[int]:
    """Sizes of consecutive parts holding the given fractions of ``count`` items.

    Cut points are the rounded (half up) cumulative fractions, so the sizes never add up to more
    than ``count`` and add up to exactly ``count`` when the fractions sum to one.

    Args:
        count: Number of items.
        fractions: Fraction of the items in each part; they must not sum to more than one.

    Returns:
        One size per fraction.

    Raises:
        ValueError: When a fraction is negative or the fractions sum to more than one.
    """
    if any(fraction < 0 for fraction in fractions) or sum(fractions) > 1:
        msg = f"fractions must be non-negative and sum to at most 1, got {[str(f) for f in fractions]}"
        raise ValueError(msg)
    cuts = [0]
    total = Fraction(0)
    for fraction in fractions:
        total += fraction
        cuts.append(_round_half_up(count * total))
    return [end - start for start, end in itertools.pairwise(cuts)]


def seeded_partition(keys: Iterable[str], fractions: Sequence[Fraction], seed: int) -> list[list[str]]:
    """Split keys into parts holding the given fractions of them, chosen by the seed.

    Keys left over when the fractions sum to less than one belong to no part.

    Args:
        keys: Keys to split.
        fractions: Fraction of the keys in each part.
        seed: Seed choosing which keys go where.

    Returns:
        One list of keys per fraction, each in seeded order.

    Example:
        >>> keys = [f"no/{i}.jpg" for i in range(98)]
        >>> train, test = seeded_partition(keys, [Fraction(58, 98), Fraction(40, 98)], seed=1024)
        >>> len(train), len(test)
        (58, 40)
    """
    ordered = seeded_order(keys, seed)
    parts = []
    start = 0
    for size in part_sizes(len(ordered), fractions):
        parts.append(ordered[start : start + size])
        start += size
    return parts


def seeded_folds(keys: Iterable[str], folds: int, seed: int) -> list[list[str]]:
    """Split keys into ``folds`` disjoint folds of near-equal size (sizes differ by at most one), chosen by the seed.

    Every key lands in exactly one fold: the ``i``-th key of :func:`seeded_order` goes to fold ``i mod folds``.

    Args:
        keys: Keys to split.
        folds: Number of folds, from 2 to the number of keys.
        seed: Seed choosing which keys go where.

    Returns:
        One list of keys per fold, each in seeded order.

    Raises:
        ValueError: When ``folds`` is below 2 or above the number of keys.

    Example:
        >>> [len(fold) for fold in seeded_folds([f"no/{i}.jpg" for i in range(12)], 5, seed=1024)]
        [3, 3, 2, 2, 2]
    """
    ordered = seeded_order(keys, seed)
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= len(ordered):
        msg = f"folds must be an integer from 2 to the number of images ({len(ordered)}), got {folds!r}"
        raise ValueError(msg)
    return [ordered[start::folds] for start in range(folds)]
