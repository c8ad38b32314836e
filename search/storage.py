"""Where an experiment lives, and whether every node reaches it.

Every node writes checkpoints to the experiment folder and a retried trial reads them back on
another node, so on a cluster of several nodes the folder must be one that every node reaches:
an object store URI (`s3://...`), or a path on a filesystem every node mounts, declared as such
with `file:///...`. A plain path is taken as local to this machine.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from marsseg.errors import SearchError, first_line
from marsseg.fileio import check_writable
from search.capacity import Capacity

SHARED_PATH_SCHEME = "file"
"""`--storage file:///mnt/nfs/x` says: /mnt/nfs/x is on a filesystem that every node mounts."""
BUCKET_SCHEMES = ("s3", "gs", "gcs")
REMOTE_SCHEMES = (*BUCKET_SCHEMES, "abfs", "abfss", "hdfs", "viewfs")
"""The object stores and cluster filesystems Tune reaches through pyarrow; another scheme would
fail inside Ray, after the flags were taken."""


@dataclass(frozen=True)
class Storage:
    """Where the experiments go, as Tune is given it, and whether every node reaches it."""

    path: str
    """An absolute local path or a remote URI: what `RunConfig(storage_path=...)` receives."""
    shared: bool
    """A remote URI, or a path declared mounted on every node with `file://`."""

    @property
    def flag(self) -> str:
        """What `--storage` takes to name this storage again (`check_storage(flag)` gives it
        back): a shared local path keeps its `file://`, which a plain path would drop."""
        if self.shared and "://" not in self.path:
            return f"{SHARED_PATH_SCHEME}://{quote(self.path)}"
        return self.path

    def experiment(self, name: str) -> str:
        """Where Tune keeps the experiment `name`: its path or URI."""
        return f"{self.path.rstrip('/')}/{name}"


def parse_storage(storage: str) -> Storage:
    """The `Storage` that `--storage` names, touching nothing (see `check_storage`).

    `file:///abs/path` is a local path that the user declares mounted on every node; it reaches
    Tune as the plain path (Ray treats both alike). As with S3, the driver's own files (the
    study, the leaderboard) are written on the driver and uploaded beside the trials (see
    `search.experiment`).
    """
    if urlparse(storage).scheme == SHARED_PATH_SCHEME:
        return Storage(_shared_path(storage), shared=True)
    if "://" in storage:
        return Storage(_remote_uri(storage), shared=True)
    return Storage(os.path.abspath(os.path.expanduser(storage)), shared=False)


def check_storage(storage: str) -> Storage:
    """Make sure the experiment storage is, or can be made, a writable folder (a remote one is
    checked by name); say whether all nodes reach it."""
    parsed = parse_storage(storage)
    if "://" in parsed.path:
        _check_remote(parsed.path)
    else:
        _writable_dir(parsed.path)
    return parsed


def _shared_path(storage: str) -> str:
    parsed = urlparse(storage)
    path = unquote(parsed.path)
    if parsed.netloc or not os.path.isabs(path):
        raise SearchError(
            f"--storage {storage}: a file:// storage must be an absolute path on this machine, "
            "e.g. file:///mnt/nfs/experiments"
        )
    return path


def _remote_uri(storage: str) -> str:
    """`storage` if it names a bucket (or host) of a scheme Tune can write to; checked here,
    without contacting it, so a typo is refused in one line before anything starts."""
    parsed = urlparse(storage)
    if parsed.scheme not in REMOTE_SCHEMES:
        raise SearchError(
            f"--storage {storage}: unknown scheme '{parsed.scheme}://'; use a local path, "
            f"{SHARED_PATH_SCHEME}:///a/shared/mount, or one of "
            + ", ".join(f"{scheme}://" for scheme in REMOTE_SCHEMES)
        )
    if parsed.scheme in BUCKET_SCHEMES and not parsed.netloc:
        raise SearchError(
            f"--storage {storage}: no bucket named; e.g. {parsed.scheme}://my-bucket/experiments"
        )
    return storage


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
        first = first_line(err)
        raise SearchError(f"storage {storage} is not writable: {first}") from None


def _writable_dir(path: str) -> str:
    """`path` if it is, or can be made, a writable folder; not created here, so a start refused
    later (the cluster's capacity, say) leaves no empty storage behind."""
    check_writable(path, what="storage")  # a file there, or above it, is named as such
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


def upload_files(folder: Path, names: Iterable[str], target: str) -> None:
    """Copy the files `names` that exist in `folder` to the folder or URI `target`.

    SQLite files (`.db`) are copied through SQLite's online backup, so the copy is a consistent
    snapshot even while the study is being written.
    """
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(target)
    fs.create_dir(root, recursive=True)
    with tempfile.TemporaryDirectory(prefix="marsseg-sync-") as staging:
        for name in names:
            source = folder / name
            if not source.is_file():
                continue
            if source.suffix == ".db":
                source = _sqlite_snapshot(source, Path(staging) / name)
            pyarrow.fs.copy_files(
                str(source),
                f"{root.rstrip('/')}/{name}",
                source_filesystem=pyarrow.fs.LocalFileSystem(),
                destination_filesystem=fs,
            )


def download_files(target: str, names: Iterable[str], folder: Path) -> list[str]:
    """Copy the files `names` that exist at the folder or URI `target` into `folder`; return
    the names copied. `folder` is created only when there is a file to copy, so asking for an
    experiment that does not exist leaves no empty folder behind."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(target)
    fetched = []
    for name in names:
        remote = f"{root.rstrip('/')}/{name}"
        if fs.get_file_info(remote).type != pyarrow.fs.FileType.File:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(
            remote,
            str((folder / name).resolve()),
            source_filesystem=fs,
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )
        fetched.append(name)
    return fetched


def folder_entries(target: str) -> frozenset[str]:
    """The names of what the folder or URI `target` holds (none when it does not exist)."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(target)
    selector = pyarrow.fs.FileSelector(root, allow_not_found=True)
    return frozenset(entry.base_name for entry in fs.get_file_info(selector))


def delete_folder(target: str, keep: Iterable[str] = ()) -> None:
    """Delete what the folder or URI `target` holds, except the entries named in `keep`; a
    missing folder is nothing to delete."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(target)
    for entry in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if entry.base_name in keep:
            continue
        if entry.type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(entry.path)
        else:
            fs.delete_file(entry.path)


def _sqlite_snapshot(source: Path, copy: Path) -> Path:
    with (
        contextlib.closing(sqlite3.connect(source)) as db,
        contextlib.closing(sqlite3.connect(copy)) as out,
    ):
        db.backup(out)
    return copy
