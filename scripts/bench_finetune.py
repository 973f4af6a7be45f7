"""Seconds per fine-tuning epoch on the cached frozen prefix vs through the full model, side by side.

Both paths train the same layers (the unfrozen top block and the head) with the same optimizer
and batch size, in one run on one machine. The prefix path streams the prefix cache (what
`featcache finetune` does); the full path decodes the training images and pushes every batch
through the whole conv base, as the tutorials' fine-tuning does each epoch. Epoch times come from
timed steps after warm-up, scaled to the training split's size (a full-model epoch takes minutes on
a CPU); the prefix path also runs one whole epoch to check the scaling.

    python scripts/bench_finetune.py --workdir featcache-out --data data/elpv [--steps 12] [--json out.json]

Needs a cache with the head fitted (`featcache fit-head --head dense256`); the prefix cache is
extracted on first use, exactly as `featcache finetune` would.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def timed_steps(model, batches, steps: int, warmup: int = 2) -> float:
    """Seconds per training step, measured after ``warmup`` steps (tracing, allocation)."""
    iterator = iter(batches)
    for _ in range(warmup):
        model.train_on_batch(*next(iterator))
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(*next(iterator))
    return (time.perf_counter() - started) / steps


def main() -> None:
    from featcache import quiet

    quiet.quiet_tensorflow()  # before TensorFlow starts: featcache's lines only, as the CLI prints
    import keras
    import tensorflow as tf

    from featcache import backbones
    from featcache.extract import decoded_batches
    from featcache.finetune import cache_with_head, plan_cut, prefix_cache, trainable_model
    from featcache.heads import head_dir, load_head
    from featcache.model import backbone_model, cache_config, cache_weights, preprocessing_layer
    from featcache.streaming import split_batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("featcache-out"))
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--head", default="dense256")
    parser.add_argument("--unfreeze-from", default="block5_conv1")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cache = cache_with_head(args.workdir, args.head)
    config = cache_config(cache)
    head = load_head(head_dir(cache, args.head))
    extractor = backbone_model(config, cache_weights(cache))
    cut = plan_cut(extractor, config.backbone, args.unfreeze_from)
    prefix = prefix_cache(cache, cut, args.workdir, args.data).cache
    head_layers = head.to_keras(tuple(cache.manifest["feature_shape"]))
    model = trainable_model(extractor, cut, head_layers)
    for layer in extractor.layers:  # the full path trains exactly the same layers
        layer.trainable = layer.trainable and layer.name in cut.trainable
    size = config.image_size
    pixels = keras.Input((size, size, 3))
    preprocessed = preprocessing_layer(backbones.get(config.backbone), config.preprocess, size)(pixels)
    full = keras.Model(pixels, model.get_layer(head_layers.name)(extractor(preprocessed)))
    loss = "binary_crossentropy" if head_layers.output_shape[-1] == 1 else "sparse_categorical_crossentropy"
    for net in (model, full):
        net.compile(optimizer=keras.optimizers.RMSprop(1e-5), loss=loss)

    n_train = prefix.manifest["splits"]["train"]["rows"]
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    prefix_batches = split_batches(prefix, "train", args.batch_size, 0).repeat()
    root = Path(cache.manifest["dataset"]["root"])
    _, labels, relpaths = cache.read("train")
    images = decoded_batches([root / p for p in relpaths], size, config.resize, args.batch_size,
                             lambda i, reason: None)
    image_batches = tf.data.Dataset.from_generator(
        lambda: ((tf.cast(b, tf.float32), labels[i]) for i, b in images),
        output_signature=(tf.TensorSpec((None, size, size, 3), tf.float32), tf.TensorSpec((None,), tf.int32)),
    )

    prefix_step = timed_steps(model, prefix_batches, args.steps)
    full_step = timed_steps(full, image_batches, args.steps)
    started = time.perf_counter()
    model.fit(split_batches(prefix, "train", args.batch_size, 0), epochs=1, verbose=0, shuffle=False)
    prefix_epoch_measured = time.perf_counter() - started

    results = {
        "backbone": config.backbone, "image_size": size, "unfreeze_from": cut.unfreeze_from,
        "prefix_layer": cut.prefix_layer, "prefix_shape": prefix.manifest["feature_shape"],
        "train_rows": n_train, "batch_size": args.batch_size, "steps_timed": args.steps,
        "prefix_seconds_per_step": prefix_step, "full_seconds_per_step": full_step,
        "prefix_seconds_per_epoch": prefix_step * steps_per_epoch,
        "prefix_seconds_per_epoch_measured": prefix_epoch_measured,
        "full_seconds_per_epoch": full_step * steps_per_epoch,
        "speedup": full_step / prefix_step,
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
    }
    print(f"fine-tuning {config.backbone} from {cut.unfreeze_from} at {size} px, {n_train} training rows, "
          f"batch {args.batch_size}, {results['trainable_params']:,} trainable parameters")
    print(f"{'path':<28}{'s/step':>10}{'s/epoch':>12}")
    print(f"{'cached prefix (' + cut.prefix_layer + ')':<28}{prefix_step:>10.3f}"
          f"{results['prefix_seconds_per_epoch']:>12.1f}   (whole epoch: {prefix_epoch_measured:.1f} s)")
    print(f"{'full model (decode + base)':<28}{full_step:>10.3f}{results['full_seconds_per_epoch']:>12.1f}")
    print(f"speed-up: {results['speedup']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
