"""Checks of the deployment files under infra/: they parse, name entry points and make
targets that exist, keep services private, and grant S3 access only where needed."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from anomaly.config import load_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
RAYJOB_YAML = INFRA / "k8s" / "rayjob-train.yaml"
POLICY_JSON = INFRA / "iam" / "policy.json"

# Files that tell people which commands to run.
DOCUMENTS = [
    INFRA / "README.md",
    CLUSTER_YAML,
    RAYJOB_YAML,
    INFRA / "jobs.mk",
    INFRA / "submit.py",
    INFRA / "docker" / "Dockerfile",
]

BUCKET = "my-anomaly-bucket"
PREFIXES = ("raw/", "shards/", "runs/")
S3_ACTIONS = {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}


def load_cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def load_rayjob() -> tuple[dict[str, Any], dict[str, Any]]:
    documents = [doc for doc in yaml.safe_load_all(RAYJOB_YAML.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in documents}
    assert sorted(by_kind) == ["RayJob", "ServiceAccount"]
    return by_kind["RayJob"], by_kind["ServiceAccount"]


def load_policy() -> dict[str, Any]:
    return json.loads(POLICY_JSON.read_text())


def make_targets() -> set[str]:
    """Targets defined in the top-level Makefile and in infra/jobs.mk."""
    targets: set[str] = set()
    for path in (REPO / "Makefile", INFRA / "jobs.mk"):
        for line in path.read_text().splitlines():
            match = re.match(r"^([A-Za-z0-9_.-]+)\s*:(?![:=])", line)
            if match:
                targets.add(match.group(1))
    return targets


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


# --- AWS cluster launcher config ---------------------------------------------


def test_cluster_yaml_passes_ray_schema() -> None:
    # Ray's own validation, after merging the AWS defaults the way `ray up` does.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_cluster()
    validate_config(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_node_types_and_costs() -> None:
    config = load_cluster()
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]
    workers = {name: node for name, node in nodes.items() if name != config["head_node_type"]}

    assert not re.match(r"(g|p)\d", head["InstanceType"]), "the head node should not pay for a GPU"
    assert workers, "no worker node type"
    for name, node in workers.items():
        assert re.match(r"(g|p)\d", node["node_config"]["InstanceType"]), f"{name} is not a GPU type"
        assert node["min_workers"] == 0, f"{name} keeps idle GPU nodes"
        assert node["max_workers"] <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert config["provider"]["cache_stopped_nodes"] is False


def test_cluster_uses_instance_profiles_not_keys() -> None:
    config = load_cluster()
    for name, node in config["available_node_types"].items():
        assert "IamInstanceProfile" in node["node_config"], f"{name} has no instance profile for S3"
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "aws_secret_access_key" not in text.lower()
    assert "AWS_SECRET_ACCESS_KEY" not in text


def test_cluster_dashboard_and_usage_stats() -> None:
    config = load_cluster()
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    starts = [cmd for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in cmd]
    assert len(starts) == 2
    for command in starts:
        assert "--disable-usage-stats" in command
    assert "--env RAY_USAGE_STATS_ENABLED=0" in config["docker"]["run_options"]


def test_cluster_installs_requirements() -> None:
    config = load_cluster()
    mounts = config["file_mounts"]
    remote = next(remote for remote, local in mounts.items() if Path(local).name == "requirements.txt")
    for local in mounts.values():
        assert (REPO / local).is_file(), f"file_mounts names {local}, which does not exist"
    assert any(f"-r {remote}" in command for command in config["setup_commands"])
    # The image must match the Ray release and Python minor version the project pins.
    ray_pin = re.search(r"ray\[[^\]]*\]==([\d.]+)", (REPO / "requirements.txt").read_text())
    assert ray_pin is not None
    for key in ("image", "head_image"):
        assert config["docker"][key].startswith(f"rayproject/ray:{ray_pin.group(1)}-py311")


# --- KubeRay RayJob -----------------------------------------------------------


def test_rayjob_manifest_structure() -> None:
    rayjob, account = load_rayjob()
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]

    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        for container in pod["containers"]:
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            assert env.get("RAY_USAGE_STATS_ENABLED") == "0", container["name"]
            assert not any("SECRET" in name or "ACCESS_KEY" in name for name in env), container["name"]

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


def test_rayjob_entrypoint_matches_cluster() -> None:
    rayjob, _ = load_rayjob()
    spec = rayjob["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.train"]
    assert (REPO / "jobs" / "train.py").is_file()

    options: dict[str, list[str]] = {}
    for option, value in zip(words[3::2], words[4::2]):
        options.setdefault(option, []).append(value)
    assert options["--shards"][0].startswith("s3://")
    assert options["--output"][0].startswith("s3://")
    overrides = dict(item.split("=", 1) for item in options["--set"])
    assert overrides["ray.use_gpu"] == "true"

    # The config file and every override must load as the job would load them.
    config_path = REPO / options["--config"][0]
    assert config_path.is_file(), f"{config_path} does not exist"
    config = load_config(str(config_path), options["--set"])
    assert config.ray.use_gpu is True

    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert config.ray.num_workers == sum(group["replicas"] for group in groups)
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
            # KubeRay advertises the container's CPU limit to Ray unless rayStartParams sets num-cpus
            # (Ray docs, "RayCluster Configuration"), so a larger request could never be scheduled.
            assert float(container["resources"]["limits"]["cpu"]) >= config.ray.cpus_per_worker
    # The decoding processes leave at least one reserved core to the training process.
    assert config.data.loader_workers < config.ray.cpus_per_worker


# --- entry points and make targets named anywhere in infra/ --------------------


def test_named_job_modules_exist() -> None:
    named: set[str] = set()
    for path in DOCUMENTS:
        named.update(re.findall(r"-m jobs\.([a-z_]+)", path.read_text()))
    assert {"train", "build_shards", "evaluate", "tune", "score"} <= named
    missing = sorted(name for name in named if not (REPO / "jobs" / f"{name}.py").is_file())
    assert not missing, f"infra/ names python -m jobs.X for modules that do not exist: {missing}"


def test_named_config_files_exist() -> None:
    named: set[str] = set()
    for path in DOCUMENTS:
        # Lower case only: methodN.yaml is a placeholder in the docs.
        named.update(re.findall(r"jobs/configs/[a-z0-9_-]+\.yaml", path.read_text()))
    assert named
    missing = sorted(name for name in named if not (REPO / name).is_file())
    assert not missing, f"infra/ names config files that do not exist: {missing}"


def test_named_make_targets_exist() -> None:
    targets = make_targets()
    named: set[str] = set()
    for path in DOCUMENTS:
        named.update(re.findall(r"\bmake ([a-z][a-z0-9-]*)", path.read_text()))
    assert {"submit", "job-status", "job-logs", "job-stop", "cluster-up", "cluster-down"} <= named
    missing = sorted(named - targets)
    assert not missing, f"infra/ names make targets that are not defined: {missing}"


def test_makefile_includes_jobs_mk() -> None:
    assert re.search(r"^include infra/jobs\.mk$", (REPO / "Makefile").read_text(), re.MULTILINE)


def test_make_submit_expands_variables() -> None:
    result = subprocess.run(
        ["make", "-n", "-C", str(REPO), "-o", "setup", "submit", "JOB=train",
         "CONFIG=jobs/configs/method4.yaml", "ARGS=--shards s3://b/shards --output s3://b/runs/x"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    expected = ("-m infra.submit submit --job train --config jobs/configs/method4.yaml --python python "
                "-- --shards s3://b/shards --output s3://b/runs/x")
    assert expected in result.stdout


def test_make_submit_requires_job() -> None:
    # Only the infra target runs: the recipe's first line fails before submit.py starts.
    result = subprocess.run(
        ["make", "-C", str(REPO), "-o", "setup", "submit"], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "set JOB" in result.stderr


# --- IAM policy ---------------------------------------------------------------


def allows(policy: dict[str, Any], action: str, resource: str, prefix: str | None = None) -> bool:
    """Evaluate Allow statements the way IAM matches actions, resources and StringLike on s3:prefix."""
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        if not any(fnmatch.fnmatchcase(action, pattern) for pattern in as_list(statement["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, pattern) for pattern in as_list(statement["Resource"])):
            continue
        condition = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if condition is None:
            return True
        # A request without a prefix does not satisfy StringLike on s3:prefix.
        if prefix is not None and any(fnmatch.fnmatchcase(prefix, pattern) for pattern in as_list(condition)):
            return True
    return False


def test_policy_shape() -> None:
    policy = load_policy()
    assert policy["Version"] == "2012-10-17"
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}, statement.get("Sid")
        actions = as_list(statement["Action"])
        assert not any("*" in action for action in actions), statement["Sid"]
        assert set(actions) <= S3_ACTIONS, statement["Sid"]
        # allows() below understands only this condition.
        if "Condition" in statement:
            assert list(statement["Condition"]) == ["StringLike"], statement["Sid"]
            assert list(statement["Condition"]["StringLike"]) == ["s3:prefix"], statement["Sid"]


def test_policy_resources_inside_prefixes() -> None:
    policy = load_policy()
    bucket_arn = f"arn:aws:s3:::{BUCKET}"
    for statement in policy["Statement"]:
        for resource in as_list(statement["Resource"]):
            if resource == bucket_arn:
                assert as_list(statement["Action"]) == ["s3:ListBucket"], statement["Sid"]
                prefixes = as_list(statement["Condition"]["StringLike"]["s3:prefix"])
                assert sorted(prefixes) == sorted(f"{prefix}*" for prefix in PREFIXES)
                continue
            assert any(resource == f"{bucket_arn}/{prefix}*" for prefix in PREFIXES), resource


@pytest.mark.parametrize(
    ("action", "key", "allowed"),
    [
        ("s3:GetObject", "raw/whole/whole_0001.jpg", True),
        ("s3:PutObject", "raw/whole/whole_0001.jpg", False),
        ("s3:DeleteObject", "raw/whole/whole_0001.jpg", False),
        ("s3:GetObject", "shards/car-256/index.json", True),
        ("s3:PutObject", "shards/car-256/train-000000.tar", True),
        ("s3:AbortMultipartUpload", "shards/car-256/train-000000.tar", True),
        ("s3:DeleteObject", "shards/car-256/train-000000.tar", False),
        ("s3:PutObject", "runs/m4/train/checkpoint_000001/model.pt", True),
        ("s3:DeleteObject", "runs/m4/train/checkpoint_000001/model.pt", True),
        ("s3:GetObject", "other/secret.csv", False),
        ("s3:PutObject", "other/file", False),
        ("s3:PutObjectAcl", "runs/m4/model.pt", False),
        ("s3:GetObject", "rawish/file", False),
    ],
)
def test_policy_object_access(action: str, key: str, allowed: bool) -> None:
    assert allows(load_policy(), action, f"arn:aws:s3:::{BUCKET}/{key}") is allowed


@pytest.mark.parametrize(
    ("prefix", "allowed"),
    [
        ("raw/", True),
        ("shards/car-256/", True),
        ("runs/m4", True),
        ("", False),
        (None, False),
        ("other/", False),
    ],
)
def test_policy_listing(prefix: str | None, allowed: bool) -> None:
    assert allows(load_policy(), "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", prefix) is allowed


def test_policy_denies_other_buckets() -> None:
    policy = load_policy()
    assert not allows(policy, "s3:GetObject", "arn:aws:s3:::another-bucket/raw/x.jpg")
    assert not allows(policy, "s3:ListBucket", "arn:aws:s3:::another-bucket", "raw/")
