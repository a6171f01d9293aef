"""Checkpoint profiles: the tensor names, dtypes, shapes and config.json keys each serving stack reads.

A profile maps a QuantizedTensor (what the service returns) to the tensors it stores and back; the
mapping is pure layout (views, reshapes, E8M0 bits <-> fp32 powers of two), so every number still comes
from the service. FORMATS.md cites the loader code each layout follows.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import torch

from quantd.kernels.spec import QuantizedTensor, QuantSpec

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
# Kept in high precision by every profile unless --include says otherwise: embeddings, norms, the
# output head and MoE routers (their logits pick experts; vLLM and transformers keep them unquantized).
DEFAULT_IGNORE = (r"(^|\.)lm_head\.", r"embed", r"norm", r"(^|\.)gate\.weight$", r"router")
CT_VERSION = "0.20.1"  # the compressed-tensors release whose config these match (its "version" key)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One way of storing weights: the QuantSpec the service runs, and (for compressed-tensors) the
    format and QuantizationArgs as the library writes them in config.json."""

    name: str
    spec: QuantSpec
    ct_format: str = ""
    weights: Optional[dict] = None
    input_activations: Optional[dict] = None
    fused_tensor_scale: bool = False  # the parts of a module a serving stack fuses share one tensor scale


# Weights that vLLM and SGLang load into one fused module (qkv_proj, gate_up_proj): a format with a tensor scale
# must give them one (they keep a single global scale for the fused weight, the largest; llm-compressor gives
# the parts the smallest of their multipliers before quantizing, as quantd does).
FUSED_PARTS = (re.compile(r"(.*)\.(?:q_proj|k_proj|v_proj)\.weight$"), re.compile(r"(.*)\.(?:gate_proj|up_proj)\.weight$"))


def fused_groups(names) -> list:
    """Lists of two or more of `names` that a serving stack fuses into one module."""
    groups: dict = {}
    for name in sorted(names):
        for i, pattern in enumerate(FUSED_PARTS):
            m = pattern.match(name)
            if m:
                groups.setdefault((i, m.group(1)), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _args(num_bits, type_, strategy, dynamic, **extra) -> dict:
    return {"num_bits": num_bits, "type": type_, "symmetric": extra.pop("symmetric", True),
            "group_size": extra.pop("group_size", None), "strategy": strategy, "dynamic": dynamic, **extra}


MX_ARGS = {"group_size": 32, "scale_dtype": "torch.uint8"}
TILE = QuantSpec("fp8_e4m3", "tile", tile=(128, 128))
CT_SCHEMES = {s.name: s for s in (
    Scheme("fp8-block", TILE, "float-quantized", _args(8, "float", "block", False, block_structure=[128, 128]),
           _args(8, "float", "group", True, group_size=128)),
    Scheme("fp8-channel", QuantSpec("fp8_e4m3", "channel", axis=0), "float-quantized", _args(8, "float", "channel", False),
           _args(8, "float", "token", True)),
    Scheme("int8", QuantSpec("int8_sym", "channel", axis=0), "int-quantized", _args(8, "int", "channel", False),
           _args(8, "int", "token", True)),
    Scheme("int8-asym", QuantSpec("int8_asym", "channel", axis=0), "int-quantized",
           _args(8, "int", "channel", False, symmetric=False), _args(8, "int", "token", True)),
    Scheme("mxfp4", QuantSpec("mxfp4"), "mxfp4-pack-quantized", _args(4, "float", "group", False, **MX_ARGS),
           _args(4, "float", "group", True, **MX_ARGS)),
    Scheme("mxfp8", QuantSpec("mxfp8"), "mxfp8-quantized", _args(8, "float", "group", False, **MX_ARGS),
           _args(8, "float", "group", True, **MX_ARGS)),
    # weight-only, as the library's NVFP4A16 preset (activations stay in high precision)
    Scheme("nvfp4", QuantSpec("nvfp4"), "nvfp4-pack-quantized",
           _args(4, "float", "tensor_group", False, group_size=16, scale_dtype="torch.float8_e4m3fn"),
           fused_tensor_scale=True),
)}


def pow2(spec: QuantSpec) -> QuantSpec:
    return dataclasses.replace(spec, scale_encoding="pow2")


def e8m0_as_float(scales: torch.Tensor) -> torch.Tensor:
    return scales.float() if scales.dtype == torch.float8_e8m0fnu else scales


class Profile:
    """Base: quantizes 2-D floating-point `<module>.weight` tensors; subclasses say how they are stored."""

    name = ""
    schemes: dict = {}
    default_scheme = ""
    scale_suffix = ""      # what replaces the original name's `weight_suffix` for the scale tensor
    weight_suffix = ".weight"

    def scheme(self, name: str | None) -> Scheme:
        name = name or self.default_scheme
        if name not in self.schemes:
            raise ValueError(f"profile {self.name} has no scheme {name!r} (it has {', '.join(self.schemes)})")
        return self.schemes[name]

    def candidate(self, name: str, dtype, shape) -> bool:
        """A tensor this profile would quantize unless ignored."""
        return name.endswith(self.weight_suffix) and dtype in FLOATS and len(shape) == 2

    def unsupported(self, spec: QuantSpec, shape) -> str | None:
        """Why the scheme cannot store a tensor of `shape`, or None."""
        g = spec.group_size
        if (spec.is_mx or spec.format.value == "nvfp4") and shape[-1] % g:
            return f"its last dim {shape[-1]} is not a multiple of {g} ({spec.format.value} blocks of {g})"
        return None

    def service_input(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def service_output(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def base(self, name: str) -> str:
        return name[: len(name) - len(self.weight_suffix)]

    def originals(self, names) -> list[str]:
        """Original names of the quantized tensors stored under `names`."""
        return [n[: len(n) - len(self.scale_suffix)] + self.weight_suffix for n in names if n.endswith(self.scale_suffix)]

    def store(self, name: str, qt: QuantizedTensor) -> dict:
        raise NotImplementedError

    def load(self, name: str, get: Callable, scheme: Scheme) -> QuantizedTensor:
        raise NotImplementedError

    def quantization_config(self, scheme: Scheme, spec: QuantSpec, kept: list[str]) -> dict:
        raise NotImplementedError

    def detect_scheme(self, qconfig: dict) -> Scheme:
        raise NotImplementedError


class HfFp8(Profile):
    """DeepSeek-V3 layout: transformers FineGrainedFP8, vLLM / SGLang fp8 with weight_block_size."""

    name = "hf-fp8"
    schemes = {"fp8-block": Scheme("fp8-block", TILE)}
    default_scheme = "fp8-block"
    scale_suffix = ".weight_scale_inv"

    def store(self, name, qt):
        return {name: qt.codes, self.base(name) + self.scale_suffix: e8m0_as_float(qt.scales)}

    def load(self, name, get, scheme):
        codes = get(name)
        return QuantizedTensor(codes, get(self.base(name) + self.scale_suffix), scheme.spec, tuple(codes.shape))

    def quantization_config(self, scheme, spec, kept):
        config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        if spec.scale_encoding.value == "pow2":
            config["scale_fmt"] = "ue8m0"
        if kept:
            config["modules_to_not_convert"] = config["ignored_layers"] = kept
        return config

    def detect_scheme(self, qconfig):
        if list(qconfig.get("weight_block_size") or []) != [128, 128]:
            raise ValueError(f"hf-fp8: weight_block_size {qconfig.get('weight_block_size')} is not [128, 128]")
        return self.schemes["fp8-block"]


class CompressedTensors(Profile):
    """compressed-tensors (llm-compressor's output; vLLM and SGLang's compressed-tensors loader)."""

    name = "compressed-tensors"
    schemes = CT_SCHEMES
    default_scheme = "fp8-block"
    scale_suffix = ".weight_scale"

    def store(self, name, qt):
        base, spec = self.base(name), qt.spec
        scales = qt.scales
        if spec.is_mx:
            scales = scales.view(torch.uint8)
        elif spec.granularity.value == "channel":
            scales = scales.reshape(-1, 1)
        out = {base + (".weight_packed" if spec.element.bits == 4 else ".weight"): qt.codes,
               base + self.scale_suffix: e8m0_as_float(scales) if not spec.is_mx else scales}
        if qt.zero_points is not None:
            out[base + ".weight_zero_point"] = qt.zero_points.reshape(-1, 1)
        if qt.tensor_scale is not None:  # compressed-tensors' global scale: its value, shape [1]
            out[base + ".weight_global_scale"] = qt.tensor_scale.reshape(1)
        return out

    def load(self, name, get, scheme):
        base, spec = self.base(name), scheme.spec
        packed = spec.element.bits == 4
        nvfp4 = spec.format.value == "nvfp4"
        codes = get(base + (".weight_packed" if packed else ".weight"))
        shape = tuple(codes.shape[:-1]) + (codes.shape[-1] * 2,) if packed else tuple(codes.shape)
        scales = get(base + self.scale_suffix)
        if spec.is_mx:
            scales = scales.view(torch.float8_e8m0fnu)
        elif not nvfp4:  # nvfp4: float8_e4m3fn [N, K/16] as stored
            scales = scales.float().reshape(spec.scale_shape(shape))
        zp = get(base + ".weight_zero_point").reshape(-1) if spec.format.value == "int8_asym" else None
        tensor_scale = get(base + ".weight_global_scale").float().reshape(()) if nvfp4 else None
        return QuantizedTensor(codes, scales, spec, shape, zp, tensor_scale)

    def quantization_config(self, scheme, spec, kept):
        group = {"targets": ["Linear"], "weights": scheme.weights, "input_activations": scheme.input_activations,
                 "output_activations": None, "format": None}
        return {"version": CT_VERSION, "quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
                "config_groups": {"group_0": group}, "kv_cache_scheme": None, "format": scheme.ct_format,
                "quantization_status": "compressed", "global_compression_ratio": None, "ignore": kept,
                "moe_sparsity_config": None}

    def detect_scheme(self, qconfig):
        groups = list((qconfig.get("config_groups") or {}).values())
        for scheme in self.schemes.values():
            if qconfig.get("format") == scheme.ct_format and groups and all(
                    _same_args(g.get("weights") or {}, scheme.weights) for g in groups):
                return scheme
        raise ValueError(f"compressed-tensors: format {qconfig.get('format')!r} with weights "
                         f"{[g.get('weights') for g in groups]} is none of quantd's schemes ({', '.join(self.schemes)})")


def _same_args(stored: dict, ours: dict) -> bool:
    keys = ("num_bits", "type", "symmetric", "strategy", "group_size", "block_structure")
    return all(stored.get(k) == ours.get(k) for k in keys)


class GptOssMxfp4(Profile):
    """gpt-oss: MoE expert weights in MXFP4 as <p>_blocks / <p>_scales, everything else left as it is."""

    name = "gpt-oss-mxfp4"
    schemes = {"mxfp4": Scheme("mxfp4", QuantSpec("mxfp4"))}
    default_scheme = "mxfp4"
    scale_suffix = "_scales"
    weight_suffix = ""
    EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")

    def candidate(self, name, dtype, shape):
        return bool(self.EXPERTS.search(name)) and dtype in FLOATS and len(shape) == 3

    def unsupported(self, spec, shape):
        # stored transposed: the blocks run along the input dim, shape[-2]
        return super().unsupported(spec, (shape[0], shape[2], shape[1]))

    def service_input(self, tensor):
        return tensor.transpose(-1, -2).contiguous()   # [E, in, out] -> [E, out, in]

    def service_output(self, tensor):
        return tensor.transpose(-1, -2).contiguous()

    def store(self, name, qt):
        e, n, k = qt.shape
        return {name + "_blocks": qt.codes.reshape(e, n, k // 32, 16), name + "_scales": qt.scales.view(torch.uint8)}

    def load(self, name, get, scheme):
        blocks = get(name + "_blocks")
        e, n, g, _ = blocks.shape
        return QuantizedTensor(blocks.reshape(e, n, g * 16), get(name + "_scales").view(torch.float8_e8m0fnu),
                               scheme.spec, (e, n, g * 32))

    def quantization_config(self, scheme, spec, kept):
        return {"quant_method": "mxfp4", "modules_to_not_convert": kept}

    def detect_scheme(self, qconfig):
        return self.schemes["mxfp4"]


# quantd's own layout from before the profiles (`quantd quantize FILE.safetensors` still writes it)
LEGACY_KEY = "quantd"
# Where each stored tensor goes: `<name><suffix>` (the codes under the tensor's own name).
LEGACY_SUFFIXES = {"codes": "", "scales": ".scales", "zero_points": ".zero_points", "tensor_scale": ".tensor_scale"}
LEGACY_COMPANIONS = [suffix for suffix in LEGACY_SUFFIXES.values() if suffix]


def legacy_tensors(name: str, qt: QuantizedTensor) -> dict:
    """{file name: tensor} of qt's stored tensors in the legacy layout."""
    return {name + LEGACY_SUFFIXES[part]: t for part, t in qt.stored().items()}


def spec_from_json(fields: dict) -> QuantSpec:
    return QuantSpec(**{k: tuple(v) if k == "tile" else v for k, v in fields.items()})


class QuantdLegacy(Profile):
    """Codes under the tensor's own name, `<name>.scales` (and `.zero_points`, `.tensor_scale`), and each tensor's spec, shape and
    dtype as JSON under the safetensors metadata key `quantd`: `layout` is that JSON, merged over the shards."""

    name = "quantd"
    schemes = {"per-tensor": Scheme("per-tensor", QuantSpec())}   # each tensor's spec is in `layout`
    default_scheme = "per-tensor"
    scale_suffix = LEGACY_SUFFIXES["scales"]
    weight_suffix = ""

    def __init__(self, layout: dict):
        self.layout = layout

    def originals(self, names):
        return [n for n in names if n in self.layout]

    def load(self, name, get, scheme):
        entry = self.layout[name]
        spec, shape = spec_from_json(entry["spec"]), tuple(entry["shape"])
        return QuantizedTensor.from_stored({part: get(name + LEGACY_SUFFIXES[part])
                                            for part, *_ in spec.storage(shape).tensors()}, spec, shape)


PROFILES = {p.name: p for p in (HfFp8(), CompressedTensors(), GptOssMxfp4())}
QUANT_METHODS = {"fp8": "hf-fp8", "compressed-tensors": "compressed-tensors", "mxfp4": "gpt-oss-mxfp4"}


def detect(config: dict) -> tuple[Profile, Scheme]:
    """The profile and scheme of a model's config.json; ValueError if it is none of them."""
    qconfig = config.get("quantization_config")
    if not qconfig:
        raise ValueError("config.json has no quantization_config: not a quantized checkpoint")
    method = qconfig.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization_config.quant_method {method!r} is not one quantd reads ({', '.join(QUANT_METHODS)})")
    profile = PROFILES[QUANT_METHODS[method]]
    return profile, profile.detect_scheme(qconfig)
