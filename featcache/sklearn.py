"""A scikit-learn transformer that turns images into cached CNN features.

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from featcache.sklearn import FeatureExtractor

    model = Pipeline([("features", FeatureExtractor(backbone="vgg16")), ("clf", LogisticRegression())])
    model.fit(paths, y)                                  # image paths, or uint8 arrays (N, H, W[, 3])

``transform`` goes through featcache's array API (``featcache.api.extract(images=...)``), so every
image is keyed by its pixels: a second transform of the same images, in any order and in any
cross-validation fold, runs no backbone. Image files are decoded and resized to the backbone's input
size by ``featcache.images.load_image``, the decoder extraction itself uses, so a file and the array
of its pixels give the same features. The arrays are written under ``WORKDIR/arrays`` (arrays.py) as
one class ("0") in the train split; the labels in the cache mean nothing here, ``y`` is never read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from featcache import FeatcacheError

__all__ = ["FeatureExtractor"]


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Images in, 2-D float32 features (N, d) out, computed once per image and read from the cache after.

    Parameters are those of ``featcache.api.extract`` (``workdir`` None: ``$FEATCACHE_HOME``, else
    ``./featcache-out``). The transformer is stateless: ``fit`` checks the parameters and learns nothing.
    """

    def __init__(self, backbone="vgg16", image_size=None, pooling="avg", layer=None, weights="imagenet",
                 dtype="float32", workdir=None, batch_size=32):
        self.backbone = backbone
        self.image_size = image_size
        self.pooling = pooling
        self.layer = layer
        self.weights = weights
        self.dtype = dtype
        self.workdir = workdir
        self.batch_size = batch_size

    def fit(self, X, y=None):
        """Check the parameters (one-line ``FeatcacheError``); nothing is learnt."""
        self._options()
        return self

    def transform(self, X) -> np.ndarray:
        """The features of ``X`` (image paths, or uint8 images (N, H, W) or (N, H, W, 3)), one row per
        image in the order given, float32."""
        from featcache import api
        from featcache.arrays import ArrayData

        options = self._options()
        images = self._images(X, options["image_size"])
        data = ArrayData.of(images, np.zeros(len(images), np.int64), ["train"] * len(images),
                            where="FeatureExtractor: ")
        cache = api.extract(images=data.images, labels=list(data.names), splits=list(data.splits),
                            backbone=self.backbone, workdir=self.workdir, **options)
        features, _, relpaths = cache.to_numpy("train")
        row = {relpath: i for i, relpath in enumerate(relpaths)}
        entries = data.entries(options["split_fractions"])  # the file each image was written as
        missing = [relpath for relpath, _ in entries if relpath not in row]
        if missing:  # the extractor rejected an image (e.g. under 8 px a side)
            raise FeatcacheError(f"FeatureExtractor: {len(missing)} of {len(images)} images have no features "
                                 f"(rejected by the extractor, e.g. {missing[0]}); give images of 8 px or more a side")
        order = np.empty(len(images), np.int64)
        for relpath, i in entries:
            order[i] = row[relpath]
        return features[order].astype(np.float32, copy=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # stateless: transform works without fit
        tags.input_tags.two_d_array = False  # images or paths, not a table of numbers
        return tags

    # ------------------------------------------------------------ helpers

    def _options(self) -> dict:
        """The extract options of the parameters, checked once (types by ``ExtractOptions``, values by
        ``check_options``) before any work."""
        from featcache.api import ExtractOptions, _text
        from featcache.extract import check_options

        o = ExtractOptions.of("FeatureExtractor", dict(
            image_size=self.image_size, pooling=self.pooling, layer=self.layer, weights=self.weights,
            dtype=self.dtype, batch_size=self.batch_size, show_progress=False))
        backbone = _text("backbone", self.backbone)
        check_options(backbone, o.pooling, o.image_size, o.resize, o.preprocess, o.dtype, o.precision)
        return {"image_size": o.image_size, "pooling": o.pooling, "layer": o.layer, "weights": o.weights,
                "dtype": o.dtype, "batch_size": o.batch_size, "show_progress": False,
                "split_fractions": o.split_fractions}

    def _images(self, X, image_size: int | None) -> np.ndarray:
        """uint8 images: arrays as given, files decoded and resized as extraction decodes them."""
        if isinstance(X, str | Path):
            raise FeatcacheError(f"FeatureExtractor: X={str(X)!r} is one path; give a list of image paths")
        if not isinstance(X, np.ndarray) or X.dtype.kind in "USO":
            items = list(X)
            if items and all(isinstance(item, str | Path) for item in items):
                return self._decode(items, image_size)
        return np.asarray(X)  # checked by the array API: uint8, (N, H, W) or (N, H, W, 3)

    def _decode(self, paths: list, image_size: int | None) -> np.ndarray:
        from featcache import backbones
        from featcache.images import RejectedImage, load_image

        size = image_size or backbones.get(self.backbone).input_size
        images = np.empty((len(paths), size, size, 3), np.uint8)
        for i, path in enumerate(paths):
            try:
                images[i] = load_image(path, size)  # extraction's default resize, squash
            except (RejectedImage, OSError) as exc:
                raise FeatcacheError(f"FeatureExtractor: {path}: {exc}; give readable images of 8 px "
                                     "or more a side") from None
        return images
