"""Connecting to Ray and what the cluster can run: nodes, CPUs and GPUs, autoscaler included.

`start_ray` is how every stage that runs on Ray starts: the search's trials (`search.run`) and
the training tasks of `search.final` and `search.compare` get their CPUs and GPUs by the same
rules (1 CPU, and 1 GPU when the cluster has any, unless asked otherwise) and the same checks.

A cluster from `ray up cluster.yaml` starts with no GPU worker (`min_workers: 0`); judged by its
live nodes alone, a GPU search would be refused and run one trial at a time. So capacity counts
what the autoscaler may still add, and a trial that fits on no node is refused before it starts
(Ray would leave it pending forever).
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml

from marsseg.cli import handle_sigterm
from marsseg.errors import ConfigError, SearchError, first_line

AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")
"""Where `ray up` leaves the cluster config on the head node (Ray Tune looks for the same file
to tell an autoscaling cluster); a search started there reads the worker types from it."""
HEAD_RESOURCE = "node:__internal_head__"
"""The resource Ray puts on the head node only."""
RUN_CPUS = 1.0
"""CPUs of each trial or task when `--cpus-per-trial` is not given."""


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
class Started:
    """The Ray `start_ray` joined: its capacity, and the CPUs and GPUs each run asks for."""

    capacity: Capacity
    cpus: float
    gpus: float


def start_ray(address: str | None, cpus: float | None, gpus: float | None) -> Started:
    """Connect to Ray (`connect`), read what it can run and settle each trial's or task's
    resources: `cpus` (`RUN_CPUS` when None) and `gpus` (1 when None and the cluster has any,
    counting those its autoscaler may add); refuse resources no node can give, before Ray would
    leave the run pending forever.
    """
    cpus = RUN_CPUS if cpus is None else cpus
    if cpus <= 0 or (gpus or 0) < 0:
        raise ConfigError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    connect(address)
    # Only a cluster joined by address can have an autoscaler; a fresh local Ray never grows.
    cap = capacity(AUTOSCALER_CONFIG if address else None)
    gpus = gpus if gpus is not None else (1.0 if cap.gpus else 0.0)
    check_trial_resources(cap, cpus, gpus)
    return Started(cap, cpus, gpus)


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
        first = first_line(err)
        raise SearchError(
            f"cannot connect to Ray at {address or 'a new local instance'}: {first}"
        ) from None
    handle_sigterm()  # Ray's driver took SIGTERM over: a native stack dump instead of one line


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


def concurrent_trials(cap: Capacity, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials the whole cluster can run at once (OptunaSearch runs one unless told)."""
    by_cpu = math.floor(cap.cpus / cpus_per_trial) if cpus_per_trial else math.inf
    by_gpu = math.floor(cap.gpus / gpus_per_trial + 1e-9) if gpus_per_trial else math.inf
    return max(1, int(min(by_cpu, by_gpu)))
