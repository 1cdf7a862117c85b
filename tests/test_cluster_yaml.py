"""cluster.yaml passes the Ray cluster launcher's own validation, offline, and typos fail it.

The check is what ``ray up`` does before it talks to the cloud: the JSON schema shipped with Ray
(``ray/autoscaler/ray-schema.json``) over the raw file, then ``prepare_config`` (merging the AWS
provider defaults) and ``validate_config`` (the schema again plus Ray's cross-field checks, e.g.
``head_node_type`` must name a node type). No AWS call is made.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Raise like ``ray up`` would on a bad config; return the prepared config."""
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_offline(config: dict[str, Any]) -> None:
    prepared = validate_cluster_config(config)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_cluster_yaml_matches_the_project(config: dict[str, Any]) -> None:
    major, minor, patch = ray.__version__.split(".")[:3]
    image = config["docker"]["image"]
    assert image == f"rayproject/ray:{major}.{minor}.{patch}-py311-gpu"
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
    assert worker["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    assert "IamInstanceProfile" in worker["node_config"]
    assert any("pip install" in c and "/home/ray/mtcae" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/mtcae"] == "."
    head_start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert any("/mnt/efs" in option for option in config["docker"]["run_options"])


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["available_node_types"]["gpu_worker"].update(
        min_worker=c["available_node_types"]["gpu_worker"].pop("min_workers")), "min_worker"),
    (lambda c: c.update(setup_command=c.pop("setup_commands")), "setup_command"),
    (lambda c: c["available_node_types"]["head"].update(resources={"CPU": 0.5}), "0.5"),
    (lambda c: c["docker"].update(imgae=c["docker"].pop("image")), "imgae"),
])
def test_schema_rejects_typos(config: dict[str, Any], mutate, message: str) -> None:
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_cluster_config(broken)


def test_cross_field_check_rejects_unknown_head_type(config: dict[str, Any]) -> None:
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "headx"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_cluster_config(broken)
