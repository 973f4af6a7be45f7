"""A small real-image linear probe: which source photo is an augmented view from?

Twenty photos bundled with scikit-image, twelve random views each (crop, flip, brightness and
colour shifts). ImageNet features recognise the photo behind the augmentations; random-init
features of the same network do not, so the gap proves that real ImageNet weights were loaded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "logo",
          "colorwheel", "page", "camera", "coins", "horse", "moon", "brick", "grass", "gravel", "text",
          "clock", "checkerboard", "binary_blobs")


def _rgb(array) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array[..., :3].astype(np.uint8)


def augmented_views(size=64, views=12, seed=0) -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(PHOTOS):
        photo = _rgb(getattr(data, name)())
        h, w = photo.shape[:2]
        for _ in range(views):
            scale = rng.uniform(0.5, 0.9)
            ch, cw = int(h * scale), int(w * scale)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            view = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((size, size), Image.BILINEAR)
            if rng.random() < 0.5:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            shifted = np.asarray(view, np.float32) * rng.uniform(0.6, 1.4) + rng.uniform(-40, 40, 3)
            images.append(np.clip(shifted, 0, 255))
            labels.append(label)
    return np.stack(images).astype(np.float32), np.array(labels)


def probe_accuracy(model, preprocess, size=64) -> float:
    """3-fold cross-validated logistic-regression accuracy on L2-normalised features."""
    images, labels = augmented_views(size)
    features = np.asarray(model.predict(preprocess(images.copy()), verbose=0)).reshape(len(images), -1)
    features /= np.linalg.norm(features, axis=1, keepdims=True) + 1e-8
    return float(cross_val_score(LogisticRegression(max_iter=3000, C=10), features, labels, cv=3).mean())
