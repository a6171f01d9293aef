"""Regenerate the committed gRPC stubs from protos/quantd/v1/*.proto.

    pip install grpcio-tools==1.84.0 && python protos/generate.py

The stubs land in protocol/_generated/, which pyproject maps to the import package
`quantd.v1` (so the generated `from quantd.v1 import ...` lines resolve). Generate with
the oldest grpcio-tools we support: the generated *_pb2_grpc.py refuses to import under
a grpcio older than the grpcio-tools that wrote it.
"""
from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

PROTOS = pathlib.Path(__file__).resolve().parent
OUT = PROTOS.parent / "protocol" / "_generated"
SUPPORTED_TOOLS = "1.84.0"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "quantd" / "v1").glob("*.proto"))


def main() -> int:
    from grpc_tools import protoc
    import grpc_tools

    version = getattr(grpc_tools, "__version__", None) or _dist_version("grpcio-tools")
    if version != SUPPORTED_TOOLS:
        print(f"warning: grpcio-tools {version} writes stubs that need grpcio>={version}; "
              f"use grpcio-tools=={SUPPORTED_TOOLS} for stubs that run on grpcio>={SUPPORTED_TOOLS}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTOS}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        if protoc.main(args + proto_files()) != 0:
            return 1
        for path in (pathlib.Path(tmp) / "quantd" / "v1").iterdir():
            shutil.copy(path, OUT / path.name)
            print(f"wrote {OUT / path.name}")
    return 0


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    sys.exit(main())
