"""Connecting to Ray and checking, before any trial starts, that the request can be served.

Three facts about a cluster decide what a search may do, and all are checked here rather than
discovered by a trial hours later:

- Capacity: what the live nodes offer plus what the autoscaler may still add. A cluster from
  `ray up cluster.yaml` starts with no GPU worker (`min_workers: 0`); judged by its live nodes
  alone, a GPU search would be refused and run one trial at a time.
- Storage: every node writes checkpoints to the experiment folder and a retried trial reads
  them back on another node, so on a cluster of several nodes the folder must be one that
  every node reaches: an object store URI (`s3://...`), or a path on a filesystem every node
  mounts, declared as such with `file:///...`. A plain path is taken as local to this machine.
- GPU memory: Ray shares a GPU among trials by count (`--gpus-per-trial 0.25`: four), not by
  memory, so the heaviest trial the search may run is measured on a GPU first and the packing
  refused when that many of it would not fit.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import ray
import yaml

from marsseg.config import TrainConfig
from marsseg.errors import MarsSegError
from marsseg.models import list_models

AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")
"""Where `ray up` leaves the cluster config on the head node (Ray Tune looks for the same file
to tell an autoscaling cluster); a search started there reads the worker types from it."""
HEAD_RESOURCE = "node:__internal_head__"
"""The resource Ray puts on the head node only."""
SHARED_PATH_SCHEME = "file"
"""`--storage file:///mnt/nfs/x` says: /mnt/nfs/x is on a filesystem that every node mounts."""
PACKING_HEADROOM = 0.9
"""Share of a GPU's free memory that packed trials may plan to fill: the rest absorbs what one
measurement cannot see (allocator fragmentation over a long run, each trial's own CUDA context)."""
WORST_CASE_BATCH = 64
"""The largest `batch_size` the search spaces sample (`spaces.common.suggest_training`)."""
PROBE_TIMEOUT_S = 600
"""How long the packing check waits for a GPU to measure on before it gives up and says so."""


class SearchError(MarsSegError):
    """A search that cannot start: unreachable cluster, unservable resources, unwritable storage."""


@dataclass(frozen=True)
class Capacity:
    """What the connected cluster offers, counting the workers its autoscaler may add."""

    nodes: int
    """Live nodes now."""
    cpus: float
    gpus: float
    max_gpus_per_node: float
    max_cpus_per_node: float
    max_nodes: int = 0
    """Nodes the cluster may grow to (the live ones when no autoscaler can add any)."""

    @property
    def multi_node(self) -> bool:
        """Whether trials may run on more than one machine, now or once the cluster scales."""
        return max(self.nodes, self.max_nodes) > 1

    def describe(self) -> str:
        """One line for the start of a search, e.g. `3 node(s), 4 CPUs, 2 GPUs`."""
        totals = f"{self.cpus:g} CPUs, {self.gpus:g} GPUs"
        if self.max_nodes <= self.nodes:
            return f"{self.nodes} node(s), {totals}"
        return (
            f"{self.nodes} node(s) now, up to {self.max_nodes} as the autoscaler adds workers "
            f"({totals} then)"
        )


@dataclass(frozen=True)
class Storage:
    """Where the experiments go, as Tune is given it, and whether every node reaches it."""

    path: str
    """An absolute local path or a remote URI: what `RunConfig(storage_path=...)` receives."""
    shared: bool
    """A remote URI, or a path declared mounted on every node with `file://`."""


def connect(address: str | None) -> None:
    """Start a local Ray (address None) or join a cluster; one clear line if it cannot be reached.

    A `host:port` address is probed with a plain TCP connection first: Ray's own client keeps
    retrying an unreachable head for a minute or more before it gives up.
    """
    if address not in (None, "auto", "local") and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise SearchError(f"--address must be 'auto' or HOST:PORT, got {address!r}")
        try:
            with socket.create_connection((host, int(port)), timeout=3):
                pass
        except OSError as err:
            raise SearchError(f"cannot reach a Ray cluster at {address}: {err}") from None
    if ray.is_initialized():
        return  # a caller (a notebook, a test) already connected: use that Ray
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SearchError(
            f"cannot connect to Ray at {address or 'a new local instance'}: {first}"
        ) from None


def capacity(autoscaler_config: Path | None = None) -> Capacity:
    """The live nodes' resources, raised to what the autoscaler may add when its config is given.

    `autoscaler_config` is the cluster launcher's config (`AUTOSCALER_CONFIG` on a head node);
    a missing file means no autoscaler, as on a local Ray or a hand-started cluster.
    """
    resources = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    live = Capacity(
        nodes=len(resources),
        cpus=sum(r.get("CPU", 0) for r in resources),
        gpus=sum(r.get("GPU", 0) for r in resources),
        max_gpus_per_node=max((r.get("GPU", 0) for r in resources), default=0),
        max_cpus_per_node=max((r.get("CPU", 0) for r in resources), default=0),
        max_nodes=len(resources),
    )
    if autoscaler_config is None or not autoscaler_config.expanduser().is_file():
        return live
    head = [r for r in resources if HEAD_RESOURCE in r]
    return with_autoscaling(live, _read_yaml(autoscaler_config.expanduser()), head)


def with_autoscaling(
    live: Capacity, config: dict[str, Any], head: list[dict[str, float]]
) -> Capacity:
    """`live` raised to the most the launcher config's worker types can add beside the head.

    Each worker type counts up to its `max_workers`, and all of them together up to the global
    `max_workers`, the biggest nodes first: an upper bound, which is what sizing the search's
    concurrency needs (Tune queues the trials the cluster cannot place yet, and the autoscaler
    adds nodes for them).
    """
    node_types = config.get("available_node_types") or {}
    budget = int(config.get("max_workers", 0))
    workers = [
        (int(spec.get("max_workers", budget)), spec.get("resources") or {})
        for name, spec in node_types.items()
        if name != config.get("head_node_type")
    ]
    if not workers or budget <= 0:
        return live

    def most(key: str) -> float:
        total, left = 0.0, budget
        for count, res in sorted(workers, key=lambda w: -float(w[1].get(key, 0))):
            take = min(count, left)
            total, left = total + take * float(res.get(key, 0)), left - take
        return total

    max_nodes = len(head) + min(budget, sum(count for count, _ in workers))
    return Capacity(
        nodes=live.nodes,
        cpus=max(live.cpus, sum(r.get("CPU", 0) for r in head) + most("CPU")),
        gpus=max(live.gpus, sum(r.get("GPU", 0) for r in head) + most("GPU")),
        max_gpus_per_node=max(
            [live.max_gpus_per_node] + [float(r.get("GPU", 0)) for _, r in workers]
        ),
        max_cpus_per_node=max(
            [live.max_cpus_per_node] + [float(r.get("CPU", 0)) for _, r in workers]
        ),
        max_nodes=max(live.max_nodes, max_nodes),
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SearchError(f"cannot read the autoscaler config {path}: {err}") from None
    if not isinstance(config, dict):
        raise SearchError(f"the autoscaler config {path} is not a mapping")
    return config


def check_trial_resources(cap: Capacity, cpus_per_trial: float, gpus_per_trial: float) -> None:
    """A trial must fit on one node: Ray would otherwise leave it pending forever."""
    if gpus_per_trial > 0 and cap.max_gpus_per_node == 0:
        raise SearchError(f"--gpus-per-trial {gpus_per_trial:g} asked, but no node has a GPU")
    if gpus_per_trial > cap.max_gpus_per_node:
        raise SearchError(
            f"--gpus-per-trial {gpus_per_trial:g} is more than any node has "
            f"(at most {cap.max_gpus_per_node:g} GPUs per node)"
        )
    if cpus_per_trial > cap.max_cpus_per_node:
        raise SearchError(
            f"--cpus-per-trial {cpus_per_trial:g} is more than any node has "
            f"(at most {cap.max_cpus_per_node:g} CPUs per node)"
        )


def check_packing(per_trial_bytes: int, free_bytes: int, trials_per_gpu: int) -> None:
    """Refuse to pack `trials_per_gpu` trials of `per_trial_bytes` each into `free_bytes`."""
    need = trials_per_gpu * per_trial_bytes
    usable = PACKING_HEADROOM * free_bytes
    if need <= usable:
        return
    fits = math.floor(usable / per_trial_bytes) if per_trial_bytes else trials_per_gpu
    advice = (
        f"use --gpus-per-trial {math.floor(1e6 / fits) / 1e6:g} or more ({fits} per GPU)"
        if fits >= 1
        else "even one trial does not fit: lower the batch size or use a larger GPU"
    )
    raise SearchError(
        f"{trials_per_gpu} trials per GPU need about {_gib(need)} GiB ({_gib(per_trial_bytes)} "
        f"GiB each at their peak), more than {PACKING_HEADROOM:.0%} of the {_gib(free_bytes)} "
        f"GiB free on the GPU: {advice}"
    )


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f}"


def trials_per_gpu(gpus_per_trial: float) -> int:
    """How many trials Ray places on one GPU when each asks for `gpus_per_trial` of it."""
    return math.floor(1 / gpus_per_trial + 1e-9)


def check_gpu_packing(base: TrainConfig, archive_images: int, gpus_per_trial: float) -> None:
    """When trials share a GPU, measure the search's heaviest trial on one and check they fit.

    The worst case is every registered architecture at its default knobs, at the largest batch
    the spaces sample, with the boundary loss's distance maps and the offline preset's copy of
    the whole archive resident on the GPU. Skipped for whole GPUs, or while no GPU node is up
    (an autoscaling cluster starts without one).
    """
    if not 0 < gpus_per_trial < 1:
        return
    if not ray.cluster_resources().get("GPU"):
        print("packing check skipped: no GPU node is up yet to measure on")
        return
    print(f"packing check: measuring the heaviest trial on a GPU ({len(list_models())} models)")
    probe = _measure_heaviest.options(num_gpus=gpus_per_trial).remote(
        worst_case_configs(base), 2 * archive_images
    )
    try:
        measured = ray.get(probe, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(probe, force=True)
        print(f"packing check skipped: no GPU free to measure on within {PROBE_TIMEOUT_S} s")
        return
    except ray.exceptions.RayTaskError as err:
        cause = str(err.cause).strip().splitlines() if err.cause else []
        raise SearchError(
            f"packing check: measuring on the GPU failed: {cause[0] if cause else err}"
        ) from None
    if measured is None:
        print("packing check skipped: the GPU node's torch sees no CUDA device")
        return
    per_trial, free, heaviest = measured
    trials = trials_per_gpu(gpus_per_trial)
    print(
        f"packing check: {trials} trials per GPU, heaviest {heaviest} at "
        f"{_gib(per_trial)} GiB each, {_gib(free)} GiB free"
    )
    check_packing(per_trial, free, trials)


def worst_case_configs(base: TrainConfig) -> list[TrainConfig]:
    """`base` with each registered architecture, batch 64, distance maps on, no online loader."""
    data = base.to_dict()
    data["batch_size"] = max(base.batch_size, WORST_CASE_BATCH)
    data["augment"]["intensity"] = 0.0  # the training set stays on the GPU
    if not base.loss.needs_distance_maps:
        data["loss"]["boundary_ramp"] = 0.01  # any value > 0 puts the distance maps on the GPU
    return [TrainConfig.from_dict({**data, "model": {"name": name}}) for name in list_models()]


@ray.remote(num_cpus=1, max_retries=0)
def _measure_heaviest(configs: list[TrainConfig], images: int) -> tuple[int, int, str] | None:
    """On a GPU: (peak bytes of the heaviest config, free bytes, its architecture), or None
    where torch sees no CUDA device (a node that declares GPUs it does not have, as in tests).

    Free memory is read before anything is allocated; what the process keeps outside the
    allocator once its kernels are loaded (cuDNN, cuBLAS) is added to the peak.
    """
    import torch

    from marsseg.train.memory import training_memory

    if not torch.cuda.is_available():
        return None
    free_before, _ = torch.cuda.mem_get_info()
    peaks = {config.model.name: training_memory(config, images) or 0 for config in configs}
    free_after, _ = torch.cuda.mem_get_info()
    heaviest = max(peaks, key=peaks.__getitem__)
    return peaks[heaviest] + max(0, free_before - free_after), free_before, heaviest


def concurrent_trials(cap: Capacity, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials the whole cluster can run at once (OptunaSearch runs one unless told)."""
    by_cpu = math.floor(cap.cpus / cpus_per_trial) if cpus_per_trial else math.inf
    by_gpu = math.floor(cap.gpus / gpus_per_trial + 1e-9) if gpus_per_trial else math.inf
    return max(1, int(min(by_cpu, by_gpu)))


def check_storage(storage: str) -> Storage:
    """Make sure the experiment storage exists and is writable; say whether all nodes reach it.

    `file:///abs/path` is a local path that the user declares mounted on every node; it reaches
    Tune as the plain path (Ray treats both alike), so the study and the leaderboard sit in the
    experiment folder beside the trials, as they do for a local path.
    """
    if urlparse(storage).scheme == SHARED_PATH_SCHEME:
        return Storage(_writable_dir(_shared_path(storage)), shared=True)
    if "://" in storage:
        _check_remote(storage)
        return Storage(storage, shared=True)
    return Storage(_writable_dir(os.path.abspath(os.path.expanduser(storage))), shared=False)


def _shared_path(storage: str) -> str:
    parsed = urlparse(storage)
    path = unquote(parsed.path)
    if parsed.netloc or not os.path.isabs(path):
        raise SearchError(
            f"--storage {storage}: a file:// storage must be an absolute path on this machine, "
            "e.g. file:///mnt/nfs/experiments"
        )
    return path


def _check_remote(storage: str) -> None:
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
        fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except Exception as err:  # pyarrow raises many kinds; all mean "cannot use it"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SearchError(f"storage {storage} is not writable: {first}") from None


def _writable_dir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{uuid.uuid4().hex}")
        with open(probe, "w") as handle:
            handle.write("ok")
        with contextlib.suppress(OSError):
            os.remove(probe)
    except OSError as err:
        raise SearchError(f"storage {path} is not writable: {err.strerror or err}") from None
    return path


def check_shared_storage(storage: Storage, cap: Capacity) -> None:
    """Refuse a node-local experiment folder when trials may run on other machines.

    Each trial writes its checkpoints from the node it runs on, and a trial retried after its
    node died resumes from them on another node: on a path local to each machine the
    checkpoints would scatter over the workers' disks, and the retry would start from epoch 1.
    """
    if storage.shared or not cap.multi_node:
        return
    nodes = (
        f"the cluster has {cap.nodes} nodes"
        if cap.nodes > 1
        else f"the cluster can grow to {cap.max_nodes} nodes"
    )
    raise SearchError(
        f"storage {storage.path} is a path on this machine only, but {nodes}: trials on other "
        "nodes would write their checkpoints to their own disks, where neither this search nor "
        "a trial retried on another node can read them. Use --storage s3://bucket/prefix, or, "
        "if the path is on a filesystem every node mounts (NFS, EFS), say so with "
        f"--storage file://{storage.path}"
    )
