"""Oversampling: big-rock images `rate` times per epoch, the others once, as a shuffled plan."""

from __future__ import annotations

import re

import numpy as np
import pytest

from marsseg.classes import BIG_ROCK
from marsseg.data.split import contains_class
from marsseg.errors import ConfigError
from marsseg.sampling import check_oversample_rate, oversample_indices


def _flags(n: int = 400, n_flagged: int = 40, seed: int = 0) -> np.ndarray:
    flags = np.zeros(n, dtype=bool)
    flags[np.random.default_rng(seed).choice(n, n_flagged, replace=False)] = True
    return flags


def test_integer_rate_repeats_flagged_images_exactly():
    flags = _flags()
    plan = oversample_indices(flags, 4, np.random.default_rng(0))
    counts = np.bincount(plan, minlength=len(flags))
    assert (counts[flags] == 4).all()
    assert (counts[~flags] == 1).all()
    assert len(plan) == len(flags) + 3 * flags.sum()
    assert not (np.diff(plan) >= 0).all()  # shuffled, not grouped by image


def test_fractional_rate_is_met_in_expectation():
    flags = _flags(n=2000, n_flagged=1000)
    plan = oversample_indices(flags, 2.25, np.random.default_rng(1))
    counts = np.bincount(plan, minlength=len(flags))
    assert set(np.unique(counts[flags])) == {2, 3}
    assert counts[flags].mean() == pytest.approx(2.25, abs=0.05)  # ~3.5 standard errors
    assert (counts[~flags] == 1).all()


def test_rate_one_is_a_permutation_and_plans_follow_the_generator():
    flags = _flags()
    plan = oversample_indices(flags, 1.0, np.random.default_rng(2))
    np.testing.assert_array_equal(np.sort(plan), np.arange(len(flags)))
    np.testing.assert_array_equal(plan, oversample_indices(flags, 1.0, np.random.default_rng(2)))
    rng = np.random.default_rng(3)
    first, second = oversample_indices(flags, 1.5, rng), oversample_indices(flags, 1.5, rng)
    assert not np.array_equal(first, second)  # a fresh plan every epoch


def test_contains_class_flags_masks_containing_it():
    masks = np.ones((3, 4, 5), dtype=np.uint8)
    masks[1, 2, 3] = BIG_ROCK
    np.testing.assert_array_equal(contains_class(masks, BIG_ROCK), [False, True, False])


@pytest.mark.parametrize("rate", [0.5, 0.0, -2.0, float("nan"), float("inf"), "4", True])
def test_bad_rate_names_the_field(rate):
    with pytest.raises(ConfigError, match=r"^oversample_rate must be a") as error:
        oversample_indices(_flags(), rate, np.random.default_rng(0))
    assert repr(rate) in str(error.value)
    with pytest.raises(ConfigError, match=re.escape("train.oversample_rate must be")):
        check_oversample_rate(rate, field="train.oversample_rate")
