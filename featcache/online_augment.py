"""Online augmentation of cached pixels: a new random view of every training image in every epoch.

A whole-network fine-tune (``finetune --unfreeze-from all``) trains on a pixel cache, so the
network sees the images themselves and can learn from pixel-level augmentation, which a cache of
features cannot offer. Each training batch is transformed in the tf.data pipeline by a named
recipe, from a generator seeded by (seed, epoch): the same seed gives the same views, epoch after
epoch. Validation and test batches are never transformed.

Recipes (``RECIPES``):

- ``d4``: one of the 8 symmetries of the square (4 quarter turns, each also mirrored), uniformly;
  for images with no "up" (solar cells, micrographs, aerial tiles).
- ``paper``: d4, then the small affine jitter of Deitsch et al. 2019 on elpv (rotation up to
  +-3 degrees, scale and shift up to +-2%), then brightness and contrast up to +-10%.
- ``none``: the cached pixels as they are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from featcache import FeatcacheError
from featcache.views import VIEW_SETS, apply_view


@dataclass(frozen=True)
class Recipe:
    """What one training view may change; zero ranges leave that part out."""

    name: str
    d4: bool = False  # a uniformly drawn symmetry of the square
    rotation: float = 0.0  # degrees, either way
    scale: float = 0.0  # fraction, either way (both axes alike)
    shift: float = 0.0  # fraction of the side, either way, per axis
    brightness: float = 0.0  # fraction of the 0-255 range added, either way
    contrast: float = 0.0  # fraction the spread about the image mean is scaled by, either way

    @property
    def affine(self) -> bool:
        return bool(self.rotation or self.scale or self.shift)

    def to_json(self) -> dict:
        return {**asdict(self), "id": self.identity()}

    def identity(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


RECIPES = {recipe.name: recipe for recipe in (
    Recipe("none"),
    Recipe("d4", d4=True),
    Recipe("paper", d4=True, rotation=3.0, scale=0.02, shift=0.02, brightness=0.1, contrast=0.1),
)}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise FeatcacheError(f"--augment-online {name!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def augment_batch(images: np.ndarray, recipe: Recipe, rng: np.random.Generator) -> np.ndarray:
    """A random view of each float32 (N, H, W, 3) image in [0, 255] under ``recipe``, drawn from ``rng``."""
    if recipe.name == "none":
        return images
    out = np.empty_like(images, dtype=np.float32)
    for i, image in enumerate(images):
        x = np.asarray(image, np.float32)
        if recipe.d4:
            x = apply_view(x, VIEW_SETS["d4"][rng.integers(8)])
        if recipe.affine:
            x = _affine(x, rng, recipe)
        if recipe.brightness or recipe.contrast:
            mean = x.mean()
            contrast = 1 + rng.uniform(-recipe.contrast, recipe.contrast)
            brightness = rng.uniform(-recipe.brightness, recipe.brightness) * 255
            x = np.clip((x - mean) * contrast + mean + brightness, 0, 255)
        out[i] = x
    return out


def _affine(image: np.ndarray, rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    """Rotate and scale about the centre, then shift; bilinear, edges filled with the nearest pixel."""
    from scipy import ndimage

    theta = np.deg2rad(rng.uniform(-recipe.rotation, recipe.rotation))
    zoom = 1 + rng.uniform(-recipe.scale, recipe.scale)
    shift = rng.uniform(-recipe.shift, recipe.shift, 2) * np.array(image.shape[:2])
    # output (row, col) -> input (row, col): about the centre, inverse rotation and zoom
    matrix = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) / zoom
    centre = (np.array(image.shape[:2]) - 1) / 2
    offset = centre - matrix @ (centre + shift)
    return np.stack([ndimage.affine_transform(image[..., c], matrix, offset=offset, order=1, mode="nearest")
                     for c in range(image.shape[-1])], axis=-1)
