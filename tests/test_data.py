"""The data layer: archive validation, outlier removal, splits, statistics, synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from marsseg.classes import BIG_ROCK, IMAGE_SHAPE, NUM_CLASSES
from marsseg.data import (
    class_statistics,
    find_outliers,
    kfold_plans,
    load_archive,
    load_clean_archive,
    save_archive,
    train_val_split,
)
from marsseg.data.__main__ import main as data_main
from marsseg.data.split import contains_class
from marsseg.data.synthetic import generate
from marsseg.errors import ConfigError, DataError


def test_round_trip_shapes_and_dtypes(synthetic, synthetic_archive_path):
    archive = load_archive(synthetic_archive_path)
    n, m = len(synthetic.training_set), len(synthetic.test_set)
    assert archive.images.shape == (n, *IMAGE_SHAPE) and archive.images.dtype == np.float32
    assert archive.masks.shape == (n, *IMAGE_SHAPE) and archive.masks.dtype == np.uint8
    assert archive.test_images.shape == (m, *IMAGE_SHAPE)
    assert archive.test_images.dtype == np.float32
    assert archive.images.min() >= 0 and archive.images.max() <= 1
    np.testing.assert_array_equal(archive.masks, synthetic.training_set[:, 1])
    np.testing.assert_allclose(archive.images * 255, synthetic.training_set[:, 0], atol=1e-3)


def test_training_only_archive_is_allowed(synthetic, tmp_path):
    path = save_archive(tmp_path / "train_only.npz", synthetic.training_set[:5])
    assert load_archive(path).test_images is None


def _corrupt(training_set: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """Arrays for an archive damaged in one way."""
    train = training_set[:6].copy()
    test = train[:, 0].copy()
    if kind == "missing key":
        return {"test_set": test}
    if kind == "wrong ndim":
        return {"training_set": train[:, 0], "test_set": test}
    if kind == "wrong image size":
        return {"training_set": train[:, :, :32, :], "test_set": test}
    if kind == "wrong test size":
        return {"training_set": train, "test_set": test[:, :, :100]}
    if kind == "NaN":
        train[3, 0, 5, 7] = np.nan
    elif kind == "NaN in test":
        test[2, 1, 1] = np.nan
    elif kind == "label 7":
        train[2, 1, 10, 10] = 7
    elif kind == "label 2.5":
        train[4, 1, 0, :3] = 2.5
    elif kind == "negative pixel":
        train[1, 0, 0, 0] = -4
    elif kind == "scaled to [0, 1]":
        train[:, 0] /= 255
    elif kind == "empty training set":
        train = train[:0]
    elif kind == "strings":
        train = np.array(["a", "b"])
    return {"training_set": train, "test_set": test}


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing key", "missing key 'training_set'"),
        ("wrong ndim", "must have shape (N, 2, 64, 128), got (6, 64, 128)"),
        ("wrong image size", "got (6, 2, 32, 128)"),
        ("wrong test size", "'test_set' must have shape (M, 64, 128), got (6, 64, 100)"),
        (
            "NaN",
            "images hold non-finite values (NaN or inf) at 1 pixels in 1 images (first: image 3)",
        ),
        ("NaN in test", "'test_set' hold non-finite values"),
        ("label 7", "masks hold label 7 at 1 pixels in 1 images (first: image 2)"),
        ("label 2.5", "masks hold non-integral label 2.5 at 3 pixels"),
        ("negative pixel", "must lie in 0-255, got values from -4"),
        ("scaled to [0, 1]", "look already scaled to [0, 1]"),
        ("empty training set", "'training_set' is empty"),
        ("strings", "'training_set' must hold numbers"),
    ],
)
def test_bad_archive_gives_one_line_error(synthetic, tmp_path, kind, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **_corrupt(synthetic.training_set, kind))
    with pytest.raises(DataError) as caught:
        load_archive(path)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message and str(path) in message


def test_not_an_archive(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("not a zip")
    with pytest.raises(DataError, match=r"notes\.npz is not a NumPy \.npz archive"):
        load_archive(path)
    import zipfile

    with zipfile.ZipFile(tmp_path / "empty.npz", "w") as z:
        z.writestr("junk.txt", "not an array")  # a zip, but not of arrays
    with pytest.raises(DataError, match=r"missing key .training_set. \(found: junk.txt\)"):
        load_archive(tmp_path / "empty.npz")
    with pytest.raises(DataError, match="archive not found"):
        load_archive(tmp_path / "missing.npz")


def test_cli_bad_archive_prints_one_line(tmp_path, capsys):
    from marsseg.cli import run_cli

    path = tmp_path / "bad.npz"
    np.savez(path, test_set=np.zeros((2, *IMAGE_SHAPE), np.float32))
    assert run_cli(data_main, ["inspect", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing key 'training_set'" in err
    assert len(err.splitlines()) == 1


def test_outlier_removal_removes_exactly_the_planted_aliens(synthetic):
    masks = synthetic.training_set[:, 1].astype(np.uint8)
    report = find_outliers(masks)
    assert len(synthetic.alien_indices) == 25
    np.testing.assert_array_equal(report.indices, synthetic.alien_indices)
    # Natural duplicate groups were planted and every one of them is kept.
    assert synthetic.duplicate_groups
    removed = set(report.indices.tolist())
    for group in synthetic.duplicate_groups:
        assert not removed & set(group.tolist())
    assert report.natural_groups >= len(synthetic.duplicate_groups)
    assert "removed 25 images" in report.summary()


def test_full_size_synthetic_matches_the_challenge_counts():
    """2615 images with 110 aliens, as in the real archive: cleaning leaves 2505."""
    archive = generate(n_train=2615, n_test=1, seed=0)
    report = find_outliers(archive.training_set[:, 1].astype(np.uint8))
    assert report.count == 110
    assert len(archive.training_set) - report.count == 2505


def _real_like_masks() -> np.ndarray:
    """Distinct random masks plus natural near-uniform duplicate groups of 53, 32, 19 and 16
    (the sizes found in the AI4Mars-derived archive)."""
    rng = np.random.default_rng(0)
    masks = rng.integers(1, 4, size=(200, *IMAGE_SHAPE), dtype=np.uint8)
    start = 0
    for cls, size in zip((1, 2, 3, 1), (53, 32, 19, 16), strict=True):
        masks[start : start + size] = cls
        masks[start : start + size, 0, :size] = 0  # each group its own mask
        start += size
    return masks


def test_natural_near_uniform_groups_are_kept():
    report = find_outliers(_real_like_masks())
    assert report.count == 0 and report.largest_natural_group == 53


def test_pasted_detailed_mask_is_flagged_even_beside_large_natural_groups(synthetic):
    masks = _real_like_masks()
    alien = synthetic.training_set[synthetic.alien_indices[0], 1].astype(np.uint8)
    pasted = np.concatenate([masks, np.repeat(alien[None], 21, axis=0)])
    report = find_outliers(pasted)
    assert report.group_sizes == (21,)
    np.testing.assert_array_equal(report.indices, np.arange(200, 221))


def test_pasted_near_uniform_group_is_flagged_on_a_size_cliff():
    masks = _real_like_masks()[53:]  # natural groups of 32, 19, 16 remain
    uniform = np.full((1, *IMAGE_SHAPE), 2, dtype=np.uint8)
    report = find_outliers(np.concatenate([masks, np.repeat(uniform, 110, axis=0)]))
    assert report.group_sizes == (110,) and report.natural_groups == 3


def test_load_clean_archive_reports_and_drops(synthetic_archive_path, synthetic):
    clean, report = load_clean_archive(synthetic_archive_path)
    assert len(clean) == len(synthetic.training_set) - 25 == len(clean.masks)
    assert report.count == 25


def test_split_is_stratified_and_deterministic(synthetic):
    masks = synthetic.training_set[:, 1].astype(np.uint8)
    train, val = train_val_split(masks, val_fraction=0.2, seed=3)
    again = train_val_split(masks, val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, train_val_split(masks, 0.2, seed=4)[1])
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(masks)
    rocky = contains_class(masks, BIG_ROCK)
    assert rocky.sum() >= 10
    assert rocky[val].sum() == round(0.2 * rocky.sum())
    assert abs(len(val) - 0.2 * len(masks)) <= 1
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split(masks, val_fraction=1.5)


def test_kfold_plans_partition_and_stratify(synthetic):
    masks = synthetic.training_set[:, 1].astype(np.uint8)
    plans = kfold_plans(masks, k=5, seed=0)
    vals = np.concatenate([val for _, val in plans])
    np.testing.assert_array_equal(np.sort(vals), np.arange(len(masks)))
    rocky = contains_class(masks)
    per_fold = [rocky[val].sum() for _, val in plans]
    assert max(per_fold) - min(per_fold) <= 1
    sizes = [len(val) for _, val in plans]
    assert max(sizes) - min(sizes) <= 1
    for train, val in plans:
        assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(masks)


def test_class_statistics():
    masks = np.zeros((2, *IMAGE_SHAPE), dtype=np.uint8)
    masks[0, :32] = 1
    masks[1, 0, 0] = 4
    stats = class_statistics(masks)
    assert stats["pixels"].sum() == masks.size
    assert stats.loc[1, "pixels"] == 32 * 128 and stats.loc[1, "images"] == 1
    assert stats.loc[4, "images"] == 1 and stats.loc[3, "images"] == 0
    assert stats["pixel_share"].sum() == pytest.approx(1.0)


def test_synthetic_is_deterministic_and_in_format():
    a = generate(n_train=40, n_test=10, seed=5)
    b = generate(n_train=40, n_test=10, seed=5)
    np.testing.assert_array_equal(a.training_set, b.training_set)
    np.testing.assert_array_equal(a.test_set, b.test_set)
    assert not np.array_equal(a.training_set, generate(n_train=40, n_test=10, seed=6).training_set)
    # The training set does not depend on the size of the test set.
    np.testing.assert_array_equal(a.training_set, generate(40, 3, seed=5).training_set)
    assert a.training_set.dtype == np.float32 and a.training_set.shape == (40, 2, *IMAGE_SHAPE)
    images, masks = a.training_set[:, 0], a.training_set[:, 1]
    assert np.array_equal(images, np.round(images)) and images.min() >= 0 and images.max() <= 255
    assert set(np.unique(masks)) <= set(range(NUM_CLASSES))


def test_synthetic_class_shares_resemble_the_challenge(synthetic):
    clean = np.delete(synthetic.training_set[:, 1].astype(np.uint8), synthetic.alien_indices, 0)
    share = class_statistics(clean)["pixel_share"].to_numpy()
    challenge = np.array([0.2431, 0.3390, 0.2328, 0.1838, 0.0013])
    np.testing.assert_allclose(share[:4], challenge[:4], atol=0.04)
    assert 0 < share[BIG_ROCK] < 0.005


def test_synthetic_is_learnable_but_not_trivial(synthetic):
    """Brightness alone must not separate the classes, though it must carry some signal."""
    clean = np.delete(synthetic.training_set, synthetic.alien_indices, 0)
    images, masks = clean[:, 0], clean[:, 1].astype(np.uint8)
    labelled = masks > 0
    # Best single-threshold-per-class classifier on raw brightness: nearest class mean.
    means = np.array([images[masks == c].mean() for c in range(1, 4)])
    terrain = labelled & (masks < BIG_ROCK)
    nearest = np.abs(images[terrain][:, None] - means[None]).argmin(axis=1) + 1
    accuracy = (nearest == masks[terrain]).mean()
    assert 0.34 < accuracy < 0.6


def test_inspect_writes_figures(synthetic_archive_path, tmp_path, capsys):
    assert data_main(["inspect", str(synthetic_archive_path), "--out", str(tmp_path), "--log"]) == 0
    out = capsys.readouterr().out
    assert "removed 25 images" in out and "big rock" in out
    for name in ("samples.png", "class_distribution.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_synth_command_writes_a_loadable_archive(tmp_path):
    path = tmp_path / "s.npz"
    assert data_main(["synth", "--out", str(path), "--n-train", "30", "--n-test", "4"]) == 0
    archive = load_archive(path)
    assert len(archive) == 30 and len(archive.test_images) == 4
