"""Hostile inputs (issue 18): options, files and datasets that used to hang, pass silently or crash late.

Each test names the defect class it proves closed; every one failed on the code before its fix.
"""

from __future__ import annotations

import math

import pytest

from featcache import FeatcacheError, cache
from featcache.dataset import check_fractions, load_dataset
from featcache.extract import check_options
from tests.conftest import make_class_folders


@pytest.mark.parametrize("fractions", [(math.nan, 0.5, 0.5), (math.inf, 0.5, -math.inf), (0.7, 0.3, math.nan)])
def test_non_finite_split_fractions_are_refused(fractions, tmp_path):
    with pytest.raises(FeatcacheError, match="split fractions .* three non-negative numbers summing to 1"):
        check_fractions(fractions)
    with pytest.raises(FeatcacheError, match="split fractions"):
        load_dataset(make_class_folders(tmp_path / "d", per_class=3), fractions)


@pytest.mark.parametrize("size", [0, -32, 31])
def test_image_size_zero_negative_or_below_the_minimum_is_refused_not_the_default(size):
    with pytest.raises(FeatcacheError) as error:
        check_options("vgg16", None, size, "squash", "backbone", "float32", "float32")
    assert str(error.value) == f"--image-size {size} is below vgg16's minimum of 32 px"


def test_image_size_none_still_means_the_backbone_default():
    check_options("vgg16", None, None, "squash", "backbone", "float32", "float32")


@pytest.mark.parametrize("timeout", [math.nan, -1.0, math.inf])
def test_lock_timeout_that_is_not_a_finite_non_negative_number_is_refused(timeout, tmp_path):
    """nan made the deadline never pass: a second run waited forever instead of failing."""
    with pytest.raises(FeatcacheError, match=r"--lock-timeout .*: give a number of seconds, 0 or more"):
        with cache.locked(tmp_path, timeout):
            pass


def test_csv_saved_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Excel's 'CSV UTF-8' starts the file with a BOM, which became part of the first column's name."""
    make_class_folders(tmp_path, per_class=3)
    rows = [f"{c}/{c}_{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(3)]
    (tmp_path / "labels.csv").write_bytes(("\ufeffpath,label\r\n" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    ds = load_dataset(tmp_path / "labels.csv")
    assert ds.classes == ("cat", "dog") and len(ds.samples) == 6
