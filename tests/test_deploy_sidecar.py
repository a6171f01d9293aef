"""The sidecar examples (deploy/sidecar-*.yml): valid, and arranged so shared memory works between the containers."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantd.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
SERVER_FIELDS = set(ServerConfig.__dataclass_fields__)


def test_sidecar_compose_shares_processes_ipc_user_and_gpu():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed (in the test extra)")
    path = ROOT / "deploy/sidecar-compose.yml"
    check = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    services = yaml.safe_load(path.read_text())["services"]
    quantd, trainer = services["quantd"], services["trainer"]
    assert trainer["pid"] == "service:quantd"  # quantd opens the trainer's memory files through /proc
    assert quantd["ipc"] == "shareable" and trainer["ipc"] == "service:quantd"
    assert trainer["user"] == "10001:10001"  # the image's user: /proc/<pid>/fd is open to the same uid
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in (quantd, trainer)]
    assert gpus[0] == gpus[1]
    assert all(n.removeprefix("QUANTD_").lower() in SERVER_FIELDS for n in quantd["environment"])


def test_sidecar_pod_shares_processes_dev_shm_and_user():
    pod = yaml.safe_load((ROOT / "deploy/sidecar-kubernetes.yaml").read_text())
    assert pod["spec"]["shareProcessNamespace"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    for container in containers.values():
        (dshm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[dshm["name"]]["emptyDir"]["medium"] == "Memory"
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    env = {e["name"]: e["value"] for e in containers["quantd"]["env"]}
    assert env["QUANTD_HOST"] == "127.0.0.1"
    assert all(n.removeprefix("QUANTD_").lower() in SERVER_FIELDS for n in env)
