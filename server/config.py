"""ServerConfig: every setting of `quantd serve`, from flags with defaults from QUANTD_<FIELD> variables."""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional

from quantd.protocol.wire import DEFAULT_CHUNK_BYTES

MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"                # the container image sets 0.0.0.0
    port: int = 50051
    device: str = "auto"                   # auto | cpu | cuda | cuda:N | all | cuda:0,cuda:1 (a pool of GPUs)
    max_tensor_bytes: int = 16 * GiB       # declared input bytes, and output bytes, per stream
    max_concurrent_streams: int = 16       # Quantize/Dequantize/Matmul streams served at once
    max_memory_bytes: int = 0              # tensors of all streams in flight together (0: half the machine's memory)
    stream_idle_seconds: float = 30.0      # a stream that sends no message for this long ends DEADLINE_EXCEEDED
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # default size of response chunks
    piece_bytes: int = 32 * MiB            # input bytes quantized per pipelined step
    staging_pool_bytes: int = 2 * GiB      # idle staging buffers kept for the next streams (0: none)
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    tls_client_ca_file: Optional[str] = None  # mutual TLS when set
    auth_tokens: tuple = ()
    auth_tokens_file: Optional[str] = None
    metrics_port: int = 0                  # 0: no metrics endpoint
    metrics_host: Optional[str] = None     # where the metrics endpoint listens (unset: the same host as gRPC)
    drain_seconds: float = 30.0
    log_format: str = "text"               # text | json
    workers: int = 1                       # server processes sharing the port (SO_REUSEPORT)
    local_socket_dir: str = ""             # where the local socket for same-host memory calls goes ("": the
                                           # temporary directory; "off": none)
    shm_unsealed: str = "refuse"           # refuse | allow: named /dev/shm regions, which their client can shrink
    cpu_compile: str = "on"                # on | off: the CPU backend's graphs through torch.compile, or its block
                                           # functions run as they are (the same bits; no compile pause on a spec's
                                           # first call, a small fraction of the throughput: kernels.cpu.use_compiler)

    def __post_init__(self):
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        for name in ("staging_pool_bytes", "max_memory_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.stream_idle_seconds > 0:
            raise ValueError(f"stream_idle_seconds must be > 0, got {self.stream_idle_seconds}")
        for name in ("max_tensor_bytes", "max_concurrent_streams", "chunk_bytes", "piece_bytes", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shm_unsealed not in ("refuse", "allow"):
            raise ValueError(f"shm_unsealed must be 'refuse' or 'allow', got {self.shm_unsealed!r}")
        if self.cpu_compile not in ("on", "off"):
            raise ValueError(f"cpu_compile must be 'on' or 'off', got {self.cpu_compile!r}")
        parts = self.device.split(",")
        single = len(parts) == 1 and (self.device in ("auto", "cpu", "all", "cuda") or _is_cuda_index(self.device))
        if not single and not all(_is_cuda_index(p.strip()) for p in parts):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N, all or a list of cuda:N "
                             f"(cuda:0,cuda:1), got {self.device!r}")

    @property
    def memory_budget(self) -> int:
        """Bytes of tensors the streams in flight may hold together: max_memory_bytes, or half the machine's memory."""
        if self.max_memory_bytes:
            return self.max_memory_bytes
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2

    @property
    def max_message_bytes(self) -> int:
        """Largest request message accepted: room for chunks of up to 64 MiB (or chunk_bytes, if larger)."""
        return max(64 * MiB, self.chunk_bytes) + MiB


def _is_cuda_index(name: str) -> bool:
    return name.startswith("cuda:") and name[5:].isdigit()


def _field_type(field):
    return {"int": int, "float": float, "tuple": tuple}.get(str(field.type).replace("Optional[", "").rstrip("]"), str)


def _parse(field, text: str):
    kind = _field_type(field)
    if kind is tuple:
        return tuple(t.strip() for t in text.split(",") if t.strip())
    return kind(text)


def from_env(environ=None, **overrides) -> ServerConfig:
    """A ServerConfig from QUANTD_<FIELD> environment variables, then `overrides`."""
    environ = os.environ if environ is None else environ
    values = {}
    for field in dataclasses.fields(ServerConfig):
        text = environ.get(f"QUANTD_{field.name.upper()}")
        if text:
            values[field.name] = _parse(field, text)
    values.update(overrides)
    return ServerConfig(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per ServerConfig field (--auth-token repeatable); unset flags keep the environment's value."""
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        env = f"QUANTD_{field.name.upper()}"
        kind = _field_type(field)
        if kind is tuple:
            parser.add_argument("--auth-token", dest=field.name, action="append", default=None,
                                help=f"accepted bearer token (repeatable; env {env}, comma-separated)")
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=None,
                                help=f"default {field.default!r} (env {env})")


def from_args(args: argparse.Namespace, environ=None) -> ServerConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)
             if getattr(args, f.name, None) is not None}
    if "auth_tokens" in given:
        given["auth_tokens"] = tuple(given["auth_tokens"])
    return from_env(environ, **given)
