"""Orientation-averaged features: a backbone's pooled features averaged over turned and mirrored copies.

Solar cells, micrographs and aerial tiles have no "up": a crack is a crack whichever way the cell
was photographed, yet a convnet's features change when the image turns. ``extract --average-views
d4`` replaces each image's features by their mean over the image's 8 symmetries of the square (the
4 quarter turns, each also mirrored); ``flips`` averages over the 4 mirrorings (none, left-right,
up-down, both) and keeps quarter turns apart, for images whose stripes or busbars have a fixed
direction. The mean is part of the feature model, so every row (train, validation, test) and every
image ``predict`` or an exported model sees gets it alike, and features that never depended on
orientation cost no head anything to learn.

The copies are made inside the Keras graph from built-in layers only, so an exported model still
loads with plain Keras: a transpose is a ``Permute``, a mirror a frozen 0/1 ``Dense`` that
reverses the axis it is applied to (exact: each output is one input times 1 plus zeros).
"""

from __future__ import annotations

import numpy as np

# name -> the views averaged, each (transpose, mirror rows, mirror columns); all False is the image
VIEW_SETS: dict[str, tuple[tuple[bool, bool, bool], ...]] = {
    "none": ((False, False, False),),
    "flips": tuple((False, rows, cols) for rows in (False, True) for cols in (False, True)),
    "d4": tuple((t, rows, cols) for t in (False, True) for rows in (False, True) for cols in (False, True)),
}


def apply_view(image: np.ndarray, view: tuple[bool, bool, bool]) -> np.ndarray:
    """One view of an (H, W, C) or (N, H, W, C) array, in NumPy: the reference the Keras graph must match."""
    transpose, rows, cols = view
    out = image
    if rows:
        out = out[..., ::-1, :, :]
    if cols:
        out = out[..., ::-1, :]
    if transpose:
        out = np.swapaxes(out, -3, -2)
    return out


def averaged(base, pixels, name: str, size: int):
    """``base`` applied to each view of ``pixels`` (N, size, size, C), averaged (none: ``base(pixels)``)."""
    import keras

    if name == "none":
        return base(pixels)
    reverse = keras.layers.Dense(size, use_bias=False, trainable=False, name="reverse_axis")
    reverse.build((None, size))
    reverse.set_weights([np.eye(size, dtype=np.float32)[::-1]])

    def mirror(x, axis_order):  # bring the axis last, reverse it, put it back
        inverse = tuple(int(i) + 1 for i in np.argsort(axis_order))
        return keras.layers.Permute(inverse)(reverse(keras.layers.Permute(axis_order)(x)))

    mirrored = {}  # (rows, cols) -> the image mirrored so, made once for every view that needs it
    for rows in (False, True):
        for cols in (False, True):
            x = mirror(pixels, (2, 3, 1)) if rows else pixels  # rows last: (N, W, C, H)
            mirrored[rows, cols] = mirror(x, (1, 3, 2)) if cols else x  # columns last: (N, H, C, W)
    features = []
    for transpose, rows, cols in VIEW_SETS[name]:
        x = mirrored[rows, cols]
        features.append(base(keras.layers.Permute((2, 1, 3))(x) if transpose else x))
    return keras.layers.Average(name=f"average_{name}_views")(features)
