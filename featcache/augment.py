"""Augmented training views: the tutorials' ImageDataGenerator recipe, drawn reproducibly.

``extract --augment K`` stores K views of every training image as extra training rows, so heads
get augmentation at cache speed. View ``v`` (1..K; 0 is the original) is one random affine
transform (rotation, shift, shear, zoom, then a horizontal flip half of the time) drawn the way
Keras' ``ImageDataGenerator.get_random_transform`` draws it, from a generator seeded by
(seed, the source file's sha256, v). It is applied to the decoded, resized image, as
``flow_from_directory`` does: bilinear interpolation about the image centre, edges filled with
the nearest pixel, rounded back to uint8. A view thus depends only on the file's bytes, the seed,
its index and this recipe, which is what makes it a reusable cache row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np

from featcache.dataset import Sample

# Chollet, Deep Learning with Python, 5.2.5 (cats vs dogs), verbatim except the shear unit.
ROTATION_RANGE = 40.0  # degrees, either way
WIDTH_SHIFT_RANGE = 0.2  # fraction of the width, either way
HEIGHT_SHIFT_RANGE = 0.2  # fraction of the height, either way
SHEAR_RANGE = 0.2  # radians, either way, as the Keras 2.0 of the book read it (Keras >= 2.2 reads degrees)
ZOOM_RANGE = 0.2  # each axis scaled by a factor drawn from [0.8, 1.2]
HORIZONTAL_FLIP = True
FILL_MODE = "nearest"
INTERPOLATION_ORDER = 1  # bilinear

RECIPE = {
    "version": 1, "rotation_range": ROTATION_RANGE, "width_shift_range": WIDTH_SHIFT_RANGE,
    "height_shift_range": HEIGHT_SHIFT_RANGE, "shear_range_radians": SHEAR_RANGE, "zoom_range": ZOOM_RANGE,
    "horizontal_flip": HORIZONTAL_FLIP, "fill_mode": FILL_MODE, "order": INTERPOLATION_ORDER,
}
RECIPE_ID = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Transform:
    """One affine transform in array coordinates (rows, columns); the defaults are the identity."""

    theta: float = 0.0  # rotation, degrees
    tx: float = 0.0  # shift along rows, px
    ty: float = 0.0  # shift along columns, px
    shear: float = 0.0  # radians
    zx: float = 1.0  # zoom along rows (below 1 magnifies)
    zy: float = 1.0  # zoom along columns
    flip: bool = False  # mirror left-right after the affine part


def random_transform(rng: np.random.Generator, height: int, width: int) -> Transform:
    """Draw one transform in the order and from the ranges Keras' ImageDataGenerator uses."""
    theta = rng.uniform(-ROTATION_RANGE, ROTATION_RANGE)
    tx = rng.uniform(-HEIGHT_SHIFT_RANGE, HEIGHT_SHIFT_RANGE) * height
    ty = rng.uniform(-WIDTH_SHIFT_RANGE, WIDTH_SHIFT_RANGE) * width
    shear = rng.uniform(-SHEAR_RANGE, SHEAR_RANGE)
    zx, zy = rng.uniform(1 - ZOOM_RANGE, 1 + ZOOM_RANGE, 2)
    flip = HORIZONTAL_FLIP and bool(rng.random() < 0.5)
    return Transform(float(theta), float(tx), float(ty), float(shear), float(zx), float(zy), flip)


def apply_transform(image: np.ndarray, t: Transform) -> np.ndarray:
    """Resample an (H, W, C) uint8 image through ``t`` about its centre; returns uint8 of the same shape."""
    from scipy import ndimage

    theta = np.deg2rad(t.theta)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    shift = np.array([[1, 0, t.tx], [0, 1, t.ty], [0, 0, 1]])
    shear = np.array([[1, -np.sin(t.shear), 0], [0, np.cos(t.shear), 0], [0, 0, 1]])
    zoom = np.diag([t.zx, t.zy, 1.0])
    centre = np.array([(image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2])
    to_centre, back = np.eye(3), np.eye(3)
    to_centre[:2, 2], back[:2, 2] = centre, -centre
    m = to_centre @ rotation @ shift @ shear @ zoom @ back  # output (row, col) -> input (row, col)
    channels = np.moveaxis(image, -1, 0).astype(np.float32)  # one 2-D pass per channel: twice as fast as 3-D
    out = np.stack([
        ndimage.affine_transform(c, m[:2, :2], offset=m[:2, 2], order=INTERPOLATION_ORDER, mode=FILL_MODE)
        for c in channels
    ], axis=-1)
    if t.flip:
        out = out[:, ::-1]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def augmented_view(image: np.ndarray, seed: int, source_sha256: str, view: int) -> np.ndarray:
    """View ``view`` (from 1) of a decoded image; the same (seed, file sha256, view) give the same pixels."""
    if view < 1:
        raise ValueError(f"view {view}: augmented views are numbered from 1 (view 0 is the original)")
    rng = np.random.default_rng([seed, int(source_sha256[:16], 16), view])
    return apply_transform(image, random_transform(rng, image.shape[0], image.shape[1]))


def view_identity(source_sha256: str, seed: int, view: int) -> str:
    """The row identity of a view, stored where an original row stores its file's sha256."""
    return hashlib.sha256(f"{source_sha256}:augment={RECIPE_ID}:seed={seed}:view={view}".encode()).hexdigest()


def with_views(sample: Sample, views: int, seed: int) -> list[Sample]:
    """The sample followed by its ``views`` augmented views as rows of their own."""
    return [sample] + [
        replace(sample, sha256=view_identity(sample.sha256, seed, v), view=v, source_sha256=sample.sha256)
        for v in range(1, views + 1)
    ]
