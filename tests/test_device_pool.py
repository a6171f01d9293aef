"""Several devices: one server per GPU, a server owning a pool of GPUs (--device all | cuda:0,cuda:1), and CUDA IPC
across GPUs.

Without GPUs: the placement policy, the --device flag's checks, the devices and loads a server reports, and a client
spreading 100 tensors over two real CPU servers. With two GPUs (pytest -m gpu tests/test_device_pool.py): the same
over `--device cuda:0` and `--device cuda:1` servers, a `--device all` pool, and IPC tensors on a GPU the server
does not compute on.
"""
from __future__ import annotations

import concurrent.futures
import subprocess

import pytest
import torch
from grpc_harness import ServerProcess, quantd_command

from quantd.client import QuantdClient
from quantd.kernels import reference
from quantd.kernels.spec import QuantSpec
from quantd.server import app
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig
from quantd.server.placement import Placement

SPEC = QuantSpec("fp8_e4m3", group_size=128)
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (nvidia-h200-x2)")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8).cpu(),
                                                                      b.contiguous().view(torch.uint8).cpu())


def assert_exact(got, x: torch.Tensor, spec: QuantSpec = SPEC) -> None:
    want = reference.quantize(x.cpu(), spec)
    assert same_bits(got.codes, want.codes) and same_bits(got.scales, want.scales)


def inputs(rng, n: int) -> list:
    """n bf16 tensors of a few shapes, values spread over many binades (ragged last groups included)."""
    shapes = [(16, 256), (8, 200), (33, 128), (4, 1000)]
    return [(torch.randn(shapes[i % 4], generator=rng) * 2.0 ** torch.randint(-20, 20, (1,), generator=rng).item())
            .bfloat16() for i in range(n)]


def spread(targets, xs, transport="grpc", threads: int = 4) -> list:
    """Quantize every tensor through one QuantdClient over `targets`, `threads` calls at a time; the results."""
    with QuantdClient(targets, timeout=300, transport=transport) as client:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda x: client.quantize(x, SPEC, report=False), xs))


# -- placement ------------------------------------------------------------------------------------------------------
def test_placement_prefers_the_inputs_gpu_else_the_least_loaded():
    p = Placement(["cuda:0", "cuda:1", "cuda:2"])
    assert p.choose().index == 0 and p.choose().reason == "least loaded"  # all idle: the lowest index
    with p.hold(100) as a:
        assert a.index == 0
        with p.hold(50) as b:
            assert b.index == 1  # fewer bytes in flight than cuda:0
            with p.hold(10, preferred=0) as c:  # the input's GPU, however loaded
                assert (c.index, c.reason) == (0, "the input's GPU")
                assert [d.bytes_in_flight for d in p.loads] == [110, 50, 0]
                assert p.choose().index == 2
            with p.hold(0) as d:
                assert d.index == 2
                assert p.choose().index == 2  # bytes first: its request in flight holds none
    assert [(d.requests_in_flight, d.bytes_in_flight) for d in p.loads] == [(0, 0)] * 3
    assert [d.requests_total for d in p.loads] == [2, 1, 1]


def test_placement_ties_on_bytes_go_to_fewer_requests():
    p = Placement(["cuda:0", "cuda:1"])
    with p.hold(0):
        assert p.choose().index == 1  # equal bytes (0), cuda:0 has a request in flight
    with pytest.raises(RuntimeError):
        with p.hold(64):
            raise RuntimeError("a failed call still gives its load back")
    assert p.loads[0].bytes_in_flight == 0 and p.loads[0].requests_in_flight == 0


def test_a_single_device_is_always_chosen():
    p = Placement(["cuda:0"])
    with p.hold(1 << 30):
        assert (p.choose().index, p.choose().reason) == (0, "the only device")
        assert p.choose(preferred=0).reason == "the only device"
    with pytest.raises(ValueError):
        Placement([])


# -- the --device flag --------------------------------------------------------------------------------------------
def test_device_flag_forms():
    for ok in ("auto", "cpu", "cuda", "cuda:3", "all", "cuda:0,cuda:1", "cuda:1, cuda:0"):
        assert ServerConfig(device=ok).device == ok
    for bad in ("gpu", "cuda:0,cpu", "all,cuda:0", "cuda:x", "cuda:0,", "cpu,cpu"):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda, cuda:N, all or a list"):
            ServerConfig(device=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_gpu_devices_without_cuda_stop_the_start_with_the_reason():
    assert app.pick_devices("auto") == [torch.device("cpu")]
    for name in ("all", "cuda:0,cuda:1", "cuda"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            app.pick_devices(name)
    done = subprocess.run(quantd_command() + ["serve", "--port", "0", "--device", "all"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "quantd serve: device 'all' asked for, but CUDA is not available"


def test_device_indexes_are_checked_against_the_gpus_present(monkeypatch):
    """The checks of pick_devices on a host that reports two GPUs (torch.cuda's answers replaced)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda = [torch.device("cuda", i) for i in range(2)]
    assert app.pick_devices("all") == cuda
    assert app.pick_devices("cuda:1,cuda:0") == cuda[::-1]
    assert app.pick_devices("cuda") == app.pick_devices("auto") == cuda[:1]
    with pytest.raises(ValueError, match=r"^device cuda:2 asked for, but this host has cuda:0, cuda:1$"):
        app.pick_devices("cuda:0,cuda:2")
    with pytest.raises(ValueError, match="more than once"):
        app.pick_devices("cuda:1,cuda:1")


# -- what a server reports ------------------------------------------------------------------------------------------
def test_server_reports_its_devices_their_loads_and_each_calls_placement(rng):
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cpu")) as server:
        with QuantdClient(server.target) as client:
            x = inputs(rng, 1)[0]
            assert_exact(client.quantize(x, SPEC), x)
            assert client.last_placement == "cpu (the only device)"
            client.dequantize(client.quantize(x, SPEC, transport="shm"))
            assert client.last_placement == "cpu (the only device)"
            info = client.server_info()
            assert info["devices"] == [{"device": "cpu", "name": "cpu", "uuid": "", "requests_in_flight": 0,
                                        "bytes_in_flight": 0, "requests_total": 3}]
            assert info["ipc_device_uuids"] == []
        text = server.server.metrics.registry.get_sample_value
        assert text("quantd_device_requests_total", {"device": "cpu"}) == 3
        assert text("quantd_device_requests_in_flight", {"device": "cpu"}) == 0
        assert text("quantd_device_bytes_in_flight", {"device": "cpu"}) == 0


# -- one server per device ------------------------------------------------------------------------------------------
def test_a_client_spreads_100_tensors_over_two_servers(rng):
    """Two real servers (CPU here, one per GPU in a deployment), one client over both: every result bit-exact
    against the reference, and both servers computed some."""
    servers = [BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cpu")) for _ in range(2)]
    try:
        xs = inputs(rng, 100)
        for x, got in zip(xs, spread([s.target for s in servers], xs)):
            assert_exact(got, x)
        served = [s.server.servicer.placement.loads[0].requests_total for s in servers]
        assert sum(served) == 100 and min(served) > 0, served
    finally:
        for server in servers:
            server.stop()


# -- on two GPUs (pytest -m gpu tests/test_device_pool.py on nvidia-h200-x2) ----------------------------------------
def gpu_servers(processes, *device_args):
    for args in device_args:
        processes.append(ServerProcess(*args, wait=False))
    for server in processes:
        server.wait_serving()
    return processes


def device_totals(target) -> dict:
    with QuantdClient(target) as client:
        return {d["device"]: d["requests_total"] for d in client.server_info()["devices"]}


@pytest.mark.gpu
@two_gpus
def test_gpu_one_server_per_gpu_shares_100_tensors(processes, rng):
    servers = gpu_servers(processes, ("--device", "cuda:0"), ("--device", "cuda:1"))
    xs = inputs(rng, 100)
    for x, got in zip(xs, spread([s.target for s in servers], xs)):
        assert_exact(got, x)
    totals = [device_totals(s.target) for s in servers]
    assert [list(t) for t in totals] == [["cuda:0"], ["cuda:1"]]
    assert sum(t for d in totals for t in d.values()) == 100 and all(min(d.values()) > 0 for d in totals)


@pytest.mark.gpu
@two_gpus
def test_gpu_pool_spreads_requests_over_its_gpus(processes, rng):
    (server,) = gpu_servers(processes, ("--device", "all"))
    with QuantdClient(server.target) as client:
        info = client.server_info()
        assert [d["device"] for d in info["devices"]] == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        assert len(set(d["uuid"] for d in info["devices"])) == len(info["devices"])
    xs = inputs(rng, 100)
    for x, got in zip(xs, spread(server.target, xs, threads=8)):
        assert_exact(got, x)
    totals = device_totals(server.target)
    assert sum(totals.values()) == 100 and min(totals["cuda:0"], totals["cuda:1"]) > 0, totals


@pytest.mark.gpu
@two_gpus
def test_gpu_pool_runs_ipc_calls_on_the_inputs_gpu(processes, rng):
    (server,) = gpu_servers(processes, ("--device", "cuda:0,cuda:1"))
    with QuantdClient(server.target, transport="ipc") as client:
        for index in (1, 0, 1):
            x = inputs(rng, 1)[0].to(f"cuda:{index}")
            got = client.quantize(x, SPEC, dequantized=True)
            assert got.transport.transport == "ipc" and got.codes.device == x.device
            assert client.last_placement == f"cuda:{index} (the input's GPU)"
            assert_exact(got, x)
            assert same_bits(got.dequantized, reference.dequantize(reference.quantize(x.cpu(), SPEC)))


@pytest.mark.gpu
@two_gpus
def test_gpu_ipc_tensors_on_another_gpu_cross_to_the_servers(processes, rng):
    """A server on cuda:0 given CUDA IPC tensors on cuda:1: read and written across GPUs, results on cuda:1."""
    (server,) = gpu_servers(processes, ("--device", "cuda:0"))
    peer = torch.cuda.can_device_access_peer(0, 1) and torch.cuda.can_device_access_peer(1, 0)
    how = "read and written through peer access" if peer else "no peer access between the two GPUs, copied through"
    with QuantdClient(server.target, transport="ipc") as client:
        x = inputs(rng, 1)[0].to("cuda:1")
        got = client.quantize(x, SPEC)
        assert got.transport.transport == "ipc" and got.codes.device == x.device
        assert client.last_placement.startswith("cuda:0 (the only device); CUDA IPC tensors on cuda:1 (GPU-")
        assert how in client.last_placement
        assert_exact(got, x)
        back = client.dequantize(got, torch.float32)
        assert back.device == x.device and client.last_transport.transport == "ipc"
        assert same_bits(back, reference.dequantize(reference.quantize(x.cpu(), SPEC), torch.float32))


@pytest.mark.gpu
@two_gpus
def test_gpu_crossing_by_host_memory_gives_the_same_bytes(rng):
    """The staged path (GPUs without peer access) on any two GPUs: inputs to the compute GPU and results back
    through host memory."""
    from quantd.kernels import dispatch
    from quantd.server.cuda_ipc import Crossing
    crossing = Crossing(torch.device("cuda:1"), torch.device("cuda:0"))
    crossing.how = "staged"
    x = inputs(rng, 1)[0].to("cuda:1")
    with torch.cuda.device(0):
        moved = crossing.to_compute(x)
        assert moved.device == torch.device("cuda:0") and same_bits(moved, x)
        qt = dispatch.quantize(moved, SPEC)
        out = torch.empty(qt.codes.numel(), dtype=torch.uint8, device="cuda:1")
        crossing.write(out, qt.codes.reshape(-1).view(torch.uint8))
        crossing.finish()
    assert same_bits(out.view(qt.codes.dtype).view(qt.codes.shape), reference.quantize(x.cpu(), SPEC).codes)


@pytest.mark.gpu
@two_gpus
def test_gpu_device_indexes_name_the_gpus_present():
    present = ", ".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    with pytest.raises(ValueError, match=f"but this host has {present}$"):
        app.pick_devices(f"cuda:{torch.cuda.device_count()}")
    assert app.pick_devices("all") == [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
