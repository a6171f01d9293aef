"""Quantize a synthetic multi-GB model folder through `quantd serve`: peak RSS of the client, a kill mid-way
and the resumed run, the rate in GB/s beside the raw service rate (one tensor, QuantdClient.quantize).

    python benchmarks/checkpoint.py --gb 3 [--device cpu|cuda] [--profile hf-fp8] [--scheme fp8-block]
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from grpc_harness import ServerProcess, quantd_command  # noqa: E402

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


def run(command, kill_after: float | None = None):
    """(seconds, peak RSS in MiB of the child, killed?)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=kill_after)
        killed = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        killed = True
    seconds = time.perf_counter() - start
    if not killed and proc.returncode:
        raise SystemExit(f"{command} failed:\n{err}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, killed, out + err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=3.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", default="hf-fp8")
    p.add_argument("--scheme", default="fp8-block")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        src, dst = Path(tmp) / "model", Path(tmp) / "out"
        nbytes = make_model(src, args.gb)
        server = ServerProcess() if args.device == "cpu" else None
        if server is None:
            raise SystemExit("--device other than cpu: start `quantd serve --device cuda` yourself and adapt the target")
        try:
            with QuantdClient(server.target) as client:
                x = torch.randn(HIDDEN, HIDDEN).bfloat16()
                client.quantize(x, QuantSpec("fp8_e4m3", "tile", tile=(128, 128)), report=False)
                start = time.perf_counter()
                for _ in range(4):
                    client.quantize(x, QuantSpec("fp8_e4m3", "tile", tile=(128, 128)), report=False)
                raw = 4 * x.numel() * 2 / (time.perf_counter() - start) / 1e9
            command = quantd_command() + ["quantize", str(src), "-o", str(dst), "--profile", args.profile,
                                          "--scheme", args.scheme, "--server", server.target]
            full, rss, _, _ = run(command)
            print(f"model {nbytes / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards, largest tensor "
                  f"{HIDDEN * HIDDEN * 2 / 2**20:.0f} MiB; server on {args.device}")
            print(f"raw service rate (one 4096x4096 bf16 tensor, repeated): {raw:.3f} GB/s")
            print(f"full run: {full:.1f} s, {nbytes / full / 1e9:.3f} GB/s, client peak RSS {rss:.0f} MiB")
            for p_ in dst.glob("*.safetensors"):
                p_.unlink()
            (dst / ".quantd-checkpoint.json").unlink()
            killed_after, _, killed, _ = run(command, kill_after=full / 2)
            resumed, rss2, _, log = run(command)
            skipped = next((line for line in log.splitlines() if "already finished" in line), "nothing skipped")
            print(f"killed after {killed_after:.1f} s (killed: {killed}); resumed run {resumed:.1f} s: {skipped[:80]}")
            print(f"peak RSS over all client runs {rss2:.0f} MiB")
        finally:
            server.close()


if __name__ == "__main__":
    main()
