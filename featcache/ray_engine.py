"""The Ray engine: the local engine's shard writer, run by a pool of Ray Data actors.

The driver (``extract.extract``) plans the shards, holds the cache lock and writes the manifest
exactly as for a local run; only the writing of the missing shards moves. Every missing shard is
one row of a Ray Dataset, and each actor, which loads the backbone once, turns one row into one
complete shard with ``extract.write_shards`` (temporary name, then rename). Only shard plans
travel: images, weights and shards are read and written where they lie, so on a cluster of several
machines the data, the workdir and the weights store must be on a filesystem that every node mounts
at the same path.

Ray is an optional extra and is imported here only, when the engine is used.
"""

from __future__ import annotations

import logging
import pickle
import socket
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from featcache import FeatcacheError, cache, quiet
from featcache.extract import FeaturePass, ShardJob, pending_rows, write_shards
from featcache.model import extraction_model
from featcache.progress import ImageProgress

INSTALL = "pip install 'featcache[ray]'"


def import_ray():
    """Ray and Ray Data, or one line saying how to install them."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise FeatcacheError(f"--engine ray needs Ray Data, which is not installed: {INSTALL}") from None
    return ray


class RayEngine:
    """Write the missing shards on a Ray cluster: ``workers`` actors, each with its share of CPUs
    and GPUs, one shard per call.

    ``address`` None starts a Ray instance on this machine for the run (or joins $RAY_ADDRESS);
    ``"auto"`` joins the cluster started here by ``ray start``. ``workers`` None uses as many as
    the cluster fits, at most one per missing shard.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0):
        import_ray()
        if workers is not None and workers < 1:
            raise FeatcacheError(f"--workers {workers}: give 1 or more")
        if cpus_per_worker <= 0:
            raise FeatcacheError(f"--cpus-per-worker {cpus_per_worker}: give a number above 0")
        if gpus_per_worker < 0:
            raise FeatcacheError(f"--num-gpus-per-worker {gpus_per_worker}: give 0 or more")
        self.address, self.workers = address, workers
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker

    def __call__(self, job: ShardJob, todo: list[cache.ShardPlan], source: cache.RowSource, model,
                 show_progress: bool) -> int:
        if not todo:
            return 0
        job = replace(job, cache_dir=job.cache_dir.absolute(),
                      weights_arg=str(Path(job.weights_arg).absolute()) if job.weights_arg else None)
        items = [shard_item(plan, source) for plan in todo]
        with connected(self.address) as ray:
            size = self.pool_size(ray.cluster_resources(), len(todo))
            # TensorFlow threads per actor = the CPUs Ray reserved for it, so actors sharing a node do
            # not fight over its cores
            threads = max(1, int(self.cpus_per_worker))
            shards = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardWriter, batch_size=1, fn_constructor_kwargs={"job": job, "threads": threads},
                compute=ray.data.ActorPoolStrategy(size=size), num_cpus=self.cpus_per_worker,
                num_gpus=self.gpus_per_worker,
            )
            context = ray.data.DataContext.get_current()
            bars, context.enable_progress_bars = context.enable_progress_bars, False  # ours counts images
            computed = resolved = 0
            try:
                with ImageProgress(sum(item["pending"] for item in items), enabled=show_progress) as progress:
                    for row in shards.iter_rows():
                        if row["error"]:
                            raise FeatcacheError(row["error"])
                        computed += int(row["computed"])
                        resolved += int(row["pending"])
                        progress.advance_to(resolved)
            finally:
                context.enable_progress_bars = bars
            return computed

    def pool_size(self, resources: dict, shards: int) -> int:
        """Actors to start: as asked (checked against the cluster, so a run never waits for resources
        that are not there), else as many as fit; never more than there are shards."""
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        fits = int(cpus // self.cpus_per_worker)
        if self.gpus_per_worker:
            fits = min(fits, int(gpus // self.gpus_per_worker))
        wanted = self.workers or max(fits, 1)
        if wanted > fits:
            gpu = f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
            each = f"{self.cpus_per_worker:g} CPU{gpu}"
            raise FeatcacheError(
                f"{wanted} Ray workers of {each} each do not fit the cluster ({cpus:g} CPUs, {gpus:g} GPUs; "
                "`ray status` lists them): ask for fewer with --workers, or add nodes"
            )
        return min(wanted, shards)


def shard_item(plan: cache.ShardPlan, source: cache.RowSource) -> dict:
    """One row of the Ray Dataset: a shard plan with the reusable rows it needs, pickled (Arrow holds
    bytes), with every path absolute because workers do not share the driver's working directory."""
    plan = replace(plan, samples=tuple(replace(s, path=s.path.absolute()) for s in plan.samples))
    reusable = source.only([s.sha256 for s in plan.samples])  # only this shard's part of the index
    return {"shard": plan.name, "pending": len(pending_rows([plan], reusable)),
            "work": pickle.dumps((plan, reusable))}


class ShardWriter:
    """A Ray Data actor: loads the backbone once (when a shard first needs it), then writes one whole
    shard per call with the local engine's ``write_shards``."""

    def __init__(self, job: ShardJob, threads: int):
        quiet.quiet_tensorflow()  # the worker's stderr reaches the driver's terminal through Ray
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        for gpu in tf.config.list_physical_devices("GPU"):  # a fractional --num-gpus-per-worker shares
            tf.config.experimental.set_memory_growth(gpu, True)  # a GPU: allocate only what is used
        self.job = job
        self.backbone: FeaturePass | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write the batch's shards; a user-facing problem comes back as the row's ``error`` (Ray
        passes exceptions on to the driver only as traceback text, and the CLI prints one line)."""
        computed, errors = [], []
        for work in batch["work"]:
            try:
                computed.append(self.write(*pickle.loads(work)))
                errors.append("")
            except FeatcacheError as exc:
                computed.append(0)
                errors.append(str(exc))
        return {"shard": batch["shard"], "pending": batch["pending"], "computed": np.array(computed),
                "error": np.array(errors)}

    def write(self, plan: cache.ShardPlan, source: cache.RowSource) -> int:
        if not self.job.cache_dir.is_dir():
            raise FeatcacheError(
                f"cache folder {self.job.cache_dir} does not exist on Ray node {socket.gethostname()}: "
                "put the workdir and the data on a filesystem every node mounts at the same path"
            )
        backbone = self.load_backbone() if pending_rows([plan], source) else None
        return write_shards(self.job, [plan], source, backbone)

    def load_backbone(self) -> FeaturePass:
        if self.backbone is None:
            weights = self.job.weights_arg
            if weights and not Path(weights).is_file():
                raise FeatcacheError(
                    f"weights file {weights} does not exist on Ray node {socket.gethostname()}: share the "
                    "weights store ($FEATCACHE_WEIGHTS) between nodes, or run `featcache weights install "
                    f"{self.job.config.backbone}` on every node"
                )
            self.backbone = FeaturePass(extraction_model(self.job.config, weights), self.job.xla)
        return self.backbone


@contextmanager
def connected(address: str | None):
    """Ray for the length of a run: an instance already initialised is used and left running; one
    started or joined here is shut down afterwards."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        level = logging.WARNING if quiet.is_verbose() else logging.ERROR  # e.g. Ray's token-auth notice
        ray.init(address=address, include_dashboard=False, logging_level=level,
                 runtime_env={"env_vars": quiet.worker_env()})
    except ConnectionError as exc:
        raise FeatcacheError(
            f"--address {address}: no Ray cluster found ({exc}); start one with `ray start --head`, "
            "or leave --address out to start Ray on this machine"
        ) from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress line, not Ray Data's every 10 s
    try:
        yield ray
    finally:
        ray.shutdown()
