"""The README's Python walkthrough, runnable: the steps a notebook reader takes, on a tiny dataset.

    python scripts/walkthrough.py [--workdir DIR] [--weights imagenet] [--image-size 150]

It writes a synthetic two-class dataset (noisy red cats and blue dogs) into a temporary folder,
extracts features once, converts them for NumPy, pandas and tf.data, fits two heads, compares
them, predicts new files, and extracts the same images again from a NumPy array. By default it
runs a randomly initialised VGG16 at 32 px (seconds, no download); ``--weights imagenet
--image-size 150`` runs the real thing. The test suite runs it as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import featcache  # quiets TensorFlow's start-up log unless FEATCACHE_VERBOSE=1

COLOURS = {"cat": (200, 60, 40), "dog": (40, 80, 200)}


def make_images(per_class: int, size: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy solid-colour images (uint8, N x size x size x 3) and their class names."""
    rng = np.random.default_rng(seed)
    images = [np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
              for colour in COLOURS.values() for _ in range(per_class)]
    return np.stack(images), np.repeat(list(COLOURS), per_class)


def write_folders(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The images as ROOT/<class>/<n>.png: featcache's class-folder layout."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / label / f"{i:04d}.png")
    return root


def walkthrough(workdir: Path, weights: str, image_size: int) -> None:
    images, labels = make_images(per_class=20)
    data = write_folders(workdir / "data", images, labels)
    options = dict(weights=weights, image_size=image_size, dtype="float32", show_progress=False)

    # 1. Extract once: the backbone runs over every image, the features land in HDF5 shards.
    cache = featcache.extract(data, backbone="vgg16", workdir=workdir / "featcache-out", **options)
    print(f"cache {cache.key[:16]}: classes {cache.classes}, splits {cache.splits}, "
          f"feature shape {cache.feature_shape}")

    # 2. Reopen it later (the last extracted is the default), and take the features out.
    cache = featcache.open_cache(workdir / "featcache-out")
    x, y, paths = cache.to_numpy("train")
    print(f"to_numpy('train'): X {x.shape} {x.dtype}, y {y.shape}, first path {paths[0]}")
    frame = cache.to_pandas("validation")
    print(f"to_pandas('validation'): {frame.shape[0]} rows x {frame.shape[1]} columns "
          f"(f0..f{frame.shape[1] - 4}, label, class, path)")
    features, batch_labels = next(iter(cache.to_tf_dataset("train", batch_size=8, shuffle=True)))
    print(f"to_tf_dataset('train'): batches of {tuple(features.shape)} features, "
          f"{tuple(batch_labels.shape)} labels")

    # 3. Fit heads on the cache: seconds, the backbone never runs again.
    for name, fit in (("logreg", {}), ("dense256", {"epochs": 10})):
        head = featcache.fit_head(cache, name, show_progress=False, **fit)
        print(f"fit_head {name}: validation accuracy {head.record['metrics']['validation']['accuracy']:.1%}")

    # 4. Compare them: the rows of `featcache compare --format json`.
    rows = featcache.compare(cache)
    print("compare rows:")
    print(json.dumps(rows, indent=2))

    # 5. Predict new files with the best head (or name one: head="logreg").
    new_images, _ = make_images(per_class=2, seed=1)
    new = write_folders(workdir / "new", new_images, np.array(["unknown"] * len(new_images)))
    for row in featcache.predict(new, cache=cache, show_progress=False):
        print(f"predict {Path(row['path']).name}: {row['class']} ({row['probability']:.1%})")

    # 6. Arrays are a dataset too: written once as PNG files keyed by their pixels, so extracting the
    #    same arrays again finds the cache complete and computes nothing.
    out = workdir / "featcache-out"
    from_arrays = featcache.extract(images=images, labels=labels, workdir=out, **options)
    again = featcache.extract(images=images, labels=labels, workdir=out, **options)
    x_arrays, _, _ = from_arrays.to_numpy("train")
    print(f"extract(images=...): cache {from_arrays.key[:16]}, X {x_arrays.shape}; "
          f"again: {'the same cache' if again.key == from_arrays.key else 'another cache'}")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Where to work [default: a temporary folder].")
    parser.add_argument("--weights", default="none", help="imagenet, none or a weights file [default: none].")
    parser.add_argument("--image-size", type=int, default=32, help="Input size in px [default: 32].")
    args = parser.parse_args()
    if args.workdir:
        walkthrough(args.workdir, args.weights, args.image_size)
        return
    with tempfile.TemporaryDirectory(prefix="featcache-walkthrough-") as folder:
        walkthrough(Path(folder), args.weights, args.image_size)


if __name__ == "__main__":
    main()
