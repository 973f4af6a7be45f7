"""What `--precision auto` chooses on this machine, per backbone: float32 and the mixed candidate timed side by side.

Runs ``featcache.extract.choose_precision`` for each backbone at its size (random weights time like
real ones) with a fresh memory, so every row is measured now, and prints a Markdown table with the
CPU flags it saw. On a machine without native bfloat16 or float16 there is nothing to time: every
row says float32 and why.

    python scripts/precision_choices.py                               # the README's table
    python scripts/precision_choices.py --networks vgg16:32              # the smoke test's run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

NETWORKS = ("vgg16:150", "inception_v3:299", "resnet50:224", "efficientnet_lite0:224", "mobilenet_v2:160",
            "mobilenet_v2:300", "mobilenet_v2_keras:224")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=NETWORKS, metavar="BACKBONE:PX")
    args = parser.parse_args()

    os.environ.pop("FEATCACHE_PRECISION", None)  # measure, whatever pins this machine's auto
    # a fresh memory (it lives beside the weights store; random weights need no store): measured now
    os.environ["FEATCACHE_WEIGHTS"] = str(Path(tempfile.mkdtemp()) / "weights")
    from featcache import precision, quiet

    quiet.quiet_tensorflow()
    from featcache.extract import choose_precision

    flags, gpus = precision.cpu_flags(), precision.gpu_capabilities()
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {precision.machine_id(flags, gpus)}; "
          f"candidate: {precision.candidate(flags, gpus) or 'none (float32 only)'}")
    print("\n| network | float32 img/s | candidate img/s | ratio | auto |\n|---|---:|---:|---:|---|")
    for network in args.networks:
        backbone, _, size = network.partition(":")
        choice = choose_precision(backbone, image_size=int(size) if size else None)
        rates = choice.rates
        mixed = next((p for p in rates if p != "float32"), None)
        if mixed:
            print(f"| {backbone}, {size} px | {rates['float32']:.1f} | {rates[mixed]:.1f} ({mixed}) | "
                  f"{rates[mixed] / rates['float32']:.2f}x | {choice.precision} |")
        else:
            print(f"| {backbone}, {size} px | - | - | - | {choice.precision}: {choice.reason} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
