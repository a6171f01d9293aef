"""What each profile writes, against what vLLM's loaders allocate and read (no vLLM on a CPU machine: this
table stands in for a vLLM run; FORMATS.md says so). The table is transcribed from vLLM's source:

- hf-fp8: vllm/model_executor/layers/quantization/fp8.py, Fp8Config.from_config (quant_method containing "fp8",
  activation_scheme, ignored_layers, weight_block_size of 2 ints, block quant only with "dynamic") and
  Fp8LinearMethod.create_weights (weight float8_e4m3fn [N, K]; weight_scale_inv float32 [ceil(N/bn), ceil(K/bk)]).
- compressed-tensors: .../compressed_tensors/schemes/compressed_tensors_w8a8_fp8.py (CompressedTensorsW8A8Fp8) with
  utils/fp8_utils.py create_fp8_weight_parameter / create_fp8_scale_parameter (block: float32 [ceil(N/bn),
  ceil(K/bk)], channel: float32 [N, 1]); compressed_tensors_w8a8_int8.py (CompressedTensorsW8A8Int8.create_weights:
  weight int8 [N, K], weight_scale float32 [N, 1]); compressed_tensors_w4a4_mxfp4.py (weight_packed uint8 [N, K/2],
  weight_scale uint8 [N, K/32]); compressed_tensors_w8a8_mxfp8.py (weight float8_e4m3fn [N, K], weight_scale uint8
  [N, K/32]); compressed_tensors_w4a16_nvfp4.py (CompressedTensorsW4A16Fp4.create_weights: weight_packed uint8
  [N, K/2], weight_global_scale float32 [one per fused part], weight_scale float8_e4m3fn [N, K/16]);
  compressed_tensors.py (_is_fp8_w8a8, _is_dynamic_token_w8a8, _is_mxfp4, _is_mxfp8, _is_fp4a16_nvfp4: which config
  selects which scheme; W8A8 int8 takes symmetric weights only, its "azp" is the activations' zero point;
  NVFP4A16: weights only, tensor_group, float, 4 bits, group 16, symmetric).
- gpt-oss-mxfp4: vllm/model_executor/models/gpt_oss.py (_load_weights_mxfp4: gate_up_proj_blocks viewed as
  [E, 2I, H/2] into w13_weight, down_proj_blocks as [E, H, I/2] into w2_weight, *_scales [E, 2I, H/32] and
  [E, H, I/32], biases [E, 2I] and [E, H]) and quantization/mxfp4.py (Mxfp4Config.from_config reads no key).
"""
import json

import pytest
import torch

from grpc_harness import ServerProcess

from quantd.client import QuantdClient
from quantd.client.checkpoint import files, quantize_checkpoint

ceil = lambda a, b: -(-a // b)  # noqa: E731
F8, F32, U8, I8, BF16 = torch.float8_e4m3fn, torch.float32, torch.uint8, torch.int8, torch.bfloat16

# (profile, scheme) -> {stored suffix: (dtype, shape as a function of N, K)}; None: vLLM selects no scheme
VLLM_LINEAR = {
    ("hf-fp8", "fp8-block"): {"weight": (F8, lambda n, k: (n, k)),
                              "weight_scale_inv": (F32, lambda n, k: (ceil(n, 128), ceil(k, 128)))},
    ("compressed-tensors", "fp8-block"): {"weight": (F8, lambda n, k: (n, k)),
                                          "weight_scale": (F32, lambda n, k: (ceil(n, 128), ceil(k, 128)))},
    ("compressed-tensors", "fp8-channel"): {"weight": (F8, lambda n, k: (n, k)), "weight_scale": (F32, lambda n, k: (n, 1))},
    ("compressed-tensors", "int8"): {"weight": (I8, lambda n, k: (n, k)), "weight_scale": (F32, lambda n, k: (n, 1))},
    ("compressed-tensors", "mxfp4"): {"weight_packed": (U8, lambda n, k: (n, k // 2)),
                                      "weight_scale": (U8, lambda n, k: (n, k // 32))},
    ("compressed-tensors", "mxfp8"): {"weight": (F8, lambda n, k: (n, k)), "weight_scale": (U8, lambda n, k: (n, k // 32))},
    ("compressed-tensors", "nvfp4"): {"weight_packed": (U8, lambda n, k: (n, k // 2)),
                                      "weight_scale": (F8, lambda n, k: (n, k // 16)),
                                      "weight_global_scale": (F32, lambda n, k: (1,))},
    ("compressed-tensors", "int8-asym"): None,
}
# compressed-tensors QuantizationArgs vLLM's predicates require of config_groups[*].weights / input_activations
VLLM_CT_ARGS = {
    "fp8-block": ({"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [128, 128], "dynamic": False,
                   "symmetric": True}, {"type": "float", "num_bits": 8, "dynamic": True}),
    "fp8-channel": ({"type": "float", "num_bits": 8, "strategy": "channel", "dynamic": False, "symmetric": True},
                    {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}),
    "int8": ({"type": "int", "num_bits": 8, "strategy": "channel", "dynamic": False, "symmetric": True},
             {"num_bits": 8, "strategy": "token", "dynamic": True}),
    "mxfp4": ({"type": "float", "num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": True}, {}),
    "mxfp8": ({"type": "float", "num_bits": 8, "strategy": "group", "group_size": 32, "symmetric": True,
               "scale_dtype": "torch.uint8"}, {}),
    "nvfp4": ({"type": "float", "num_bits": 4, "strategy": "tensor_group", "group_size": 16, "symmetric": True}, {}),
}
# Linear weights [N, K] of the synthetic model: ragged against 128 (the fp8 tiles), K a multiple of 32 (MX)
LINEARS = {"model.layers.0.self_attn.q_proj": (256, 192), "model.layers.0.mlp.down_proj": (192, 320),
           "model.layers.0.mlp.up_proj": (320, 192)}


@pytest.fixture(scope="module")
def client():
    proc = ServerProcess()
    with QuantdClient(proc.target) as c:
        yield c
    proc.close()


def model_folder(path, tensors):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    files.save(path / files.SINGLE, tensors)
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    tensors = {m + ".weight": torch.randn(shape, generator=g).to(BF16) for m, shape in LINEARS.items()}
    tensors.update({"lm_head.weight": torch.randn(64, 192, generator=g).to(BF16),
                    "model.norm.weight": torch.ones(192, dtype=BF16)})
    return model_folder(tmp_path_factory.mktemp("dense") / "model", tensors)


def written(out):
    entries, _ = files.read_header(out / files.SINGLE)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    return {n: (e.dtype, e.shape) for n, e in entries.items()}, config


@pytest.mark.parametrize("profile,scheme", list(VLLM_LINEAR), ids="/".join)
def test_linear_layouts_match_vllm(client, dense, tmp_path, profile, scheme):
    quantize_checkpoint(client, dense, tmp_path / "q", profile=profile, scheme=scheme, progress=False, log=lambda _: None)
    stored, config = written(tmp_path / "q")
    assert stored["lm_head.weight"] == (BF16, (64, 192)) and stored["model.norm.weight"] == (BF16, (192,))
    table = VLLM_LINEAR[(profile, scheme)]
    if table is None:  # kept for compressed-tensors and transformers, which do read it; vLLM has no scheme
        assert config["config_groups"]["group_0"]["weights"]["symmetric"] is False
        return
    want = {f"{m}.{suffix}": (dtype, shape(*nk)) for m, nk in LINEARS.items() for suffix, (dtype, shape) in table.items()}
    assert {n: v for n, v in stored.items() if n.startswith(tuple(LINEARS))} == want
    if profile == "hf-fp8":
        assert "fp8" in config["quant_method"] and config["activation_scheme"] == "dynamic"
        assert config["weight_block_size"] == [128, 128] and config["ignored_layers"] == ["lm_head"]
        return
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    weights, activations = VLLM_CT_ARGS[scheme]
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in weights} == weights
    if scheme == "nvfp4":  # _is_fp4a16_nvfp4: weight-only
        assert group["input_activations"] is None
    assert {k: group["input_activations"][k] for k in activations} == activations


def test_gpt_oss_layout_matches_vllm(client, tmp_path):
    e, h, i = 4, 64, 96
    g = torch.Generator().manual_seed(1)
    prefix = "model.layers.0.mlp.experts."
    tensors = {prefix + "gate_up_proj": torch.randn(e, h, 2 * i, generator=g).to(BF16),
               prefix + "gate_up_proj_bias": torch.zeros(e, 2 * i, dtype=BF16),
               prefix + "down_proj": torch.randn(e, i, h, generator=g).to(BF16),
               prefix + "down_proj_bias": torch.zeros(e, h, dtype=BF16),
               "model.layers.0.mlp.router.weight": torch.randn(e, h, generator=g).to(BF16),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(h, h, generator=g).to(BF16)}
    src = model_folder(tmp_path / "src", tensors)
    quantize_checkpoint(client, src, tmp_path / "q", profile="gpt-oss-mxfp4", progress=False, log=lambda _: None)
    stored, config = written(tmp_path / "q")
    assert config["quant_method"] == "mxfp4"
    assert stored == {prefix + "gate_up_proj_blocks": (U8, (e, 2 * i, h // 32, 16)),
                      prefix + "gate_up_proj_scales": (U8, (e, 2 * i, h // 32)),
                      prefix + "gate_up_proj_bias": (BF16, (e, 2 * i)),
                      prefix + "down_proj_blocks": (U8, (e, h, i // 32, 16)),
                      prefix + "down_proj_scales": (U8, (e, h, i // 32)),
                      prefix + "down_proj_bias": (BF16, (e, h)),
                      "model.layers.0.mlp.router.weight": (BF16, (e, h)),
                      "model.layers.0.self_attn.q_proj.weight": (BF16, (h, h))}
