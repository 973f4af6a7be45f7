"""What `extract --also-layer` saves a fine-tune: backbone passes and seconds, side by side in one run.

Both paths extract the head cache and then the fine-tune's prefix cache, in fresh workdirs, as
`featcache extract` and `featcache finetune` do (the head itself plays no part in the prefix, so
none is fitted). Without the also-layer the prefix needs a second backbone pass; with it the prefix
rows are copied from the head cache. The two prefix caches are then compared row for row.

    python scripts/bench_also_layer.py --data data/elpv [--backbone vgg16] [--image-size 150]
        [--unfreeze-from block5_conv1] [--weights imagenet|none|PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from featcache import quiet

    quiet.quiet_tensorflow()  # before TensorFlow starts: featcache's lines only, as the CLI prints
    from featcache.dataset import load_dataset
    from featcache.extract import extract, make_config
    from featcache.finetune import plan_cut, prefix_cache
    from featcache.model import backbone_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--weights", default="imagenet", help="featcache extract --weights (none: random init).")
    parser.add_argument("--unfreeze-from", default="block5_conv1")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    config, resolved = make_config(args.backbone, args.weights, image_size=args.image_size,
                                   precision="float32")  # never auto: the figures must not vary by machine
    cut = plan_cut(backbone_model(config, resolved.keras_arg), args.backbone, args.unfreeze_from)
    results, prefixes = {}, {}
    scratch = tempfile.TemporaryDirectory(prefix="bench-also-")  # both workdirs, removed at exit
    for path, also_layer in (("second pass", None), ("--also-layer", cut.prefix_layer)):
        config, resolved = make_config(args.backbone, args.weights, image_size=args.image_size,
                                       precision="float32", also_layer=also_layer)
        workdir = Path(scratch.name) / path.strip("-").replace(" ", "-")
        started = time.perf_counter()
        head_cache = extract(dataset, config, resolved, workdir, show_progress=False)
        extracted = time.perf_counter()
        prefix = prefix_cache(head_cache.cache, cut, workdir, args.data, show_progress=False)
        finished = time.perf_counter()
        prefixes[path] = prefix.cache
        results[path] = {
            "extract_seconds": extracted - started, "prefix_seconds": finished - extracted,
            "total_seconds": finished - started,
            "backbone_rows": head_cache.computed + prefix.computed, "prefix_rows_copied": prefix.reused,
        }
    first, second = prefixes.values()
    same = all(np.array_equal(first.read(split)[0], second.read(split)[0]) for split in first.splits)
    summary = {"backbone": args.backbone, "image_size": config.image_size, "images": len(dataset.samples),
               "unfreeze_from": cut.unfreeze_from, "prefix_layer": cut.prefix_layer,
               "prefix_key": first.key, "same_prefix_key": first.key == second.key,
               "prefix_rows_identical": same, "paths": results}
    print(f"{args.backbone} at {config.image_size} px, {len(dataset.samples)} images, fine-tune from "
          f"{cut.unfreeze_from} (prefix {cut.prefix_layer})")
    print(f"{'prefix from':<14}{'extract s':>11}{'prefix s':>10}{'total s':>9}{'backbone rows':>15}")
    for path, r in results.items():
        print(f"{path:<14}{r['extract_seconds']:>11.1f}{r['prefix_seconds']:>10.1f}{r['total_seconds']:>9.1f}"
              f"{r['backbone_rows']:>15}")
    plain, also = results.values()
    print(f"extract with the also-layer: {also['extract_seconds'] / plain['extract_seconds']:.2f}x; "
          f"extract + prefix: {plain['total_seconds'] / also['total_seconds']:.2f}x faster; "
          f"same prefix cache: {first.key == second.key and same}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
