"""Connecting to Ray and checking, before any trial starts, that the request can be served."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import uuid
from dataclasses import dataclass

import ray

from marsseg.errors import MarsSegError


class SearchError(MarsSegError):
    """A search that cannot start: unreachable cluster, unservable resources, unwritable storage."""


@dataclass(frozen=True)
class Capacity:
    """What the connected cluster offers."""

    nodes: int
    cpus: float
    gpus: float
    max_gpus_per_node: float
    max_cpus_per_node: float


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


def capacity() -> Capacity:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    resources = [n.get("Resources", {}) for n in nodes]
    return Capacity(
        nodes=len(nodes),
        cpus=sum(r.get("CPU", 0) for r in resources),
        gpus=sum(r.get("GPU", 0) for r in resources),
        max_gpus_per_node=max((r.get("GPU", 0) for r in resources), default=0),
        max_cpus_per_node=max((r.get("CPU", 0) for r in resources), default=0),
    )


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


def check_storage(storage: str) -> str:
    """Make sure the experiment storage exists and is writable; return it (absolute if local)."""
    if "://" in storage:
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
        return storage
    path = os.path.abspath(os.path.expanduser(storage))
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
