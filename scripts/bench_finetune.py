"""Seconds per fine-tuning step on the cached frozen prefix in float32 and in bfloat16, and through the full model.

All paths train the same layers (the unfrozen top block and the head) with the same optimizer
and batch size, in one run on one machine. The prefix paths stream the prefix cache (what
`featcache finetune` does), the trainable model built once in ``float32`` and once in
``mixed_bfloat16`` (given explicitly, never ``auto``); the full path, float32, decodes the training
images and pushes every batch through the whole conv base, as the tutorials' fine-tuning does each
epoch. After warm-up the paths take their timed steps in turn (one step each, round after round),
so load drifts hit all alike. Epoch times are steps scaled to the training split's size (a
full-model epoch takes minutes on a CPU); the float32 prefix path also runs one whole epoch to
check the scaling. The CPU's bfloat16 flags say which case the bf16 figure shows (native with AMX,
native AVX512-BF16 without AMX, or TensorFlow's emulation).

    python scripts/bench_finetune.py --workdir featcache-out --data data/elpv [--steps 12] [--json out.json]

Needs a cache with the head fitted (`featcache fit-head --head dense256`); the prefix cache is
extracted on first use, exactly as `featcache finetune` would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from bench_extract import bf16_case  # scripts/ is on sys.path when a script runs

PRECISIONS = ("float32", "mixed_bfloat16")  # the prefix path's, side by side; the full path is float32


def timed_steps(paths: dict[str, tuple[object, object]], steps: int, warmup: int = 2) -> dict[str, float]:
    """Seconds per training step of each path (name: (model, batches)), measured after ``warmup`` steps
    (tracing, allocation); the timed steps alternate between the paths, one step each per round."""
    iterators = {name: (model, iter(batches)) for name, (model, batches) in paths.items()}
    for model, iterator in iterators.values():
        for _ in range(warmup):
            model.train_on_batch(*next(iterator))
    seconds = dict.fromkeys(paths, 0.0)
    for _ in range(steps):
        for name, (model, iterator) in iterators.items():
            batch = next(iterator)
            started = time.perf_counter()
            model.train_on_batch(*batch)
            seconds[name] += time.perf_counter() - started
    return {name: total / steps for name, total in seconds.items()}


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
    from featcache.precision import BF16_FLAGS, cpu_flags, using
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
    models, extractors = {}, {}
    for precision in PRECISIONS:  # as featcache finetune builds it in that precision
        extractors[precision] = backbone_model(dataclasses.replace(config, precision=precision), cache_weights(cache))
        cut = plan_cut(extractors[precision], config.backbone, args.unfreeze_from)
        head_layers = head.to_keras(tuple(cache.manifest["feature_shape"]))
        with using(precision):
            models[precision] = trainable_model(extractors[precision], cut, head_layers)
    prefix = prefix_cache(cache, cut, args.workdir, args.data).cache
    model, extractor = models["float32"], extractors["float32"]
    for layer in extractor.layers:  # the full path trains exactly the same layers
        layer.trainable = layer.trainable and layer.name in cut.trainable
    size = config.image_size
    pixels = keras.Input((size, size, 3))
    preprocessed = preprocessing_layer(backbones.get(config.backbone), config.preprocess, size)(pixels)
    full = keras.Model(pixels, model.get_layer(head_layers.name)(extractor(preprocessed)))
    loss = "binary_crossentropy" if head_layers.output_shape[-1] == 1 else "sparse_categorical_crossentropy"
    for precision, net in (*models.items(), ("float32", full)):
        with using(precision):
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

    steps = timed_steps({**{p: (m, prefix_batches) for p, m in models.items()}, "full": (full, image_batches)},
                        args.steps)
    prefix_step, bf16_step, full_step = steps["float32"], steps["mixed_bfloat16"], steps["full"]
    flags = cpu_flags()
    case = bf16_case(flags)
    started = time.perf_counter()
    model.fit(split_batches(prefix, "train", args.batch_size, 0), epochs=1, verbose=0, shuffle=False)
    prefix_epoch_measured = time.perf_counter() - started

    results = {
        "backbone": config.backbone, "image_size": size, "unfreeze_from": cut.unfreeze_from,
        "prefix_layer": cut.prefix_layer, "prefix_shape": prefix.manifest["feature_shape"],
        "train_rows": n_train, "batch_size": args.batch_size, "steps_timed": args.steps,
        "prefix_seconds_per_step": prefix_step, "full_seconds_per_step": full_step,
        "prefix_bf16_seconds_per_step": bf16_step, "prefix_bf16_seconds_per_epoch": bf16_step * steps_per_epoch,
        "bf16_vs_float32": prefix_step / bf16_step,
        "cpu_flags": {flag: flag in flags for flag in BF16_FLAGS}, "bf16_case": case,
        "prefix_seconds_per_epoch": prefix_step * steps_per_epoch,
        "prefix_seconds_per_epoch_measured": prefix_epoch_measured,
        "full_seconds_per_epoch": full_step * steps_per_epoch,
        "speedup": full_step / prefix_step,
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
    }
    print(f"fine-tuning {config.backbone} from {cut.unfreeze_from} at {size} px, {n_train} training rows, "
          f"batch {args.batch_size}, {results['trainable_params']:,} trainable parameters")
    print("CPU flags: " + ", ".join(f"{flag} {'present' if flag in flags else 'absent'}" for flag in BF16_FLAGS)
          + f"; case: {case}")
    print(f"{'path':<36}{'s/step':>10}{'s/epoch':>12}")
    print(f"{'cached prefix (' + cut.prefix_layer + '), float32':<36}{prefix_step:>10.3f}"
          f"{results['prefix_seconds_per_epoch']:>12.1f}   (whole epoch: {prefix_epoch_measured:.1f} s)")
    print(f"{'cached prefix, mixed_bfloat16':<36}{bf16_step:>10.3f}{results['prefix_bf16_seconds_per_epoch']:>12.1f}")
    print(f"{'full model (decode + base), float32':<36}{full_step:>10.3f}{results['full_seconds_per_epoch']:>12.1f}")
    print(f"speed-up of the cached prefix over the full model (float32): {results['speedup']:.1f}x")
    print(f"bf16/float32 step speed on the cached prefix: {results['bf16_vs_float32']:.2f}x ({case})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
