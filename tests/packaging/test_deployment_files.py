"""The deployment files for the engines teams run, which cannot run here: each parses as
its engine reads it and holds what sandboxd needs (docs/scale-out.md says what was run)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hcl2
import yaml

CONTRIB = Path(__file__).parents[2] / "contrib"
CAPABILITIES = {"CHOWN", "DAC_OVERRIDE", "KILL", "SETUID", "SETGID", "SYS_ADMIN", "SYS_PTRACE"}


def _plain(value: Any) -> Any:
    """python-hcl2's tree without its quotes and markers."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def test_the_nomad_job_runs_both_on_every_client_behind_ready():
    with open(CONTRIB / "nomad" / "sandboxd.nomad.hcl") as source:
        tree = _plain(hcl2.load(source))
    job = tree["job"][0]["sandboxd"]
    assert job["type"] == "system"
    group = job["group"][0]["node"]
    assert group["network"][0]["mode"] == "host"
    tasks = {name: task for block in group["task"] for name, task in block.items()}
    assert set(tasks) == {"sandboxd", "gateway"}
    assert all(task["driver"] == "raw_exec" for task in tasks.values())
    assert tasks["sandboxd"]["config"][0]["command"] == "/usr/bin/sandboxd"
    assert tasks["sandboxd"]["env"][0]["SANDBOXD_NODE"] == "${node.unique.name}"
    assert tasks["gateway"]["user"] == "sandboxd-gateway"  # root only in the daemon
    check = group["service"][0]["check"][0]
    assert (check["type"], check["path"]) == ("http", "/ready")


def test_the_daemonset_has_the_privileges_the_probe_and_a_service():
    documents = list(yaml.safe_load_all((CONTRIB / "kubernetes" / "sandboxd.yaml").read_text()))
    kinds = {document["kind"]: document for document in documents}
    assert set(kinds) == {"DaemonSet", "Service"}
    pod = kinds["DaemonSet"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    security = container["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == CAPABILITIES  # contrib/container/run's
    assert security["procMount"] == "Unmasked"
    host_paths = {volume["hostPath"]["path"] for volume in pod["volumes"] if "hostPath" in volume}
    assert {"/sys/fs/cgroup", "/var/lib/sandboxd", "/dev/kvm"} <= host_paths
    mounts = {mount["name"] for mount in container["volumeMounts"]}
    assert mounts == {volume["name"] for volume in pod["volumes"]}
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["SANDBOXD_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["terminationGracePeriodSeconds"] >= 30  # the daemon's drain
    service = kinds["Service"]["spec"]
    assert service["selector"] == kinds["DaemonSet"]["spec"]["selector"]["matchLabels"]


def test_the_container_run_script_grants_the_same_capabilities():
    run = (CONTRIB / "container" / "run").read_text()
    [granted] = re.findall(r"--cap-add=(\S+)", run)
    assert set(granted.split(",")) == CAPABILITIES  # the pods' and podman's, one list
