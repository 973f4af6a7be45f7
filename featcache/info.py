"""Human-readable descriptions of caches and backbones for `featcache info` and `featcache backbones`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from featcache.backbones import Backbone
from featcache.cache import Cache

UNCUT_WIDTH = 100_000  # what "no limit" means for output that is not a terminal


def print_table(console: Console, table: Table) -> None:
    """Print a table with every cell whole: a terminal folds a long name onto the next line, a pipe or
    a file gets the table as wide as its longest row (rich would assume 80 columns and cut names)."""
    for column in table.columns:
        column.overflow = "fold"
    if not console.is_terminal:
        console = Console(file=console.file, width=UNCUT_WIDTH, soft_wrap=True, color_system=console.color_system)
    console.print(table)


def describe_cache(cache: Cache, console: Console) -> None:
    m = cache.manifest
    size_mb = sum(p.stat().st_size for p in cache.path.glob("*.h5")) / 2**20
    console.print(f"[bold]cache {m['key']}[/]\npath: {cache.path}  ({size_mb:.1f} MiB on disk)")
    console.print(
        f"status: {m['status']}; created {m['created']}, completed {m.get('completed')}; "
        f"featcache {m['featcache_version']}, format {m['format']}"
    )
    data = m["dataset"]
    console.print(f"dataset: {data['root']} ({data['layout']}, {data['images']} files); "
                  f"task: {m.get('task', 'classification')}")
    console.print(f"weights: {m['weights_source']}")
    provenance = Table(title="extraction config", show_header=False)
    for name, value in m["config"].items():
        provenance.add_row(name, str(value))
    provenance.add_row("output layer", str(m.get("output_layer")))
    provenance.add_row("feature shape", str(tuple(m["feature_shape"])))
    if also := m.get("also_layer"):
        provenance.add_row("also-layer shape", f"{also['name']} {tuple(also['shape'])} in {also['dataset']}")
    provenance.add_row("backbone params", f"{m['backbone_params']:,}" if m.get("backbone_params") else "-")
    print_table(console, provenance)
    print_table(console, counts_table(m))
    for reject in m.get("rejects", []):
        console.print(f"[red]rejected[/] {reject['relpath']}: {reject['reason']}")
    for warning in m.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(
        f"last run: {m.get('rows_computed', 0)} rows through the backbone, "
        f"{m.get('rows_reused', 0)} rows reused, {m.get('seconds', 0):.1f} s"
    )


def counts_table(manifest: dict) -> Table:
    """Rows per split and class; for a regression target, rows and the range of the values per split."""
    if not manifest["classes"]:
        table = Table(title="rows and values per split (regression)")
        for column in ("split", "rows", "min", "mean", "max"):
            table.add_column(column, justify="left" if column == "split" else "right")
        for split, info in manifest["splits"].items():
            values = info.get("values", {})
            table.add_row(split, str(info.get("rows", "-")), *(f"{values[k]:.4g}" if k in values else "-"
                                                               for k in ("min", "mean", "max")))
        return table
    ordered = " (ordered first to last)" if manifest.get("task") == "ordinal" else ""
    if manifest.get("task") == "multilabel":  # an image counts once under each of its classes
        ordered = " (images with each class; an image can have several or none)"
    table = Table(title=f"rows per split and class{ordered}")
    table.add_column("split")
    for name in manifest["classes"]:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for split, info in manifest["splits"].items():
        table.add_row(split, *(str(info["class_counts"][c]) for c in manifest["classes"]), str(info["rows"]))
    return table


def list_table(manifests: list[dict]) -> Table:
    table = Table(title="caches")
    for column in ("key", "status", "backbone", "layer", "pooling", "px", "rows", "completed"):
        table.add_column(column)
    for m in manifests:
        c = m["config"]
        rows = sum(s.get("rows", 0) for s in m["splits"].values())
        table.add_row(m["key"][:16], m["status"], c["backbone"], str(m.get("output_layer") or c["layer"]),
                      c["pooling"], str(c["image_size"]), str(rows), str(m.get("completed", "-")))
    return table


def layer_table(backbone: Backbone) -> Table:
    """Every layer of the conv base with output shape and parameter counts (built without weights)."""
    import numpy as np

    model = backbone.build(None, backbone.input_size)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    table = Table(
        title=f"{backbone.name} at {backbone.input_size} px: {trainable:,} trainable, "
        f"{frozen:,} non-trainable parameters"
    )
    for column in ("#", "layer", "type", "output shape", "params"):
        table.add_column(column)
    for i, layer in enumerate(model.layers):
        table.add_row(str(i), layer.name, type(layer).__name__, str(tuple(layer.output.shape)[1:]),
                      f"{layer.count_params():,}")
    return table
