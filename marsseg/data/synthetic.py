"""A procedural Mars terrain archive in exactly the challenge's format: the embedded default.

The real archive cannot be bundled, so newcomers, CI and every test run on this one. It is
built to exercise what the real data exercises, not to be pretty:

- soil, bedrock and sand regions come from smooth random fields (three fractal noise fields,
  argmax with per-image biases, so some scenes are dominated by one class);
- each class has its own texture (granular soil with pebbles, stratified and cracked bedrock,
  rippled sand) and a brightness that drifts per image, so that brightness alone overlaps
  between classes and a model has to learn texture and context;
- background (label 0) comes as a far-ground band at the top, rover parts at the bottom and
  unlabelled patches that look exactly like the terrain beneath them (as in crowd-sourced
  labels), together about a quarter of the pixels;
- "big rock" blobs with shading and a cast shadow in a few percent of images (~0.1-0.2% of
  pixels), the rare class that bounds the score;
- ~4.2% pasted "alien" pictures that all share one identical mask (110 of 2615 at full size),
  and a handful of natural duplicate groups of near-uniform masks that must be kept.

Generation is vectorised over chunks of images, deterministic per seed, and takes a few seconds
at full size. The training and test streams use separate generators, so the training set does
not change with `n_test`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from marsseg.classes import IMAGE_SHAPE
from marsseg.data.archive import PIXEL_MAX, save_archive
from marsseg.paths import cache_root

H, W = IMAGE_SHAPE
CHUNK = 512
ALIEN_SHARE = 110 / 2615
"""The challenge's share of pasted outliers."""
ROCK_IMAGE_SHARE = 0.03
"""Share of scenes with big rocks; ~62 of 2505 images on the real challenge."""

# Scene codes: what a pixel shows (drives rendering); labels follow from them.
SOIL, BEDROCK, SAND, ROCK, FAR, ROVER = 1, 2, 3, 4, 5, 6
TERRAIN_BIAS = np.array([0.4, 0.05, -0.1])
"""Per-class bias of the argmax over terrain fields (soil, bedrock, sand), tuned so the shares
come out near the challenge's (soil 34%, bedrock 23%, sand 18% of all pixels)."""


@dataclass(frozen=True)
class SyntheticArchive:
    """Arrays in the archive layout plus what was planted, for tests and reports."""

    training_set: np.ndarray
    """(N, 2, 64, 128) float32: [:, 0] image 0-255, [:, 1] mask 0.0-4.0."""
    test_set: np.ndarray
    """(M, 64, 128) float32 images 0-255."""
    alien_indices: np.ndarray
    """Training indices of the pasted outliers (one shared mask)."""
    duplicate_groups: tuple[np.ndarray, ...]
    """Training indices of each natural group of identical masks."""


def generate(
    n_train: int = 2615, n_test: int = 1000, seed: int = 0, n_aliens: int | None = None
) -> SyntheticArchive:
    """Build a synthetic archive in memory. `n_aliens` defaults to the challenge's 4.2%."""
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    rng = np.random.default_rng([seed, 0])
    n_aliens = round(ALIEN_SHARE * n_train) if n_aliens is None else n_aliens
    n_aliens = min(n_aliens, n_train)
    n_dup_groups = min(max(1, round(n_train / 260)), (n_train - n_aliens) // 4)

    images, masks = _scenes(rng, n_train)
    order = rng.permutation(n_train)
    alien_idx = np.sort(order[:n_aliens])
    alien_image, alien_mask = _alien_picture(rng)
    images[alien_idx] = alien_image + rng.normal(0, 0.015, size=(n_aliens, H, W))
    masks[alien_idx] = alien_mask

    groups = []
    pool = iter(order[n_aliens:])
    for _ in range(n_dup_groups):
        members = np.sort([next(pool) for _ in range(int(rng.integers(2, 4)))])
        mask = _near_uniform_mask(rng)
        masks[members] = mask
        images[members] = _render(rng, np.broadcast_to(_scene_of(mask), (len(members), H, W)))
        groups.append(members)

    test_images, _ = _scenes(np.random.default_rng([seed, 1]), n_test)
    training_set = np.stack([_to_pixels(images), masks.astype(np.float32)], axis=1)
    return SyntheticArchive(training_set, _to_pixels(test_images), alien_idx, tuple(groups))


def make_archive(
    path: str | os.PathLike, n_train: int = 2615, n_test: int = 1000, seed: int = 0
) -> Path:
    """Generate an archive and write it to `path` (atomically) in the challenge's format."""
    archive = generate(n_train, n_test, seed)
    return save_archive(path, archive.training_set, archive.test_set)


def _to_pixels(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats to the archive's 0-255 scale, rounded like 8-bit camera pixels."""
    return np.round(np.clip(images, 0, 1) * PIXEL_MAX).astype(np.float32)


def _scenes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n natural scenes: images in [0, 1] (n, H, W) float32 and masks (n, H, W) uint8."""
    images = np.empty((n, H, W), dtype=np.float32)
    masks = np.empty((n, H, W), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        scene, labelled = _layout(rng, stop - start)
        masks[start:stop] = np.where(labelled & (scene <= ROCK), scene, 0)
        images[start:stop] = _render(rng, scene)
    return images, masks


def _fractal(rng: np.random.Generator, n: int, cells: int = 4, octaves: int = 3) -> np.ndarray:
    """Smooth noise (n, H, W) with unit spread: grids of 1, 2, 4... x `cells` rows, summed.

    The octaves are summed on the finest grid (bicubic) and brought to full size by a single
    bilinear pass: full-size passes are what cost, so one cheap pass per field keeps the full
    archive at a few seconds.
    """
    finest = (cells * 2 ** (octaves - 1), 2 * cells * 2 ** (octaves - 1))
    total = torch.zeros((n, 1, *finest))
    for octave in range(octaves):
        rows = cells * 2**octave
        grid = torch.from_numpy(rng.standard_normal((n, 1, rows, 2 * rows), dtype=np.float32))
        total += F.interpolate(grid, size=finest, mode="bicubic", align_corners=False) * 0.5**octave
    full = F.interpolate(total, size=(H, W), mode="bilinear", align_corners=False)[:, 0].numpy()
    return full / np.float32(np.sqrt(sum(0.25**o for o in range(octaves))))


def _per_image(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """One uniform draw per image, shaped to broadcast over (n, H, W)."""
    return rng.uniform(low, high, size=(n, 1, 1)).astype(np.float32)


def _layout(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene codes (n, H, W) and which pixels carry a label (the rest are unlabelled patches)."""
    fields = np.stack([_fractal(rng, n) for _ in range(3)], axis=1)
    bias = TERRAIN_BIAS[None, :, None, None] + rng.normal(0, 0.8, size=(n, 3, 1, 1))
    scene = (fields + bias).argmax(axis=1).astype(np.uint8) + SOIL

    rows = np.arange(H)[None, :, None]
    cols = np.arange(W)[None, None, :]
    # Far ground above a wavy horizon in about half the scenes.
    horizon = np.where(rng.random((n, 1, 1)) < 0.55, _per_image(rng, n, 4, 26), -10)
    wave = _per_image(rng, n, 0, 3) * np.sin(
        cols / _per_image(rng, n, 6, 20) + rng.random((n, 1, 1)) * 6
    )
    scene[rows < horizon + wave] = FAR
    # A rover part (a flat-topped block) at the bottom of some scenes.
    has_rover = rng.random((n, 1, 1)) < 0.18
    left = _per_image(rng, n, -20, W - 30)
    width = _per_image(rng, n, 25, 70)
    top = H - _per_image(rng, n, 8, 24)
    rover = has_rover & (cols >= left) & (cols < left + width) & (rows >= top)
    scene[rover] = ROVER

    _place_rocks(rng, scene)
    # Unlabelled patches: pixels that show terrain but that labellers left as background.
    patches = _fractal(rng, n, cells=2) > _per_image(rng, n, 0.5, 2.0)
    return scene, ~patches | (scene == ROCK)


def _place_rocks(rng: np.random.Generator, scene: np.ndarray) -> None:
    """Draw 1-3 irregular big rocks into ~3% of scenes, on terrain, never over rover parts."""
    rows, cols = np.mgrid[0:H, 0:W].astype(np.float32)
    for i in np.flatnonzero(rng.random(len(scene)) < ROCK_IMAGE_SHARE):
        for _ in range(int(rng.integers(1, 4))):
            outline = _rock_outline(rng, rows, cols)
            scene[i][(outline < 1) & (scene[i] != ROVER)] = ROCK


def _rock_outline(rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Normalised radius field of one lumpy ellipse: < 1 inside the rock."""
    cy, cx = rng.uniform(H * 0.35, H - 4), rng.uniform(6, W - 6)
    ry, rx = rng.uniform(4, 9), rng.uniform(6, 14)
    dy, dx = (rows - cy) / ry, (cols - cx) / rx
    angle = np.arctan2(dy, dx)
    lumps = 1 + sum(
        rng.uniform(0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    return np.hypot(dy, dx) / lumps


def _render(rng: np.random.Generator, scene: np.ndarray) -> np.ndarray:
    """Grayscale images in [0, 1] for scene codes (n, H, W)."""
    n = len(scene)
    rows = np.arange(H, dtype=np.float32)[None, :, None]
    cols = np.arange(W, dtype=np.float32)[None, None, :]

    def brightness(mean: float) -> np.ndarray:
        # Per-image drift of each class's brightness: class means overlap across images.
        return mean + rng.normal(0, 0.07, size=(n, 1, 1)).astype(np.float32)

    grain = rng.standard_normal((n, H, W), dtype=np.float32)
    pebbles = (rng.random((n, H, W)) < 0.02) * rng.uniform(-0.25, 0.25, size=(n, H, W))
    soil = brightness(0.45) + 0.06 * _fractal(rng, n, cells=8, octaves=2) + 0.05 * grain + pebbles

    tilt = _per_image(rng, n, -0.6, 0.6)
    period = _per_image(rng, n, 4, 9)
    strata = np.sin(2 * np.pi * (rows + tilt * cols) / period + 1.5 * _fractal(rng, n))
    cracks = np.abs(_fractal(rng, n, cells=6, octaves=2)) < 0.08
    bedrock = brightness(0.53) + 0.09 * strata - 0.18 * cracks + 0.025 * grain

    heading = _per_image(rng, n, 0, np.pi)
    wavelength = _per_image(rng, n, 3, 6)
    phase = 2 * np.pi * (cols * np.cos(heading) + rows * np.sin(heading)) / wavelength
    sand = brightness(0.5) + 0.05 * np.sin(phase + 2 * _fractal(rng, n)) + 0.015 * grain

    far = brightness(0.5) + 0.04 * _fractal(rng, n, cells=8, octaves=1) - 0.003 * (H - rows)
    rover = brightness(0.16) + 0.03 * grain
    rock, shadow = _rock_shading(rng, scene)

    image = np.select(
        [scene == SOIL, scene == BEDROCK, scene == SAND, scene == ROCK, scene == FAR],
        [soil, bedrock, sand, rock, far],
        default=rover,
    )
    image *= shadow
    gain = _per_image(rng, n, 0.75, 1.25)
    vertical = 1 + _per_image(rng, n, -0.2, 0.2) * (rows / H - 0.5)
    noise = rng.normal(0, 0.02, size=(n, H, W))
    return (image * gain * vertical + noise).astype(np.float32)


def _rock_shading(rng: np.random.Generator, scene: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brightness of rock pixels lit from one side, and a multiplier that casts their shadow."""
    n = len(scene)
    rock = np.zeros((n, H, W), dtype=np.float32)
    shadow = np.ones((n, H, W), dtype=np.float32)
    for i in np.flatnonzero((scene == ROCK).reshape(n, -1).any(axis=1)):
        inside = scene[i] == ROCK
        light = rng.uniform(0, 2 * np.pi)
        ly, lx = np.sin(light), np.cos(light)
        ys, xs = np.nonzero(inside)
        cy, cx = ys.mean(), xs.mean()
        spread = max(float(np.hypot(ys - cy, xs - cx).max()), 1.0)
        facing = ((ys - cy) * -ly + (xs - cx) * -lx) / spread
        rock[i][inside] = rng.uniform(0.4, 0.6) + 0.3 * facing + rng.normal(0, 0.04, len(ys))
        # The shadow: the rock's footprint shifted away from the light, on the ground only.
        shift = round(0.5 * spread)
        cast = np.roll(inside, (round(shift * ly), round(shift * lx)), axis=(0, 1)) & ~inside
        shadow[i][cast] = 0.6
    return rock, shadow


def _alien_picture(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The pasted non-Mars picture (a cartoon face on a bright card) and the one mask they share."""
    rows, cols = np.mgrid[0:H, 0:W].astype(np.float32)
    head = ((rows - 34) / 24) ** 2 + ((cols - 64) / 18) ** 2 < 1
    eyes = (((rows - 28) / 6) ** 2 + ((np.abs(cols - 64) - 8) / 5) ** 2) < 1
    picture = np.where(head, 0.55, 0.92) - 0.5 * eyes + 0.05 * np.sin(cols / 3)
    scene, _ = _layout(rng, 1)
    mask = np.where(scene[0] <= ROCK, scene[0], 0).astype(np.uint8)
    return picture.astype(np.float32), mask


def _near_uniform_mask(rng: np.random.Generator) -> np.ndarray:
    """One class over the whole frame under a thin, tilted unlabelled band: a mask that recurs.

    The band's random tilt makes each group's mask distinct from every other group's.
    """
    mask = np.full((H, W), rng.integers(SOIL, SAND + 1), dtype=np.uint8)
    band = rng.uniform(1, 4) + rng.uniform(-3, 3) * np.arange(W) / W
    mask[np.arange(H)[:, None] < band[None, :]] = 0
    return mask


def _scene_of(mask: np.ndarray) -> np.ndarray:
    """Scene codes that render a given mask: its classes as they are, background as far ground."""
    return np.where(mask == 0, FAR, mask).astype(np.uint8)


def default_archive_path() -> Path:
    """Where the embedded default archive is cached (see `marsseg.paths.cache_root`)."""
    return cache_root() / "synthetic-mars-seed0.npz"


def ensure_default_archive() -> Path:
    """The default synthetic archive, generated on first use (a few seconds) and cached."""
    path = default_archive_path()
    if not path.is_file():
        make_archive(path)
    return path
