"""Shared fixtures: small labelled batches in the challenge's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marsseg.classes import IMAGE_SHAPE, NUM_CLASSES


def _blocky_batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of random 8x8 blocks over all five classes; images a noisy function of the masks."""
    rng = np.random.default_rng(seed)
    h, w = IMAGE_SHAPE
    coarse = rng.integers(0, NUM_CLASSES, size=(n, h // 8, w // 8))
    masks = coarse.repeat(8, axis=1).repeat(8, axis=2).astype(np.uint8)
    brightness = np.array([0.05, 0.35, 0.55, 0.75, 0.95], dtype=np.float32)
    images = brightness[masks] + rng.normal(0, 0.05, size=masks.shape).astype(np.float32)
    return np.clip(images, 0, 1).astype(np.float32), masks


@pytest.fixture
def labelled_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four images (4, 1, 64, 128) float32 in [0, 1], masks (4, 64, 128) int64, all classes."""
    images, masks = _blocky_batch(4, seed=0)
    return torch.from_numpy(images)[:, None], torch.from_numpy(masks).long()


@pytest.fixture(scope="session")
def synthetic():
    """A small synthetic archive in memory: 600 training images (25 planted aliens), 40 test."""
    from marsseg.data.synthetic import generate

    return generate(n_train=600, n_test=40, seed=1)


@pytest.fixture(scope="session")
def synthetic_archive_path(synthetic, tmp_path_factory):
    """`synthetic` written as an .npz in the challenge's format."""
    from marsseg.data.archive import save_archive

    path = tmp_path_factory.mktemp("data") / "synthetic.npz"
    return save_archive(path, synthetic.training_set, synthetic.test_set)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep generated archives and offline-augmentation caches out of the user's home."""
    import os

    os.environ["MARSSEG_CACHE"] = str(tmp_path_factory.mktemp("marsseg-cache"))


@pytest.fixture(scope="module")
def ray_env():
    """Environment for tests that start Ray; Ray is shut down when the module is done."""
    import ray
    from search_helpers import RAY_ENV

    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory):
    """A 200-image synthetic archive (no aliens) with a 4-image test set, as an .npz file."""
    from marsseg.data import save_archive
    from marsseg.data.synthetic import generate

    s = generate(n_train=200, n_test=4, seed=5, n_aliens=0)
    return save_archive(tmp_path_factory.mktemp("data") / "tiny.npz", s.training_set, s.test_set)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A model file of the tiny U-Net the bad-input cases use."""
    from cli_harness import TINY

    from marsseg.config import TrainConfig
    from marsseg.predict import save_models

    torch.manual_seed(0)
    config = TrainConfig.from_dict(TINY)
    return save_models(
        tmp_path_factory.mktemp("model") / "model.pt", config, [config.model.build()]
    )


@pytest.fixture
def place(tmp_path, tiny_archive, model_file, monkeypatch):
    """A fresh folder for a bad-input case, with every stage's training and Ray entry replaced
    by `cli_harness.never`: a case that gets that far fails the test."""
    from cli_harness import Place, never

    import marsseg.train.__main__ as train_cli
    from search import compare
    from search import final as final_stage
    from search import run as search_run

    for module, name in [
        (train_cli, "fit"),
        (final_stage, "fit"),
        (final_stage, "train_folds"),
        (final_stage, "start_ray"),
        (compare, "start_ray"),
        (search_run, "plan_resources"),
    ]:
        monkeypatch.setattr(module, name, never)
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file, not a folder\n")
    return Place(tmp_path, tiny_archive, model_file, blocker)
