"""Model folders through a real `quantd serve`, loaded back with the libraries each profile targets
(transformers, compressed-tensors), on tiny models built locally from transformers' own classes."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from grpc_harness import ServerProcess  # noqa: E402

from quantd.cli import main as cli  # noqa: E402
from quantd.client import QuantdClient  # noqa: E402
from quantd.client.checkpoint import files, profiles  # noqa: E402
from quantd.client.checkpoint.profiles import CT_SCHEMES  # noqa: E402
from quantd.kernels import dispatch, reference  # noqa: E402
from quantd.kernels.spec import QuantSpec  # noqa: E402

# max |logit - bf16 logit| / max |bf16 logit| on the tiny model (measured 0.01-0.06, mxfp4 0.19, nvfp4 0.19)
LOGIT_BOUND = {"fp8-block": 0.1, "fp8-channel": 0.1, "int8": 0.1, "int8-asym": 0.1, "mxfp8": 0.1, "mxfp4": 0.35,
               "nvfp4": 0.35}
CT_PRESETS = {"fp8-block": "FP8_BLOCK", "fp8-channel": "FP8_DYNAMIC", "int8": "W8A8", "mxfp4": "MXFP4", "mxfp8": "MXFP8",
              "nvfp4": "NVFP4A16"}


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess()
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (hidden 128) saved in 5 shards with an index, and the model itself."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(path, max_shard_size="200KB")
    (path / "tokenizer_config.json").write_text("{}")
    return path, model


def load(path, config=None):
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16,
                                                             use_kernels=False).eval()


def quantize(server, src, dst, *flags):
    assert cli.main(["quantize", str(src), "-o", str(dst), "--server", server.target, *flags]) == 0


def logit_error(model, other) -> float:
    x = torch.arange(24).reshape(1, 24) % 300
    with torch.no_grad():
        a, b = model(x).logits.float(), other(x).logits.float()
    return float((a - b).abs().max() / a.abs().max())


def shared_scales(model, spec, names) -> dict:
    """{name: tensor scale} of the weights of fused modules under a spec with a tensor scale (nvfp4): the scale of
    the largest amax of the module's parts, as vLLM fuses q/k/v and gate/up."""
    if spec.format.value != "nvfp4":
        return {}
    params = dict(model.named_parameters())
    return {n: reference.tensor_scale(max(reference.amax(params[m].detach()) for m in g), spec)
            for g in profiles.fused_groups(names) for n in g}


def check_weights(model, loaded, spec, names):
    """Every quantized Linear weight of `loaded` equals quantd's own dequantization, bit for bit."""
    params = dict(model.named_parameters())
    got = dict(loaded.named_parameters())
    shared = shared_scales(model, spec, names)
    for name in names:
        want = dispatch.dequantize(reference.quantize(params[name].detach(), spec, shared.get(name)), torch.bfloat16)
        assert torch.equal(got[name].detach(), want), name


def quantized_names(model):
    return [n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]


@pytest.mark.parametrize("scheme", list(CT_SCHEMES))
def test_compressed_tensors_loads_in_transformers(server, llama, tmp_path, scheme):
    ct_quant = pytest.importorskip("compressed_tensors.quantization")
    src, model = llama
    quantize(server, src, tmp_path / "q", "--profile", "compressed-tensors", "--scheme", scheme)
    loaded = load(tmp_path / "q", transformers.CompressedTensorsConfig(run_compressed=False))
    assert logit_error(model, loaded) < LOGIT_BOUND[scheme]
    check_weights(model, loaded, CT_SCHEMES[scheme].spec, quantized_names(model))

    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    parsed = ct_quant.QuantizationConfig.model_validate(qconfig)
    assert parsed.format == CT_SCHEMES[scheme].ct_format and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"]
    if scheme in CT_PRESETS:  # as the library writes its own scheme of that name into config.json
        preset = ct_quant.preset_name_to_scheme(CT_PRESETS[scheme], ["Linear"])
        assert parsed.config_groups["group_0"].model_dump() == preset.model_dump()


def test_nvfp4_decompresses_with_compressed_tensors(server, llama, tmp_path, capsys):
    """compressed-tensors' own NVFP4PackedCompressor.decompress on the stored tensors gives quantd's dequantized
    weights bit for bit; the stored codes, scales and global scale are what the library computes from the weight
    (tests/test_nvfp4.py), the parts of a fused module sharing the tensor scale of their largest amax;
    `quantd inspect` names the scheme."""
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    src, model = llama
    quantize(server, src, tmp_path / "q", "--profile", "compressed-tensors", "--scheme", "nvfp4")
    index = json.loads((tmp_path / "q" / files.INDEX).read_text())["weight_map"]
    read = lambda n: files.read_tensor(tmp_path / "q" / index[n], files.read_header(tmp_path / "q" / index[n])[0][n])  # noqa: E731
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    params = dict(model.named_parameters())
    names = quantized_names(model)
    # q/k/v and gate/up of each layer: one tensor scale each, as vLLM fuses them
    assert len(profiles.fused_groups(names)) == 2 * model.config.num_hidden_layers
    shared = shared_scales(model, QuantSpec("nvfp4"), names)
    for name in names:
        base = name.removesuffix(".weight")
        stored = {k: read(base + "." + k) for k in ("weight_packed", "weight_scale", "weight_global_scale")}
        assert stored["weight_global_scale"].shape == (1,) and stored["weight_scale"].dtype == torch.float8_e4m3fn
        weight = NVFP4PackedCompressor.decompress(stored, scheme)["weight"]
        want = reference.dequantize(reference.quantize(params[name].detach(), QuantSpec("nvfp4"), shared.get(name)),
                                    torch.bfloat16)
        assert torch.equal(weight.view(torch.int16), want.view(torch.int16)), name
        if name in shared:
            assert torch.equal(stored["weight_global_scale"], shared[name].reshape(1)), name
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "q")]) == 0
    assert f"profile compressed-tensors, scheme nvfp4, {len(names)} quantized" in capsys.readouterr().out


@pytest.mark.parametrize("pow2", [False, True], ids=["fp32-scales", "ue8m0"])
def test_hf_fp8_loads_in_transformers_and_matches_vllm_layout(server, llama, tmp_path, pow2):
    src, model = llama
    quantize(server, src, tmp_path / "q", "--profile", "hf-fp8", *(["--pow2-scales"] if pow2 else []))
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    want = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head"], "ignored_layers": ["lm_head"]}
    assert config == (dict(want, scale_fmt="ue8m0") if pow2 else want)
    # What vLLM's Fp8LinearMethod.create_weights allocates for each Linear (the stand-in for a vLLM run):
    # weight float8_e4m3fn [N, K], weight_scale_inv float32 [ceil(N/128), ceil(K/128)].
    index = json.loads((tmp_path / "q" / files.INDEX).read_text())["weight_map"]
    headers = {n: files.read_header(tmp_path / "q" / s)[0][n] for n, s in index.items()}
    for name in quantized_names(model):
        n, k = dict(model.named_parameters())[name].shape
        assert (headers[name].dtype, headers[name].shape) == (torch.float8_e4m3fn, (n, k))
        scale = headers[name.removesuffix(".weight") + ".weight_scale_inv"]
        assert (scale.dtype, scale.shape) == (torch.float32, (-(-n // 128), -(-k // 128)))
    assert headers["lm_head.weight"].dtype == torch.bfloat16
    loaded = load(tmp_path / "q", transformers.FineGrainedFP8Config(dequantize=True))
    assert logit_error(model, loaded) < LOGIT_BOUND["fp8-block"]
    spec = CT_SCHEMES["fp8-block"].spec
    check_weights(model, loaded, spec.__class__(**{**spec.__dict__, "scale_encoding": "pow2"}) if pow2 else spec,
                  quantized_names(model))


def test_gpt_oss_mxfp4_loads_in_transformers(server, tmp_path):
    torch.manual_seed(0)
    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                       vocab_size=300, max_position_embeddings=64, layer_types=["full_attention"] * 2)
    model = transformers.GptOssForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "src")
    quantize(server, tmp_path / "src", tmp_path / "q", "--profile", "gpt-oss-mxfp4")
    entries, _ = files.read_header(tmp_path / "q" / files.SINGLE)
    e, h, i2 = model.model.layers[0].mlp.experts.gate_up_proj.shape
    blocks = entries["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert (blocks.dtype, blocks.shape) == (torch.uint8, (e, i2, h // 32, 16))
    assert entries["model.layers.0.mlp.experts.gate_up_proj_scales"].shape == (e, i2, h // 32)
    assert entries["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16  # the rest stays bf16
    loaded = load(tmp_path / "q", transformers.Mxfp4Config(dequantize=True))
    assert logit_error(model, loaded) < LOGIT_BOUND["mxfp4"]
    for layer, other in zip(model.model.layers, loaded.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(layer.mlp.experts, proj).detach()
            qt = reference.quantize(w.transpose(1, 2).contiguous(), CT_SCHEMES["mxfp4"].spec)
            want = dispatch.dequantize(qt, torch.bfloat16).transpose(1, 2)
            assert torch.equal(getattr(other.mlp.experts, proj).detach(), want)

    assert cli.main(["dequantize", str(tmp_path / "q"), "-o", str(tmp_path / "plain"), "--server", server.target]) == 0
    plain = load(tmp_path / "plain")
    assert torch.equal(plain.model.layers[1].mlp.experts.down_proj, loaded.model.layers[1].mlp.experts.down_proj)


@pytest.mark.parametrize("profile,scheme", [("hf-fp8", "fp8-block"), ("compressed-tensors", "mxfp4"),
                                            ("compressed-tensors", "int8-asym"), ("compressed-tensors", "nvfp4")])
def test_dequantize_writes_a_plain_model(server, llama, tmp_path, profile, scheme):
    src, model = llama
    quantize(server, src, tmp_path / "q", "--profile", profile, "--scheme", scheme)
    assert cli.main(["dequantize", str(tmp_path / "q"), "-o", str(tmp_path / "plain"), "--server", server.target]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    plain = load(tmp_path / "plain")
    check_weights(model, plain, CT_SCHEMES[scheme].spec, quantized_names(model))
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)


def test_dequantize_reads_a_folder_in_the_old_quantd_layout(server, llama, tmp_path):
    """Shards written one by one by `quantd quantize FILE` (codes, `<name>.scales`, `.zero_points`, metadata
    key `quantd`) beside the original config.json and index."""
    src, model = llama
    old = tmp_path / "old"
    old.mkdir()
    for path in src.iterdir():
        if path.suffix == ".safetensors":
            assert cli.main(["quantize", str(path), "-o", str(old / path.name), "--format", "int8_asym", "--axis", "0",
                             "--server", server.target]) == 0
        else:
            (old / path.name).write_bytes(path.read_bytes())
    assert cli.main(["dequantize", str(old), "-o", str(tmp_path / "plain"), "--server", server.target]) == 0
    plain = load(tmp_path / "plain")
    spec = CT_SCHEMES["int8-asym"].spec
    check_weights(model, plain, spec, [n for n, p in model.named_parameters() if p.dim() == 2])


def test_convert_hf_fp8_to_compressed_tensors_and_back_is_exact(server, llama, tmp_path, capsys):
    src, model = llama
    quantize(server, src, tmp_path / "hf", "--profile", "hf-fp8")
    convert = ["convert", "--server", "127.0.0.1:1"]   # exact pairs never call the service: a dead address
    assert cli.main([*convert, str(tmp_path / "hf"), "-o", str(tmp_path / "ct"), "--profile", "compressed-tensors",
                     "--scheme", "fp8-block"]) == 0
    loaded = load(tmp_path / "ct", transformers.CompressedTensorsConfig(run_compressed=False))
    check_weights(model, loaded, CT_SCHEMES["fp8-block"].spec, quantized_names(model))
    assert cli.main([*convert, str(tmp_path / "ct"), "-o", str(tmp_path / "back"), "--profile", "hf-fp8"]) == 0
    back, first = folder_bytes(tmp_path / "back"), folder_bytes(tmp_path / "hf")
    assert back.pop(".quantd-checkpoint.json") != first.pop(".quantd-checkpoint.json")  # the settings differ
    assert back == first

    assert cli.main([*convert, str(tmp_path / "hf"), "-o", str(tmp_path / "mx"), "--profile", "compressed-tensors",
                     "--scheme", "mxfp4"]) == 2
    assert "hf-fp8 fp8-block -> compressed-tensors mxfp4 is not exact" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "mx"), "--profile", "compressed-tensors",
                     "--scheme", "mxfp4", "--allow-lossy", "--server", server.target]) == 0
    assert not (tmp_path / "mx.bf16").exists()
    loaded = load(tmp_path / "mx", transformers.CompressedTensorsConfig(run_compressed=False))
    assert logit_error(model, loaded) < LOGIT_BOUND["mxfp4"]


def test_output_shards_refilled_by_size(server, llama, tmp_path):
    src, model = llama
    limit = 100_000
    with QuantdClient(server.target) as client:
        client.quantize_checkpoint(src, tmp_path / "q", profile="compressed-tensors", scheme="fp8-block",
                                   max_shard_bytes=limit, progress=False, log=lambda _: None)
    index = json.loads((tmp_path / "q" / files.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > len(files.ModelFolder(src).shards)
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    assert sorted(p.name for p in (tmp_path / "q").glob("*.safetensors")) == shards
    total = 0
    for shard in shards:
        entries, _ = files.read_header(tmp_path / "q" / shard)
        assert {n for n, s in index["weight_map"].items() if s == shard} == set(entries)
        nbytes = sum(e.nbytes for e in entries.values())
        assert nbytes <= limit or len({n.rsplit(".", 1)[0] for n in entries}) == 1, shard  # one module may exceed
        total += nbytes
    assert index["metadata"]["total_size"] == total
    loaded = load(tmp_path / "q", transformers.CompressedTensorsConfig(run_compressed=False))
    check_weights(model, loaded, CT_SCHEMES["fp8-block"].spec, quantized_names(model))


def folder_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_output_is_reproducible_and_resumes(server, llama, tmp_path, capsys):
    src, _ = llama
    for out in ("a", "b"):
        quantize(server, src, tmp_path / out, "--profile", "compressed-tensors", "--scheme", "mxfp8")
    first = folder_bytes(tmp_path / "a")
    assert first == folder_bytes(tmp_path / "b")
    assert {oct(os.stat(tmp_path / "a" / n).st_mode & 0o777) for n in first} == {oct(0o666 & ~current_umask())}
    shards = sorted(n for n in first if n.endswith(".safetensors"))
    (tmp_path / "a" / shards[1]).unlink()
    with open(tmp_path / "a" / shards[3], "r+b") as f:  # a shard cut short, as by a kill
        f.truncate(100)
    capsys.readouterr()
    quantize(server, src, tmp_path / "a", "--profile", "compressed-tensors", "--scheme", "mxfp8")
    captured = capsys.readouterr()
    assert f"{len(shards) - 2} shard(s) already finished, skipped" in captured.err
    assert "2 shard(s) written" in captured.out
    assert folder_bytes(tmp_path / "a") == first
    # other settings: nothing is skipped
    quantize(server, src, tmp_path / "a", "--profile", "compressed-tensors", "--scheme", "fp8-block")
    assert "already finished" not in capsys.readouterr().err


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dry_run_lists_the_skip_list_and_include_overrides_it(llama, capsys):
    src, _ = llama
    assert cli.main(["quantize", str(src), "-o", "unused", "--dry-run", "--ignore", r"layers\.1\."]) == 0
    lines = dict(line.split(None, 1)[::-1] for line in capsys.readouterr().out.splitlines())
    assert lines["lm_head.weight  (ignored)"] == "keep"
    assert lines["model.layers.0.self_attn.q_proj.weight"] == "quantize"
    assert lines["model.layers.1.self_attn.q_proj.weight  (ignored)"] == "keep"
    assert lines["model.norm.weight  (not a target of the profile)"] == "keep"
    assert cli.main(["quantize", str(src), "-o", "unused", "--dry-run", "--include", "lm_head"]) == 0
    assert "quantize    lm_head.weight" in capsys.readouterr().out


def test_inspect(server, llama, tmp_path, capsys):
    src, _ = llama
    quantize(server, src, tmp_path / "q", "--profile", "compressed-tensors", "--scheme", "int8-asym")
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "profile compressed-tensors, scheme int8-asym, 14 quantized and 7 kept" in out
    index = json.loads((tmp_path / "q" / files.INDEX).read_text())["weight_map"]
    victim = "model.layers.0.mlp.up_proj.weight_zero_point"
    shard = tmp_path / "q" / index[victim]
    entries, _ = files.read_header(shard)
    files.save(shard, {n: files.read_tensor(shard, e) for n, e in entries.items() if n != victim})
    del index[victim]
    files.write_json(tmp_path / "q" / files.INDEX, {"weight_map": index})
    assert cli.main(["inspect", str(tmp_path / "q")]) == 1
    assert f"problem: model.layers.0.mlp.up_proj.weight: stored tensor {victim} is missing" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(server, llama, tmp_path, capsys):
    src, _ = llama
    (tmp_path / "empty").mkdir()
    assert cli.main(["quantize", str(tmp_path / "empty"), "-o", str(tmp_path / "x"), "--server", server.target]) == 2
    assert "not a model folder (no config.json)" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in src.iterdir():
        if p.name != "model-00002-of-00005.safetensors":
            (broken / p.name).write_bytes(p.read_bytes())
    assert cli.main(["inspect", str(broken)]) == 2
    assert "missing: model-00002-of-00005.safetensors" in capsys.readouterr().err

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((src / "config.json").read_text())
    files.save(odd / files.SINGLE, {"a.weight": torch.ones(64, 48, dtype=torch.bfloat16),
                                    "b.weight": torch.ones(64, 64, dtype=torch.bfloat16)})
    flags = ["--profile", "compressed-tensors", "--scheme", "mxfp4", "--server", server.target]
    assert cli.main(["quantize", str(odd), "-o", str(tmp_path / "y"), *flags]) == 2
    assert "a.weight: its last dim 48 is not a multiple of 32" in capsys.readouterr().err
    assert cli.main(["quantize", str(odd), "-o", str(tmp_path / "y"), *flags, "--skip-unsupported"]) == 0
    entries, _ = files.read_header(tmp_path / "y" / files.SINGLE)
    assert entries["a.weight"].dtype == torch.bfloat16 and entries["b.weight_packed"].dtype == torch.uint8


def kernels_hub_package() -> bool:
    """transformers' native FineGrainedFP8 forward takes its kernel from the `kernels` package (fetched from the
    hub); without it only the dequantizing path runs."""
    from importlib import metadata
    try:
        metadata.version("kernels")
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.gpu
@pytest.mark.parametrize("dequantize", [False, True], ids=["fp8-forward", "dequantized"])
def test_hf_fp8_runs_on_the_gpu(server, llama, tmp_path, dequantize):
    """On a GPU: the hf-fp8 checkpoint loads with transformers' FineGrainedFP8 path, as fp8 weights (its own FP8
    forward) or dequantized on load, and its logits stay within the FP8 bound of the bf16 model's."""
    if not dequantize and not kernels_hub_package():
        pytest.skip("transformers' FP8 forward needs the `kernels` package, which fetches its kernel from the hub")
    src, model = llama
    quantize(server, src, tmp_path / "q", "--profile", "hf-fp8")
    config = transformers.FineGrainedFP8Config(dequantize=dequantize)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", dtype=torch.bfloat16, device_map="cuda", quantization_config=config).eval()
    want = torch.bfloat16 if dequantize else torch.float8_e4m3fn
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == want
    x = (torch.arange(24).reshape(1, 24) % 300).cuda()
    with torch.no_grad():
        a, b = model.cuda()(x).logits.float(), loaded(x).logits.float()
    model.cpu()
    assert float((a - b).abs().max() / a.abs().max()) < LOGIT_BOUND["fp8-block"]


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_transformers_quantize_on_load_agrees_at_the_same_block_size(scale_fmt, rng):
    """transformers' own FP8 quantize-on-load (FineGrainedFP8's Fp8Quantize) against quantd's 128 x 128 tiles:
    scales within one float32 ulp (it stores 1 / (448 / amax), quantd amax / 448), equal as powers of two, and
    codes that differ, if ever, by one step where its multiplication by the reciprocal rounds across a boundary.
    A per-cent difference needs another block size (FORMATS.md)."""
    import types

    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    w = (torch.randn(384, 512, generator=rng) * 0.02).bfloat16()
    config = transformers.FineGrainedFP8Config(weight_block_size=(128, 128), scale_fmt=scale_fmt)
    out = Fp8Quantize(types.SimpleNamespace(quantization_config=config))._quantize_one("m.weight", w)
    qt = reference.quantize(w, QuantSpec("fp8_e4m3", "tile", tile=(128, 128),
                                         scale_encoding="pow2" if scale_fmt == "ue8m0" else "fp32"))
    theirs, ours = out["m.weight_scale_inv"].float(), qt.scales.float()
    assert ((theirs - ours).abs() <= torch.finfo(torch.float32).eps * ours).all()
    codes = (out["m.weight"].float() - qt.codes.float()).abs()
    step = 2 * torch.finfo(torch.float8_e4m3fn).eps * qt.codes.float().abs() + 2.0 ** -9  # one E4M3 step, or less
    assert (codes <= step).all()
    assert (codes > 0).float().mean() < 1e-2  # about 0.1 % with fp32 scales
    if scale_fmt == "ue8m0":  # a power-of-two scale's reciprocal is exact: the same codes
        assert (codes == 0).all()
