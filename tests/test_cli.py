"""`quantd quantize / dequantize / info` against a real server: the files load back with torch."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantd.cli import main as cli
from quantd.kernels import dispatch, reference
from quantd.kernels.spec import QuantizedTensor, QuantSpec
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", piece_bytes=4096)) as running:
        yield running


@pytest.fixture
def checkpoint(tmp_path, rng):
    tensors = {
        "layer.0.weight": torch.randn(48, 200, generator=rng).bfloat16(),
        "layer.0.bias": torch.randn(48, generator=rng).half(),
        "embed.weight": torch.randn(10, 3, 64, generator=rng),
        "step": torch.tensor(7, dtype=torch.int64),       # not floating point: copied
        "temperature": torch.tensor(0.5),                 # 0-d: no groups, copied
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"origin": "test"})
    return path, tensors


CLI_SPECS = [(["--format", "fp8_e4m3", "--group", "64"], QuantSpec("fp8_e4m3", group_size=64)),
             (["--format", "int8_asym", "--tile", "16x32"], QuantSpec("int8_asym", "tile", tile=(16, 32))),
             (["--format", "mxfp4"], QuantSpec("mxfp4")), (["--format", "nvfp4"], QuantSpec("nvfp4"))]


@pytest.mark.parametrize("flags,spec", CLI_SPECS, ids=lambda v: v.describe() if isinstance(v, QuantSpec) else "")
def test_quantize_then_dequantize_a_checkpoint(server, checkpoint, tmp_path, flags, spec, capsys):
    """Every format's flags through the CLI and back: the checkpoint's bf16, fp16 and fp32 tensors under the first
    spec, the others' with their floating tensors in bf16 (a CPU server compiles a graph a spec and dtype)."""
    path, tensors = checkpoint
    if spec != CLI_SPECS[0][1]:
        tensors = {name: t.bfloat16() if t.is_floating_point() and t.dim() else t for name, t in tensors.items()}
        path = tmp_path / "bf16.safetensors"
        save_file(tensors, str(path), metadata={"origin": "test"})
    out, back = tmp_path / "q.safetensors", tmp_path / "back.safetensors"
    assert cli.main(["quantize", str(path), "-o", str(out), "--server", server.target] + flags) == 0
    assert "copied unchanged" in capsys.readouterr().out
    loaded = load_file(str(out))
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    layout = json.loads(metadata["quantd"])
    assert metadata["origin"] == "test"
    assert set(layout) == {"layer.0.weight", "layer.0.bias", "embed.weight"}
    for name in layout:
        want = reference.quantize(tensors[name], spec)
        assert torch.equal(loaded[name].view(torch.uint8), want.codes.view(torch.uint8))
        assert loaded[name].dtype == want.codes.dtype and loaded[name + ".scales"].dtype == want.scales.dtype
        assert torch.equal(loaded[name + ".scales"].view(torch.uint8), want.scales.view(torch.uint8))
        if want.zero_points is not None:
            assert torch.equal(loaded[name + ".zero_points"], want.zero_points)
        if want.tensor_scale is not None:
            assert torch.equal(loaded[name + ".tensor_scale"], want.tensor_scale)
        assert layout[name]["shape"] == list(tensors[name].shape)
    assert torch.equal(loaded["step"], tensors["step"]) and torch.equal(loaded["temperature"], tensors["temperature"])

    assert cli.main(["dequantize", str(out), "-o", str(back), "--server", server.target]) == 0
    restored = load_file(str(back))
    assert set(restored) == set(tensors)
    for name in layout:
        want = reference.quantize(tensors[name], spec)
        expected = dispatch.dequantize(want, tensors[name].dtype)
        assert restored[name].dtype == tensors[name].dtype
        assert torch.equal(restored[name], expected)
        rebuilt = QuantizedTensor(loaded[name], loaded[name + ".scales"], spec, tuple(tensors[name].shape),
                                  loaded.get(name + ".zero_points"), loaded.get(name + ".tensor_scale"))
        assert torch.equal(dispatch.dequantize(rebuilt, tensors[name].dtype), expected)  # loads back with torch alone


def test_info(server, capsys):
    assert cli.main(["info", "--server", server.target]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "cpu" and "mxfp4" in info["formats"]


def test_unreachable_server_is_a_clean_error(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    code = cli.main(["quantize", str(path), "-o", str(tmp_path / "x.safetensors"), "--server", "127.0.0.1:1", "--timeout", "2"])
    assert code == 1 and "UNAVAILABLE" in capsys.readouterr().err


def test_explicit_group_128_for_mx_is_refused(server, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    code = cli.main(["quantize", str(path), "-o", str(tmp_path / "x.safetensors"), "--server", server.target,
                     "--format", "mxfp4", "--group", "128"])
    assert code == 2 and "mxfp4 is defined on 1x32 groups only" in capsys.readouterr().err
    assert QuantSpec("mxfp4").group_size == 32 and QuantSpec().group_size == 128


def test_output_files_are_reproducible_with_ordinary_modes(server, checkpoint, tmp_path):
    path, _ = checkpoint
    outputs = []
    for run in ("a", "b"):
        q, back = tmp_path / f"{run}.safetensors", tmp_path / f"{run}-back.safetensors"
        assert cli.main(["quantize", str(path), "-o", str(q), "--server", server.target]) == 0
        assert cli.main(["dequantize", str(q), "-o", str(back), "--server", server.target]) == 0
        outputs.append((q.read_bytes(), back.read_bytes()))
        mask = os.umask(0)
        os.umask(mask)
        assert {os.stat(p).st_mode & 0o777 for p in (q, back)} == {0o666 & ~mask}
    assert outputs[0] == outputs[1]
