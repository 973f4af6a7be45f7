"""Write a small two-class image dataset (circles vs squares) in the class-folder layout.

Used by `make demo` until real data is wired in; deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw(shape: str, rng: np.random.Generator, size: int) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 120, 3))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    img = Image.new("RGB", (size, size), background)
    r = rng.integers(size // 6, size // 3)
    cx, cy = rng.integers(r, size - r, 2)
    box = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
    (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=colour)
    noise = rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dest", type=Path, default=Path("data/demo"))
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for shape in ("circle", "square"):
        folder = args.dest / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            path = folder / f"{shape}_{i:04d}.png"
            image = draw(shape, rng, args.size)
            if not path.exists():
                image.save(path)
    print(f"{2 * args.per_class} images in {args.dest}")


if __name__ == "__main__":
    main()
