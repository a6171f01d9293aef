"""The `quantd` command: the client's commands, and `serve`, handed to quantd.server.

    quantd serve [--host H --port P --device auto|cpu|cuda:N ...]     start a server
    quantd quantize model.safetensors -o model-fp8.safetensors --format fp8_e4m3 --group 128 --server HOST:PORT
    quantd dequantize model-fp8.safetensors -o model.safetensors --server HOST:PORT
    quantd info --server HOST:PORT
    quantd quantize MODEL_DIR -o OUT_DIR --profile hf-fp8|compressed-tensors|gpt-oss-mxfp4 [--scheme ...] --server HOST:PORT
    quantd dequantize MODEL_DIR -o OUT_DIR --server HOST:PORT
    quantd inspect MODEL_DIR
    quantd convert MODEL_DIR -o OUT_DIR --profile P [--scheme S] [--allow-lossy --server HOST:PORT]

A model folder (config.json and safetensors shards) is written in the layout a serving stack loads
(quantd.client.checkpoint, FORMATS.md). For a single safetensors file:

A quantized checkpoint keeps each quantized tensor's name for its codes and adds
"<name>.scales" (and "<name>.zero_points" for int8_asym, "<name>.tensor_scale" for nvfp4); the safetensors metadata entry
"quantd" holds, per quantized tensor, its spec, original shape and dtype as JSON. Tensors
that are not floating point, or that the spec cannot take (a 0-d tensor with group or tile
granularity), are copied unchanged.
"""
from __future__ import annotations

import argparse
import enum
import json
import os
import sys



def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get("QUANTD_SERVER", "localhost:50051"),
                        help="HOST:PORT, a comma-separated list, or dns:///name:port (env QUANTD_SERVER)")
    parser.add_argument("--token", default=os.environ.get("QUANTD_TOKEN"), help="bearer token (env QUANTD_TOKEN)")
    parser.add_argument("--ca-file", help="PEM CA certificate: connect with TLS")
    parser.add_argument("--cert-file", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key-file", help="PEM key of the client certificate")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per call")
    parser.add_argument("--transport", choices=("auto", "grpc", "shm", "streams"), default="grpc",
                        help="how tensors reach the server (README, Transports)")
    parser.add_argument("--streams", type=int, default=1, help="parallel streams for --transport streams/auto")


def _folder_arguments(parser) -> None:
    parser.add_argument("--window-mib", type=int, default=1024,
                        help="model folders: at most this much input in flight (MiB, default 1024; at least one tensor)")
    parser.add_argument("--max-shard-mib", type=int, default=0,
                        help="model folders: refill output shards up to this many MiB (default 0: one per input shard)")


def _folder_options(args) -> dict:
    return {"window_bytes": args.window_mib << 20, "max_shard_bytes": args.max_shard_mib << 20,
            "log": lambda line: print(line, file=sys.stderr)}


def _client(args):
    from quantd.client import QuantdClient

    def read(path):
        return open(path, "rb").read() if path else None
    return QuantdClient(args.server, token=args.token, root_certificates=read(args.ca_file),
                        private_key=read(args.key_file), certificate_chain=read(args.cert_file), timeout=args.timeout,
                        transport=args.transport, parallel_streams=args.streams)


def _spec(args):
    from quantd.kernels.spec import QuantSpec
    fields = {"format": args.format, "granularity": args.granularity, "scale_encoding": args.scale_encoding,
              "out_dtype": args.out_dtype}
    if args.group is not None:
        fields.update(group_size=args.group, granularity=fields["granularity"] or "group")
    if args.tile is not None:
        fields.update(tile=tuple(int(t) for t in args.tile.lower().split("x")), granularity=fields["granularity"] or "tile")
    if args.block is not None:
        fields.update(block_size=args.block, granularity=fields["granularity"] or "flat")
    if args.axis is not None:
        fields.update(axis=args.axis, granularity=fields["granularity"] or "channel")
    return QuantSpec(**{k: v for k, v in fields.items() if v is not None})


def spec_to_json(spec) -> dict:
    import dataclasses
    return {k: (v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(spec).items()}


def _quantizable(tensor, spec) -> bool:
    from quantd.kernels.spec import INPUT_DTYPES
    if tensor.dtype not in INPUT_DTYPES:
        return False
    try:
        spec.check_shape(tensor.shape)
    except ValueError:
        return False
    return True


def _progress(names, desc: str):
    from tqdm import tqdm
    return tqdm(names, unit="tensor", desc=desc, disable=None)


def _summary(result, verb: str) -> str:
    kept = len(result.decisions) - len(result.quantized)
    return (f"{len(result.quantized)} tensor(s) {verb}, {kept} kept; {len(result.written)} shard(s) written, "
            f"{len(result.skipped)} skipped as finished; {result.bytes_in / 2**20:.1f} MiB in, "
            f"{result.bytes_out / 2**20:.1f} MiB out")


def cmd_quantize_checkpoint(args) -> int:
    from quantd.client.checkpoint import limit_malloc_arenas, quantize_checkpoint
    limit_malloc_arenas()
    options = dict(profile=args.profile, scheme=args.scheme, ignore=args.ignore, include=args.include,
                   pow2_scales=args.pow2_scales, skip_unsupported=args.skip_unsupported, workers=args.workers,
                   **_folder_options(args))
    if args.dry_run:
        result = quantize_checkpoint(None, args.input, args.output, dry_run=True, **options)
        for d in result.decisions:
            print(f"{d.action:11} {d.name}" + (f"  ({d.reason})" if d.reason else ""))
        return 0
    with _client(args) as client:
        result = client.quantize_checkpoint(args.input, args.output, **options)
    print(f"{args.output}: {args.profile} {args.scheme or ''} ".replace("  ", " ") + _summary(result, "quantized"))
    return 0


def cmd_quantize(args) -> int:
    from safetensors import safe_open

    from quantd.client.checkpoint.files import save
    from quantd.client.checkpoint.profiles import LEGACY_COMPANIONS, LEGACY_KEY, legacy_tensors

    if os.path.isdir(args.input):
        return cmd_quantize_checkpoint(args)
    spec = _spec(args)
    out, layout = {}, {}
    with _client(args) as client, safe_open(args.input, framework="pt") as f:
        metadata = dict(f.metadata() or {})
        names = list(f.keys())
        clashes = [n for n in names if any(n + suffix in names for suffix in LEGACY_COMPANIONS)]
        if clashes:
            raise ValueError(f"tensor names {clashes} would collide with the names of their scales")
        copied = []
        with _progress(names, "quantize") as bar:
            for name in bar:
                tensor = f.get_tensor(name)
                bar.set_postfix_str(name)
                if not _quantizable(tensor, spec):
                    out[name] = tensor
                    copied.append(name)
                else:
                    qt = client.quantize(tensor, spec, report=False)
                    out.update(legacy_tensors(name, qt))
                    layout[name] = {"spec": spec_to_json(spec), "shape": list(tensor.shape),
                                    "dtype": str(tensor.dtype).removeprefix("torch.")}
    metadata[LEGACY_KEY] = json.dumps(layout)
    save(args.output, out, metadata)
    print(f"{args.output}: {len(layout)} tensor(s) quantized with {spec.describe()}, {len(copied)} copied unchanged"
          + (f" ({', '.join(copied[:5])}{', ...' if len(copied) > 5 else ''})" if copied else ""))
    return 0


def cmd_dequantize(args) -> int:
    import torch
    from safetensors import safe_open

    from quantd.client.checkpoint import limit_malloc_arenas
    from quantd.client.checkpoint.files import save
    from quantd.client.checkpoint.profiles import LEGACY_COMPANIONS, LEGACY_KEY, QuantdLegacy
    from quantd.protocol.wire import dtype_from_name

    if os.path.isdir(args.input):
        limit_malloc_arenas()
        with _client(args) as client:
            result = client.dequantize_checkpoint(args.input, args.output, dtype=dtype_from_name(args.dtype or "bfloat16"),
                                                  **_folder_options(args))
        print(f"{args.output}: " + _summary(result, "dequantized"))
        return 0
    out = {}
    with _client(args) as client, safe_open(args.input, framework="pt") as f:
        metadata = dict(f.metadata() or {})
        layout = json.loads(metadata.pop(LEGACY_KEY, "{}"))
        legacy = QuantdLegacy(layout)
        companions = {n + suffix for n in layout for suffix in LEGACY_COMPANIONS}
        names = [n for n in f.keys() if n not in companions]
        with _progress(names, "dequantize") as bar:
            for name in bar:
                bar.set_postfix_str(name)
                if name in layout:
                    dtype = dtype_from_name(args.dtype or layout[name]["dtype"])
                    out[name] = client.dequantize(legacy.load(name, f.get_tensor, None), dtype)
                else:
                    out[name] = f.get_tensor(name)
    save(args.output, {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in out.items()}, metadata)
    print(f"{args.output}: {len(layout)} tensor(s) dequantized, {len(names) - len(layout)} copied unchanged")
    return 0


def cmd_convert(args) -> int:
    from quantd.client.checkpoint import limit_malloc_arenas
    limit_malloc_arenas()
    with _client(args) as client:
        result = client.convert_checkpoint(args.input, args.output, profile=args.profile, scheme=args.scheme,
                                           allow_lossy=args.allow_lossy, **_folder_options(args))
    print(f"{args.output}: " + _summary(result, "converted"))
    return 0


def cmd_inspect(args) -> int:
    from quantd.client.checkpoint import inspect_checkpoint
    report = inspect_checkpoint(args.input)
    print(f"{args.input}: profile {report['profile'] or 'none (not quantized)'}, scheme {report['scheme'] or '-'}, "
          f"{report['quantized']} quantized and {report['kept']} kept tensor(s), {report['bytes'] / 2**20:.1f} MiB")
    for problem in report["problems"]:
        print(f"  problem: {problem}")
    return 1 if report["problems"] else 0


def cmd_info(args) -> int:
    with _client(args) as client:
        print(json.dumps(client.server_info(), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantd", description="GPU-backed gRPC quantization service")
    sub = p.add_subparsers(dest="command", required=True)

    # Only listed here: main() hands `quantd serve ...` to quantd.server before parsing, so the client
    # commands never load the server's code.
    sub.add_parser("serve", help="start a server (`quantd serve --help` lists its settings)")

    q = sub.add_parser("quantize", help="quantize a model folder or a safetensors file through a server")
    q.add_argument("input", help="a Hugging Face model folder, or one safetensors file")
    q.add_argument("-o", "--output", required=True)
    from quantd.client.checkpoint.profiles import PROFILES
    folder = q.add_argument_group("model folders")
    folder.add_argument("--profile", default="hf-fp8", choices=list(PROFILES), help="layout to write (default hf-fp8)")
    folder.add_argument("--scheme", help="fp8-block | fp8-channel | int8 | int8-asym (vLLM does not load it) | mxfp4 | "
                                         "mxfp8 (default: the profile's first)")
    folder.add_argument("--ignore", action="append", default=[], metavar="REGEX", help="also keep tensors matching (repeatable)")
    folder.add_argument("--include", action="append", default=[], metavar="REGEX",
                        help="quantize tensors matching even if the default skip list keeps them (repeatable)")
    folder.add_argument("--pow2-scales", action="store_true", help="power-of-two scales (hf-fp8: scale_fmt ue8m0)")
    folder.add_argument("--skip-unsupported", action="store_true", help="keep tensors the scheme cannot take instead of failing")
    folder.add_argument("--dry-run", action="store_true", help="list what would be quantized and kept, and why; write nothing")
    folder.add_argument("--workers", type=int, default=4, help="tensors in flight through the service (default 4)")
    _folder_arguments(folder)
    q.add_argument_group("safetensors files")
    q.add_argument("--format", default="fp8_e4m3", help="fp8_e4m3 | fp8_e5m2 | int8_sym | int8_asym | mxfp4 | mxfp8 | nvfp4")
    q.add_argument("--granularity", help="tensor | channel | group | tile | flat (default: implied by the size flag)")
    q.add_argument("--group", type=int, help="group size (group granularity)")
    q.add_argument("--tile", help="tile as ROWSxCOLS, e.g. 128x128 (tile granularity)")
    q.add_argument("--block", type=int, help="block size (flat granularity)")
    q.add_argument("--axis", type=int, help="channel axis (channel granularity)")
    q.add_argument("--scale-encoding", help="fp32 | pow2 | e4m3 (nvfp4 only; its default)")
    q.add_argument("--out-dtype", help="dtype dequantization gives back: bfloat16 | float16 | float32")
    _server_arguments(q)
    q.set_defaults(run=cmd_quantize)

    d = sub.add_parser("dequantize", help="dequantize a model folder (any profile) or a file written by `quantd quantize`")
    d.add_argument("input")
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--dtype", help="output dtype (default: bfloat16 for a model folder, each tensor's original dtype for a file)")
    _folder_arguments(d)
    _server_arguments(d)
    d.set_defaults(run=cmd_dequantize)

    c = sub.add_parser("convert", help="rewrite a quantized model folder in another profile (exact pairs need no server)")
    c.add_argument("input")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--profile", required=True, choices=list(PROFILES))
    c.add_argument("--scheme", help="the target profile's scheme (default: its first)")
    c.add_argument("--allow-lossy", action="store_true", help="for a pair that is not exact: dequantize and quantize again")
    _folder_arguments(c)
    _server_arguments(c)
    c.set_defaults(run=cmd_convert)

    n = sub.add_parser("inspect", help="a model folder's profile, scheme and tensors; exit 1 if any is missing or wrong")
    n.add_argument("input")
    n.set_defaults(run=cmd_inspect)

    i = sub.add_parser("info", help="show a server's version, backend, formats and limits")
    _server_arguments(i)
    i.set_defaults(run=cmd_info)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from quantd.server.__main__ import main as serve
        return serve(argv[1:])
    args = parser().parse_args(argv)
    from quantd.client import QuantdError
    try:
        return args.run(args)
    except QuantdError as exc:
        print(f"quantd: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"quantd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
