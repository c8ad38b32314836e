"""Where an experiment lives, and whether every node reaches it.

Every node writes checkpoints to the experiment folder and a retried trial reads them back on
another node, so on a cluster of several nodes the folder must be one that every node reaches:
an object store URI (`s3://...`), or a path on a filesystem every node mounts, declared as such
with `file:///...`. A plain path is taken as local to this machine.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from marsseg.errors import SearchError
from search.capacity import Capacity

SHARED_PATH_SCHEME = "file"
"""`--storage file:///mnt/nfs/x` says: /mnt/nfs/x is on a filesystem that every node mounts."""


@dataclass(frozen=True)
class Storage:
    """Where the experiments go, as Tune is given it, and whether every node reaches it."""

    path: str
    """An absolute local path or a remote URI: what `RunConfig(storage_path=...)` receives."""
    shared: bool
    """A remote URI, or a path declared mounted on every node with `file://`."""


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
