"""Cluster support: the launcher configs against Ray's own code, and searches on a multi-node Ray.

The multi-node tests start a real Ray cluster on this machine (`ray.cluster_utils.Cluster`): a
head without CPUs, so no trial can land on it, and two worker nodes with two CPUs and one
logical GPU each. Scheduling, placement and node failure are Ray's real ones; only the compute
runs on the CPU. All nodes share this machine's disk, so a `file://` folder is honestly shared.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import pandas as pd
import pytest
import ray
import yaml
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import Cluster
from search_helpers import RAY_ENV, search_args

from marsseg.cli import run_cli
from marsseg.errors import SearchError
from search.capacity import (
    Capacity,
    capacity,
    check_trial_resources,
    concurrent_trials,
    with_autoscaling,
)
from search.run import main as search_main
from search.storage import Storage, check_shared_storage, check_storage

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_CONFIGS = [p for p in (REPO / "cluster.yaml", REPO / "cluster.local.yaml") if p.exists()]
CONSTRAINTS = REPO / "constraints" / "cluster.txt"
"""The versions every node of a cluster installs (pip constraints: `name==version` lines)."""
WORKER = {"num_cpus": 2, "num_gpus": 1}
"""Each worker node: two trials at --gpus-per-trial 0.5 and one CPU per trial."""
RAY_WORKER_LOG = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|[\w.:-]+ pid=)")
"""A line Ray forwards from a worker process to the driver's stderr."""
IMAGES = ["--limit-images", "160"]
"""Trials train on this many images of the shared synthetic archive: seconds per epoch."""


# --- launcher configs: Ray's schema and `prepare_config`, offline -----------------------------


@pytest.fixture
def offline(monkeypatch):
    """Fail any outgoing connection: validating a launcher config must not reach AWS."""

    def refuse(sock: socket.socket, address: Any) -> None:
        raise AssertionError(f"network access to {address} while validating a cluster config")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _described(name: str, vcpus: int, mib: int, gpu: str = "", gpus: int = 0) -> dict:
    described = {
        "InstanceType": name,
        "VCpuInfo": {"DefaultVCpus": vcpus},
        "MemoryInfo": {"SizeInMiB": mib},
    }
    if gpus:
        described["GpuInfo"] = {"Gpus": [{"Name": gpu, "Manufacturer": "NVIDIA", "Count": gpus}]}
    return described


EC2_INSTANCE_TYPES = [
    _described("m5.xlarge", 4, 16384),
    _described("g5.xlarge", 4, 16384, "A10G", 1),
    _described("g6.xlarge", 4, 16384, "L4", 1),
    _described("g5.12xlarge", 48, 196608, "A10G", 4),
]
"""EC2's DescribeInstanceTypes answer for the types these tests use, cut to the fields Ray's
resource detection reads (`ray up` asks AWS; the tests stay offline)."""


def prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does with a config before it creates anything (`_bootstrap_config`): fill in
    the provider's defaults and merge the setup commands, let the provider fill in the resources
    of each node type (AWS: from the instance type; its EC2 query answered by
    EC2_INSTANCE_TYPES), then check the result against Ray's JSON schema."""
    config = prepare_config(copy.deepcopy(config))
    provider = _NODE_PROVIDERS[config["provider"]["type"]](config["provider"])
    with mock.patch(
        "ray.autoscaler._private.aws.node_provider.list_ec2_instances",
        lambda region, aws_credentials=None: copy.deepcopy(EC2_INSTANCE_TYPES),
    ):
        config = provider.fillout_available_node_types_resources(config)
    validate_config(config)
    return config


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_both_launcher_configs_exist():
    assert [p.name for p in LAUNCHER_CONFIGS] == ["cluster.yaml", "cluster.local.yaml"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema_and_preparation(offline, path):
    config = prepared(load(path))
    assert config["head_node_type"] in config["available_node_types"]
    for remote, local in config["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard must stay on loopback"
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_aws_config_has_a_cpu_head_and_autoscaling_spot_gpu_workers(offline):
    config = prepared(load(REPO / "cluster.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"
    (worker,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert worker["resources"]["GPU"] == 1 and worker["min_workers"] == 0
    assert worker["max_workers"] == config["max_workers"] > 0
    assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert worker["node_config"]["InstanceType"].split(".")[0] in {"g5", "g6"}
    assert config["idle_timeout_minutes"] > 0
    assert config["provider"]["cache_stopped_nodes"] is False


def test_autoscaling_capacity_counts_the_workers_cluster_yaml_can_add(offline):
    """Right after `ray up` only the CPU-less head is alive: judged by live nodes alone, a GPU
    search would be refused. Counting what the autoscaler may add, it is sized for them all."""
    config = prepared(load(REPO / "cluster.yaml"))
    head_alone = Capacity(
        nodes=1, cpus=0, gpus=0, max_gpus_per_node=0, max_cpus_per_node=0, max_nodes=1
    )
    cap = with_autoscaling(head_alone, config, head=[{"CPU": 0.0}])
    workers = config["max_workers"]
    assert (cap.gpus, cap.max_gpus_per_node, cap.max_nodes) == (workers, 1, workers + 1)
    assert cap.describe().startswith(f"1 node(s) now, up to {workers + 1} as the autoscaler")
    check_trial_resources(cap, cpus_per_trial=2, gpus_per_trial=0.5)
    assert concurrent_trials(cap, cpus_per_trial=2, gpus_per_trial=0.5) == 2 * workers
    with pytest.raises(SearchError, match=f"the cluster can grow to {workers + 1} nodes"):
        check_shared_storage(Storage("/home/ray/experiments", shared=False), cap)
    check_shared_storage(Storage("s3://bucket/experiments", shared=True), cap)


def test_worker_resources_are_detected_from_the_instance_type(offline):
    """No `resources:` on the worker type: `ray up` fills them in from the instance type, so an
    edited InstanceType cannot leave stale numbers behind. The head keeps its CPU: 0 override."""
    raw = load(REPO / "cluster.yaml")
    types = raw["available_node_types"]
    (worker_type,) = [name for name in types if name != raw["head_node_type"]]
    assert "resources" not in types[worker_type], "resources left to Ray's detection"
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}

    config = prepared(raw)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the override must win over the 4 detected vCPUs"
    worker = config["available_node_types"][worker_type]["resources"]
    assert (worker["CPU"], worker["GPU"], worker["accelerator_type:A10G"]) == (4, 1, 1)
    assert worker["memory"] == int(16384 * 2**20 * 0.7)  # 70%: the rest is the object store

    bigger = copy.deepcopy(raw)
    bigger["available_node_types"][worker_type]["node_config"]["InstanceType"] = "g5.12xlarge"
    config = prepared(bigger)
    assert config["available_node_types"][worker_type]["resources"]["GPU"] == 4
    cap = with_autoscaling(
        Capacity(nodes=1, cpus=0, gpus=0, max_gpus_per_node=0, max_cpus_per_node=0, max_nodes=1),
        config,
        head=[{"CPU": 0.0}],
    )
    assert (cap.gpus, cap.max_gpus_per_node) == (4 * config["max_workers"], 4)


def test_workers_get_the_role_the_head_may_pass_to_them(offline):
    """Workers write to S3, so they get Ray's default role; launching an instance with a role
    takes iam:PassRole on it, which Ray does not grant its role. cluster.iam-policy.json does."""
    from ray.autoscaler._private.aws.config import (
        DEFAULT_RAY_IAM_ROLE,
        DEFAULT_RAY_INSTANCE_PROFILE,
    )

    config = prepared(load(REPO / "cluster.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # No profile on the head: `ray up` creates (or reuses) ray-autoscaler-v1 and gives it to it.
    assert "IamInstanceProfile" not in head["node_config"]
    for name, spec in types.items():
        if name != config["head_node_type"]:
            profile = spec["node_config"]["IamInstanceProfile"]
            assert profile == {"Name": DEFAULT_RAY_INSTANCE_PROFILE}, name

    policy = json.loads((REPO / "cluster.iam-policy.json").read_text())
    (statement,) = policy["Statement"]
    assert (statement["Effect"], statement["Action"]) == ("Allow", "iam:PassRole")
    assert statement["Resource"] == f"arn:aws:iam::*:role/{DEFAULT_RAY_IAM_ROLE}"
    assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    # The command that installs it, as the YAML's comment and the README give it (two lines).
    command = re.compile(
        rf"aws iam put-role-policy --role-name {DEFAULT_RAY_IAM_ROLE} \\\n[#\s]*"
        r"--policy-name ray-pass-role --policy-document file://cluster\.iam-policy\.json"
    )
    for doc in ("cluster.yaml", "README.md"):
        assert command.search((REPO / doc).read_text()), f"{doc} lacks the put-role-policy command"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def test_every_node_runs_the_pinned_ray(offline):
    """The images in cluster.yaml and the Dockerfile carry the Ray version of the constraints
    file, and every pip install on a node goes through that file: one Ray on every node."""
    ray_pin = _pins()["ray"]
    # CI installs with the constraints file (.ci/run), so it tests exactly this Ray; another
    # patch release of the series (a venv made without the file) still passes here.
    assert ray.__version__.split(".")[:2] == ray_pin.split(".")[:2], (ray.__version__, ray_pin)
    docker = load(REPO / "cluster.yaml")["docker"]
    for key in ("image", "head_image", "worker_image"):
        assert docker[key].startswith(f"rayproject/ray:{ray_pin}-py311-"), (key, docker[key])
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray_pin}-py311-gpu\nFROM ${{RAY_IMAGE}}" in dockerfile
    assert "COPY constraints/cluster.txt " in dockerfile
    for doc in ("cluster.yaml", "Dockerfile", "README.md"):  # the worker image's suggested tag
        tags = set(re.findall(r"marsseg-worker:([\w.-]+)", (REPO / doc).read_text()))
        assert tags == {ray_pin}, (doc, tags)

    for path in LAUNCHER_CONFIGS:
        config = prepared(load(path))
        assert "~/marsseg-search" in config["file_mounts"]
        commands = [
            command
            for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
            for command in config.get(key, [])
            if "pip install" in command
        ]
        assert commands, path.name
        for command in commands:
            assert "-c ~/marsseg-search/constraints/cluster.txt" in command, (path.name, command)
    local = " ".join(load(REPO / "cluster.local.yaml")["setup_commands"])
    assert "python3.11 -m venv" in local, "the local nodes' Python must be the images' 3.11"


def _rename_key(old: str, new: str) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        config[new] = config.pop(old)

    return mutate


def _worker_resource(name: str, value: float) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        head = config["head_node_type"]
        for node_type, spec in config["available_node_types"].items():
            if node_type != head:
                spec.setdefault("resources", {})[name] = value

    return mutate


def _node_type_key(old: str, new: str) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        for spec in config["available_node_types"].values():
            if old in spec:
                spec[new] = spec.pop(old)

    return mutate


@pytest.mark.parametrize(
    ("path", "mutate", "expected"),
    [
        ("cluster.yaml", _rename_key("idle_timeout_minutes", "idle_timeout"), "'idle_timeout'"),
        ("cluster.yaml", _worker_resource("GPU", 0.5), "0.5 is not of type 'integer'"),
        ("cluster.yaml", _worker_resource("CPU", 3.5), "3.5 is not of type 'integer'"),
        ("cluster.yaml", _node_type_key("min_workers", "min_worker"), "'min_worker'"),
        ("cluster.yaml", _rename_key("setup_commands", "setup_command"), "'setup_command'"),
        ("cluster.local.yaml", _rename_key("cluster_name", "name"), "'name' was unexpected"),
    ],
    ids=["idle_timeout", "gpu-0.5", "cpu-3.5", "min_worker", "setup_command", "local-name"],
)
def test_typos_and_fractional_resources_fail_rays_validation(offline, path, mutate, expected):
    """Ray's own schema catches both kinds: unknown keys (`additionalProperties: false`) and a
    fractional resource (node-type resources are `integer`); no check of ours is needed."""
    config = load(REPO / path)
    prepared(config)  # the config as written passes: the mutation is what fails
    mutate(config)
    with pytest.raises(jsonschema.ValidationError) as err:
        prepared(config)
    assert expected in err.value.message


# --- a multi-node Ray on this machine -----------------------------------------------------------


@pytest.fixture
def head_folder(tmp_path, monkeypatch) -> Path:
    """The driver's working folder: with shared (file://) storage it keeps its files in
    ./experiments/<name>, which must not land in the checkout the tests run from."""
    head = tmp_path / "head"
    head.mkdir()
    monkeypatch.chdir(head)
    return head


@pytest.fixture(scope="module")
def ray_cluster():
    """A head with no CPU (the driver only) and two one-GPU workers, shared by this module."""
    ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)  # before the nodes start: their processes inherit it
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                # Notice a killed node within seconds instead of Ray's default half minute.
                "_system_config": {
                    "health_check_initial_delay_ms": 0,
                    "health_check_period_ms": 1000,
                    "health_check_failure_threshold": 3,
                },
            },
        )
        try:
            for _ in range(2):
                cluster.add_node(**WORKER)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@dataclass(frozen=True)
class Epoch:
    epoch: int
    node_id: str
    start: float
    end: float


def epochs_per_trial(experiment: Path) -> dict[str, list[Epoch]]:
    """Every epoch each trial reported, in order, from the trials' `result.json` files."""
    runs = {}
    for path in sorted(experiment.glob("train_trial_*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs[path.parent.name] = [
            Epoch(r["epoch"], r["node_id"], r["timestamp"] - r["time_this_iter_s"], r["timestamp"])
            for r in rows
        ]
    return runs


def worker_ids(cluster: Cluster) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


def test_capacity_of_the_live_cluster(ray_cluster, tmp_path):
    cap = capacity()
    assert (cap.nodes, cap.cpus, cap.gpus, cap.max_gpus_per_node) == (3, 4, 2, 1)
    assert cap.multi_node and concurrent_trials(cap, 1, 0.5) == 4
    assert cap.describe() == "3 node(s), 4 CPUs, 2 GPUs"
    assert capacity(tmp_path / "no-such-config.yaml") == cap

    # On a head started by `ray up`, the launcher's config adds the workers still to come
    # (`ray up` writes it as JSON, despite the file's name).
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(json.dumps(prepared(load(REPO / "cluster.yaml"))))
    grown = capacity(bootstrap)
    workers = load(REPO / "cluster.yaml")["max_workers"]
    assert (grown.nodes, grown.max_nodes, grown.gpus) == (3, workers + 1, workers)


def test_storage_says_whether_every_node_reaches_it(tmp_path):
    shared = check_storage(f"file://{tmp_path}/nfs%20mount")
    assert shared == Storage(f"{tmp_path}/nfs mount", shared=True)
    assert not (tmp_path / "nfs mount").exists()  # checked, not made: the search makes it
    local = check_storage(str(tmp_path / "x"))
    assert local == Storage(str(tmp_path / "x"), shared=False)
    for storage in (shared, local):  # what the next-steps hint prints names it again
        assert check_storage(storage.flag) == storage
    with pytest.raises(SearchError, match="must be an absolute path"):
        check_storage("file://relative/experiments")


def test_trials_spread_over_worker_nodes_and_share_gpus(
    ray_cluster, synthetic_archive_path, tmp_path, head_folder
):
    storage = f"file://{tmp_path}/nfs"  # not there yet: the search makes it
    args = search_args(synthetic_archive_path, storage, "spread", samples=4, epochs=2)
    args += [*IMAGES, "--gpus-per-trial", "0.5", "--max-concurrent", "4"]
    assert search_main(args) == 0

    experiment = tmp_path / "nfs" / "spread"
    board = pd.read_csv(experiment / "leaderboard.csv")  # beside the trials: file:// is shared
    assert (experiment / "optuna.db").is_file()
    assert (head_folder / "experiments" / "spread" / "optuna.db").is_file()  # the driver's copy
    assert len(board) == 4 and set(board["status"]) <= {"complete", "stopped"}
    runs = epochs_per_trial(experiment)
    used = {e.node_id for epochs in runs.values() for e in epochs}
    assert len(runs) == 4 and used <= worker_ids(ray_cluster) and len(used) == 2, used
    assert set(board["node_id"]) <= used

    # Half a GPU each: two trials shared one node's GPU at the same time.
    spans = [
        (epochs[0].node_id, epochs[0].start, epochs[-1].end)
        for epochs in runs.values()
        if len({e.node_id for e in epochs}) == 1
    ]
    shared = [
        (a, b)
        for i, a in enumerate(spans)
        for b in spans[i + 1 :]
        if a[0] == b[0] and a[1] < b[2] and b[1] < a[2]
    ]
    assert shared, f"no two trials ran on one node at once: {spans}"


def test_node_local_storage_is_refused_on_a_multi_node_cluster(
    ray_cluster, synthetic_archive_path, tmp_path, capsys
):
    args = search_args(synthetic_archive_path, tmp_path, "local", samples=2, epochs=1)
    assert run_cli(search_main, [*args, "--gpus-per-trial", "0.5"]) == 2
    # Ray may still be forwarding an earlier test's worker logs, "(train_trial pid=...) ...".
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    ours = [line for line in lines if not RAY_WORKER_LOG.match(line)]
    assert len(ours) == 1, lines
    err = ours[0]
    assert err.startswith(f"error: storage {tmp_path} is a path on this machine only, but the ")
    assert "cluster has 3 nodes" in err and "their own disks" in err
    assert f"--storage file://{tmp_path}" in err and "s3://" in err
    assert not (tmp_path / "local").exists(), "the refused search started anyway"


def test_trials_of_a_lost_node_resume_from_their_checkpoints_on_another(
    ray_cluster, synthetic_archive_path, tmp_path, head_folder
):
    """Kill a worker node while each of its trials is mid-run with a checkpoint on storage."""
    samples, epochs = 4, 4
    experiment = tmp_path / "lost"
    args = search_args(synthetic_archive_path, f"file://{tmp_path}", "lost", samples, epochs=epochs)
    # No early stopping (grace period = all epochs): every trial must reach the last epoch.
    args += [*IMAGES, "--gpus-per-trial", "0.5", "--max-concurrent", "4"]
    args += ["--grace-period", str(epochs)]
    victim = min(ray_cluster.worker_nodes, key=lambda node: node.node_id)
    removed = threading.Event()
    done = threading.Event()

    def kill_victim_mid_run() -> None:
        # Checkpoints are written by the trials straight to storage (result.json only by the
        # driver, with a delay): once every trial has one and none has its last, both nodes
        # hold two trials that have reported an epoch and still have epochs to go.
        last = f"checkpoint_{epochs - 1:06d}"
        while not done.is_set():
            trials = [p for p in experiment.glob("train_trial_*") if any(p.glob("checkpoint_*"))]
            if any((p / last).exists() for p in trials):
                return  # too late: a trial has finished, the test fails below
            if len(trials) == samples:
                ray_cluster.remove_node(victim, allow_graceful=False)  # like a spot reclaim
                removed.set()
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_victim_mid_run, daemon=True)
    killer.start()
    try:
        assert search_main(args) == 0
    finally:
        done.set()
        killer.join()
        if removed.is_set():
            ray_cluster.add_node(**WORKER)  # back to two workers for any test after this one
    assert removed.is_set(), "every trial had to checkpoint before any finished; none was killed"

    board = pd.read_csv(experiment / "leaderboard.csv")
    shown = board[["trial", "status", "epochs", "node_id"]].to_string()
    assert len(board) == samples and set(board["status"]) == {"complete"}, shown
    runs = epochs_per_trial(experiment)
    assert len(runs) == samples
    moved = {}
    for trial, history in runs.items():
        # No trial lost an epoch or repeated one: a retry continued where its checkpoint was.
        assert [e.epoch for e in history] == list(range(1, epochs + 1)), (trial, history)
        nodes = list(dict.fromkeys(e.node_id for e in history))
        if nodes[0] == victim.node_id:
            moved[trial] = history
            assert len(nodes) == 2, (trial, nodes)  # then a surviving node to the end
            first_elsewhere = next(e.epoch for e in history if e.node_id != victim.node_id)
            assert first_elsewhere > 1, f"{trial} restarted from epoch 1"
    assert len(moved) == 2, f"expected the victim's two trials to move: {sorted(runs)}"
    moved_rows = board[board["trial"].isin([t.removeprefix("train_trial_") for t in moved])]
    assert len(moved_rows) == len(moved)
    assert all(ids.startswith(victim.node_id + " > ") for ids in moved_rows["node_id"])
