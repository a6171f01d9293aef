"""Quantize a synthetic multi-GB model folder through `quantd serve`: peak RSS of the client, a kill mid-way
and the resumed run, the rate in GB/s beside the raw service rate (one tensor, QuantdClient.quantize).

    python benchmarks/checkpoint.py --gb 3 [--profile hf-fp8] [--scheme fp8-block]      # starts a CPU `quantd serve`
    python benchmarks/checkpoint.py --gb 3 --server HOST:PORT                          # a running (GPU) server
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from grpc_harness import ServerProcess, quantd_command, run_measuring_rss  # noqa: E402

from quantd.client import QuantdClient  # noqa: E402
from quantd.client.checkpoint import files  # noqa: E402
from quantd.kernels.spec import QuantSpec  # noqa: E402

HIDDEN, LAYER_NAMES = 4096, ("q_proj", "k_proj", "v_proj", "o_proj")


def make_model(path: Path, gb: float, shard_gb: float = 0.5) -> int:
    """Llama-style names, 4096 x 4096 bf16 weights (32 MiB each), shards of about shard_gb; returns the bytes."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    count = int(gb * 2**30 // (HIDDEN * HIDDEN * 2))
    per_shard = max(1, int(shard_gb * 2**30 // (HIDDEN * HIDDEN * 2)))
    shards = -(-count // per_shard)
    weight_map, g = {}, torch.Generator().manual_seed(0)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"model.layers.{i // 4}.self_attn.{LAYER_NAMES[i % 4]}.weight":
                   torch.randn(HIDDEN, HIDDEN, generator=g).bfloat16() for i in range(s * per_shard, min(count, (s + 1) * per_shard))}
        files.save(path / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    files.write_json(path / files.INDEX, {"metadata": {}, "weight_map": weight_map})
    return count * HIDDEN * HIDDEN * 2


def run(command, log: Path):
    """(seconds, peak RSS in MiB of the client) of a run that must succeed."""
    start = time.perf_counter()
    code, rss = run_measuring_rss(command, log)
    if code:
        raise SystemExit(f"{command} failed:\n{log.read_text()}")
    return time.perf_counter() - start, rss / 2**20


def run_killed(command, after: float) -> float:
    """Start `command` and SIGKILL it after `after` seconds (if still running); the seconds it ran."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=3.0)
    p.add_argument("--server", help="HOST:PORT of a running server (default: start `quantd serve --device cpu`)")
    p.add_argument("--profile", default="hf-fp8")
    p.add_argument("--scheme", default="fp8-block")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        src, dst, log = Path(tmp) / "model", Path(tmp) / "out", Path(tmp) / "log"
        nbytes = make_model(src, args.gb)
        local = None if args.server else ServerProcess()
        target = args.server or local.target
        try:
            with QuantdClient(target) as client:
                backend = client.server_info().get("device", "?")
                x = torch.randn(HIDDEN, HIDDEN).bfloat16()
                client.quantize(x, QuantSpec("fp8_e4m3", "tile", tile=(128, 128)), report=False)
                start = time.perf_counter()
                for _ in range(4):
                    client.quantize(x, QuantSpec("fp8_e4m3", "tile", tile=(128, 128)), report=False)
                raw = 4 * x.numel() * 2 / (time.perf_counter() - start) / 1e9
            command = quantd_command() + ["quantize", str(src), "-o", str(dst), "--profile", args.profile,
                                          "--scheme", args.scheme, "--server", target]
            full, rss = run(command, log)
            print(f"model {nbytes / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards, largest tensor "
                  f"{HIDDEN * HIDDEN * 2 / 2**20:.0f} MiB; server {target} ({backend})")
            print(f"raw service rate (one 4096x4096 bf16 tensor, repeated): {raw:.3f} GB/s")
            print(f"full run: {full:.1f} s, {nbytes / full / 1e9:.3f} GB/s, client peak RSS {rss:.0f} MiB")
            for p_ in dst.glob("*.safetensors"):
                p_.unlink()
            (dst / ".quantd-checkpoint.json").unlink()
            killed_after = run_killed(command, after=full / 2)
            resumed, rss2 = run(command, log)
            skipped = next((line for line in log.read_text().splitlines() if "already finished" in line), "nothing skipped")
            print(f"killed after {killed_after:.1f} s; resumed run {resumed:.1f} s, client peak RSS {rss2:.0f} MiB: "
                  f"{skipped[:80]}")
        finally:
            if local is not None:
                local.close()


if __name__ == "__main__":
    main()
