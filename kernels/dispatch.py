"""Picks a backend: Triton for CUDA tensors, the CPU backend otherwise.

Backends are modules with the same three functions as the reference:
quantize(x, spec, scales), dequantize(qt, out_dtype), matmul(a, b, out_dtype).
"reference" is the specification itself; "triton" on CPU tensors runs under the
Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported).
`config` (kernels/config.py; None: DEFAULT) chooses how the Triton kernels launch; other backends
ignore it.
"""
from __future__ import annotations

import importlib

import torch

from . import reference
from .config import KernelConfig
from .layout import check_out_values, copy_into, with_scale_layout
from .spec import QuantizedTensor, QuantSpec

_MODULES = {"reference": ".reference", "cpu": ".cpu", "triton": ".triton_backend"}


def backend_module(name: str):
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r} (expected one of {', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name], __package__)


def default_backend(t: torch.Tensor) -> str:
    return "triton" if t.is_cuda else "cpu"


def _config_kwargs(module, config: KernelConfig | None) -> dict:
    """config=... for a backend whose kernels take a KernelConfig."""
    return {"config": config} if config is not None and getattr(module, "TAKES_KERNEL_CONFIG", False) else {}


def quantize(x: torch.Tensor, spec: QuantSpec, *, scales: torch.Tensor | None = None,
             backend: str | None = None, scale_layout: str = "row",
             config: KernelConfig | None = None, out: QuantizedTensor | None = None) -> QuantizedTensor:
    """Quantize `x` (bf16/fp16/fp32, any device) with `spec`; `scales` fixes the scales (static quantization).

    scale_layout "col" stores the scales (and zero points) column-major: same logical
    shape, the last dim slowest, as cuBLAS-style GEMMs read them.
    out: row-major tensors to hold the result (spec.storage's shapes and dtypes, contiguous, on x's device), e.g.
    memory a client shared; written and returned (by the kernels themselves where the backend takes `out`).
    """
    module = backend_module(backend or default_backend(x))
    if out is not None:
        if scale_layout != "row":
            raise ValueError("quantize: out takes the row scale layout")
        if getattr(module, "TAKES_OUT", False):
            return module.quantize(x, spec, scales, out=out, **_config_kwargs(module, config))
        return copy_into(out, quantize(x, spec, scales=scales, backend=backend, config=config))
    if getattr(module, "WRITES_SCALE_LAYOUTS", False):
        return module.quantize(x, spec, scales, scale_layout=scale_layout, **_config_kwargs(module, config))
    return with_scale_layout(module.quantize(x, spec, scales), scale_layout)


def quantize_with_amax(x: torch.Tensor, spec: QuantSpec, *, scales: torch.Tensor | None = None,
                       backend: str | None = None, scale_layout: str = "row",
                       config: KernelConfig | None = None,
                       out: QuantizedTensor | None = None) -> tuple[QuantizedTensor, torch.Tensor]:
    """(quantize(x, spec, scales=scales), reference.amax(x)): delayed scaling, where `scales` come from the amax
    of earlier steps (reference.tensor_scale) and this step's amax is kept for the next. The Triton backend finds
    the amax in the pass that quantizes with given scales, so x is read once; other paths compute it apart.
    out: as quantize's."""
    name = backend or default_backend(x)
    module = backend_module(name)
    takes_out = getattr(module, "TAKES_OUT", False)
    if scales is not None and hasattr(module, "quantize_with_amax") and (out is None or takes_out):
        kwargs = {"out": out} if takes_out else {}
        return module.quantize_with_amax(x, spec, scales, scale_layout=scale_layout, **kwargs,
                                         **_config_kwargs(module, config))
    qt = quantize(x, spec, scales=scales, backend=name, scale_layout=scale_layout, config=config, out=out)
    return qt, reference.amax(x)


def quantize_dual(x: torch.Tensor, spec: QuantSpec, *, backend: str | None = None,
                  scale_layout: str = "row", config: KernelConfig | None = None
                  ) -> tuple[QuantizedTensor, QuantizedTensor]:
    """X (M, K) quantized along its rows and X^T (K, M) quantized along its rows (X's 1 x g and g x 1 blocks).

    The Triton backend reads X once for both; other backends compose
    quantize(x) and quantize(x.T.contiguous()).
    """
    name = backend or default_backend(x)
    module = backend_module(name)
    if hasattr(module, "quantize_dual"):
        return module.quantize_dual(x, spec, scale_layout=scale_layout, **_config_kwargs(module, config))
    return (quantize(x, spec, backend=name, scale_layout=scale_layout, config=config),
            quantize(x.T.contiguous(), spec, backend=name, scale_layout=scale_layout, config=config))


def dequantize(qt: QuantizedTensor, out_dtype: torch.dtype | None = None, *, backend: str | None = None,
               config: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Values of `qt` in `out_dtype` (default: its spec's); out: a contiguous tensor of qt's shape and that dtype
    to hold them (written by the kernels themselves where the backend takes `out`), returned."""
    module = backend_module(backend or default_backend(qt.codes))
    if out is not None and getattr(module, "TAKES_OUT", False):
        return module.dequantize(qt, out_dtype, out=out, **_config_kwargs(module, config))
    values = module.dequantize(qt, out_dtype, **_config_kwargs(module, config))
    if out is None:
        return values
    check_out_values(out, values.shape, values.dtype, values.device)
    return out.copy_(values)


def matmul(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.bfloat16, *,
           backend: str | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """C = A @ B^T for quantized A (M, K) and B (N, K)."""
    module = backend_module(backend or default_backend(a.codes))
    return module.matmul(a, b, out_dtype, **_config_kwargs(module, config))

