"""Bounded memory, measured: `quantd quantize MODEL_DIR` as a subprocess through a real `quantd serve`, on a model
folder several times larger than the stated bound, with the client's peak RSS (its ru_maxrss, grpc_harness.run_measuring_rss)."""
import torch

from grpc_harness import ServerProcess, quantd_command, run_measuring_rss

from quantd.client.checkpoint import files

MiB = 1 << 20
ROWS, COLS = 2048, 4096                     # 16 MiB of bf16 per tensor
TENSORS, PER_SHARD = 64, 16                 # 1 GiB in 4 shards of 256 MiB
WINDOW_MIB = 64
# README / FORMATS.md: peak RSS <= 512 MiB (Python, torch, grpc) + 2 x the window + 4 x the largest tensor
BASE = 512 * MiB
WORKING = 2 * WINDOW_MIB * MiB + 4 * ROWS * COLS * 2


def make_model(path):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    g, weight_map = torch.Generator().manual_seed(0), {}
    shards = TENSORS // PER_SHARD
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16)
                   for i in range(s * PER_SHARD, (s + 1) * PER_SHARD)}
        files.save(path / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    files.write_json(path / files.INDEX, {"metadata": {}, "weight_map": weight_map})
    return TENSORS * ROWS * COLS * 2


def test_quantize_a_model_larger_than_the_bound_in_bounded_memory(tmp_path):
    model_bytes = make_model(tmp_path / "model")
    assert model_bytes >= 4 * WORKING  # the data could not all be held at once
    server = ServerProcess()
    try:
        command = quantd_command() + ["quantize", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--profile",
                                      "hf-fp8", "--window-mib", str(WINDOW_MIB), "--server", server.target]
        code, rss = run_measuring_rss(command, tmp_path / "log")
    finally:
        server.close()
    assert code == 0, (tmp_path / "log").read_text()
    print(f"model {model_bytes / MiB:.0f} MiB, client peak RSS {rss / MiB:.0f} MiB, bound {(BASE + WORKING) / MiB:.0f} MiB")
    assert rss <= BASE + WORKING
    out = files.ModelFolder(tmp_path / "out")
    entries = {n: e for s in out.shards for n, e in out.entries(s).items()}
    assert len(entries) == 2 * TENSORS
    assert entries["model.layers.63.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
