"""The CPU backend: the reference's own block functions, compiled with torch.compile.

The compiled graph is reference.quantize_blocks on a (num_blocks, block_elems) view,
plus the storage cast, with the fp8 rounding left to torch's native RNE cast after the
reference's explicit clamp, and E2M1's to reference.e2m1_codes of the clamped quotients
(tests/test_encoders.py proves both equal to round_to_grid on every bf16/fp16 value and on
random fp32, E2M1 on every midpoint of its grid too). Blocking (reshape, pad,
permute) stays in eager torch: a view where the blocks divide the shape, except channels of
axis != 0, which are copied into block order; 2-D tiles are blocked inside their graph, whose
permutations into and out of tile order become index arithmetic instead of two copies. Dequantizing is
elementwise: tiles broadcast each tile's scale over its codes where they lie, and a per-tensor block is taken as
the tensor's rows, so that the graph's threads share them (4096^2 on two cores: tiles 32 -> 12 ms, per tensor
20 -> 13 ms, as fast as groups).

One graph per (spec, input dtype, explicit scales or not): the number of blocks is
dynamic and the block size static, so tensors of any shape reuse it. Dequantizing graphs are shared by specs
that differ only in their scale encoding or output dtype (_dequantize_graphs). Where compiling fails
(no working C++ compiler) the backend logs a warning and runs the same functions eagerly.
With out= tensors (the server's shared memory) whose layout the blocks match, graphs of
their own write the results straight into them: no temporary, no copy.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import types

import torch

from . import reference
from .layout import check_out, check_out_values, copy_into, copy_stored
from .spec import E2M1, Format, Granularity, QuantizedTensor, QuantSpec

TAKES_OUT = True  # quantize and dequantize write into out= tensors (in the compiled graph where the layout allows)

log = logging.getLogger(__name__)

# Whether the block functions run compiled (use_compiler).
_compiling = True


def use_compiler(on: bool) -> None:
    """Compile the block functions (the default), or run them as they are, in this process: the same bits (they
    are the reference's), without torch.compile's pause on each spec's and dtype's first call (seconds; importing
    inductor alone takes several), at a small fraction of the compiled throughput (BENCHMARKS.md, CPU backend). For
    short-lived servers on small tensors (test suites); `quantd serve --cpu-compile off`."""
    global _compiling
    _compiling = bool(on)


# Graphs of one spec's code object: input (or code and output) dtypes x explicit scales or not,
# plus size-1 specializations. Past the default limit (8) dynamo would run eagerly. Dynamo's config
# is a context variable, so the limit is raised around each call, in the thread making it (the
# server compiles in its compute threads, which never saw a setting made in another thread).
_RECOMPILE_LIMIT = 64


def _quantize_blocks(blocks: torch.Tensor, scales: torch.Tensor | None, *, spec: QuantSpec):
    """(B, E) blocks of the input dtype -> (codes (B, E) in storage layout, stored scales (B,), zero points,
    tensor scale). Per tensor, the B rows are the one block (_tensor_rows)."""
    values, *stored = reference.quantize_blocks(blocks.float(), spec, scales, native_cast=True,
                                                whole=spec.granularity == Granularity.TENSOR)
    return reference.store_codes(values, spec), *stored


def _quantize_tiles(x4: torch.Tensor, scales: torch.Tensor | None, *, spec: QuantSpec):
    """_quantize_blocks of the 2-D tiles of an input seen as (tile rows, bm, tile columns, bn), codes back in its
    (tile rows * bm, tile columns * bn) layout: the permutations into and out of tile order (to_blocks',
    from_blocks') are index arithmetic in the graph, not copies."""
    tr, bm, tc, bn = x4.shape
    codes, *stored = _quantize_blocks(x4.permute(0, 2, 1, 3).reshape(tr * tc, bm * bn), scales, spec=spec)
    return codes.reshape(tr, tc, bm, bn).permute(0, 2, 1, 3).reshape(tr * bm, tc * bn), *stored


def _quantize_blocks_into(blocks: torch.Tensor, scales: torch.Tensor | None, codes_out: torch.Tensor, *,
                          spec: QuantSpec):
    """_quantize_blocks writing the codes into the given (B, ...) tensor in the graph (no temporary holds them);
    returns the rest. One mutated input only: aot_autograd refuses mutations of inputs sharing a storage under
    other dtypes, as a client's region holds codes and scales."""
    codes, *rest = _quantize_blocks(blocks, scales, spec=spec)
    torch._check(codes_out.shape[0] == codes.shape[0])
    codes_out.copy_(codes)
    return rest


def _dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_points, out_dtype: torch.dtype, *,
                       spec: QuantSpec):
    """(B, E) codes (fp8/int8 storage dtype; E2M1: (B, E / 2) packed pairs) and (B, 1) scales -> (B, E) values of
    out_dtype. E2M1 into a 16-bit type: each code byte's two values written as one 32-bit word (element 2i in the
    low half), so that the graph interleaves nothing element by element."""
    if spec.element is E2M1 and out_dtype.itemsize == 2:
        pairs = codes.to(torch.int32)
        low, high = (reference.dequantize_blocks(reference.decode_e2m1(nibbles), scale, zero_points).to(out_dtype)
                     .view(torch.int16).to(torch.int32) for nibbles in (pairs & 0xF, pairs >> 4))
        return ((low & 0xFFFF) | (high << 16)).view(out_dtype)
    if spec.element is E2M1:
        values = reference.decode_e2m1(reference.unpack_nibbles(codes, codes.shape[1] * 2))
    else:
        values = codes.float()
    return reference.dequantize_blocks(values, scale, zero_points).to(out_dtype)


def _dequantize_tiles(c4: torch.Tensor, scale: torch.Tensor, zero_points, out_dtype: torch.dtype, *,
                      spec: QuantSpec):
    """_dequantize_blocks of the 2-D tiles of codes seen as (tile rows, bm, tile columns, bn), in place: each
    tile's scale (and zero point) broadcast over it, the values in the codes' (tile rows * bm, tile columns * bn)
    layout (no permutation at all; dequantizing is elementwise)."""
    tr, bm, tc, bn = c4.shape
    grid = (tr, 1, tc, 1)
    values = _dequantize_blocks(c4, scale.reshape(grid), None if zero_points is None
                                else zero_points.reshape(grid), out_dtype, spec=spec)
    return values.reshape(tr * bm, tc * bn)


def _dequantize_blocks_into(codes: torch.Tensor, scale: torch.Tensor, zero_points, values_out: torch.Tensor, *,
                            spec: QuantSpec):
    """_dequantize_blocks writing into the given (B, E) tensor of the output dtype, in the graph."""
    values = _dequantize_blocks(codes, scale, zero_points, values_out.dtype, spec=spec)
    torch._check(values_out.shape[0] == values.shape[0])
    values_out.copy_(values)


@functools.lru_cache(maxsize=None)
def _compiled(fn, spec: QuantSpec):
    """torch.compile of fn with spec bound, or fn itself when the compiler is unavailable.

    Each spec gets a copy of fn with a code object of its own. Dynamo keeps compiled graphs
    per code object behind guards on the arguments, and its guards on the spec's fields are
    not to be trusted (mxfp8 reused the mxfp4 graph in torch 2.13); with one code object per
    spec, only dtypes and sizes are left to the guards.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{abs(hash(spec)):x}")
    fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
    # spec as the copy's keyword default, not through functools.partial: torch.compile runs a partial through
    # one shared wrapper, whose single code object then held every spec's graphs (and hit the recompile limit
    # after 64 specs)
    fn.__kwdefaults__ = {"spec": spec}
    try:
        import torch._dynamo as dynamo
        import torch._inductor.config  # noqa: F401  (fails early where inductor is missing)
        compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        beside_fx_tracing = _beside_fx_tracing(dynamo.config)
    except Exception as exc:  # pragma: no cover - depends on the installation
        log.warning("quantd CPU backend: torch.compile unavailable (%s); running eagerly", exc)
        return fn

    def run(*args):
        with dynamo.config.patch(recompile_limit=max(dynamo.config.recompile_limit, _RECOMPILE_LIMIT),
                                 **beside_fx_tracing):
            return compiled(*args)
    return run


def _beside_fx_tracing(config) -> dict:
    """Dynamo settings under which a compiled call still compiles and runs while another thread traces with FX.

    torch.fx keeps "tracing" in a global flag, which inductor sets while it compiles; a compiled function called
    meanwhile from another thread took itself for one being traced: it raised "Detected that you are using FX to
    symbolically trace a dynamo-optimized function" (torch 2.11, the server's compute threads: one compiling a
    graph, another calling one). No caller of this backend traces it with FX, so the flag is never ours."""
    if hasattr(config, "force_compile_during_fx_trace"):
        return {"force_compile_during_fx_trace": True, "error_on_nested_fx_trace": False}
    return {"error_on_nested_fx_trace": False}  # older: such a call runs the function eagerly (the same bits)


# (fn, spec) pairs whose compilation failed: they run eagerly from then on.
_eager = set()


def _run(fn, spec, *args):
    """Run fn compiled; if compiling fails (no C++ compiler, ...), warn and run it eagerly from then on. Without
    the compiler (use_compiler) it runs as it is."""
    if _compiling and (fn, spec) not in _eager:
        try:
            return _compiled(fn, spec)(*args)
        except Exception as exc:
            if not _is_compile_error(exc):
                raise
            _eager.add((fn, spec))
            log.warning("quantd CPU backend: compiling %s for %s failed (%s: %s); running eagerly", fn.__name__,
                        spec.describe(), type(exc).__name__, exc)
    return fn(*args, spec=spec)


def _is_compile_error(exc: Exception) -> bool:
    mod = type(exc).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or isinstance(exc, (OSError, RuntimeError)) and (
        "compile" in str(exc).lower() or "inductor" in str(exc).lower())


def _mark_blocks_dynamic(spec: QuantSpec, *tensors, per_block=(), unbacked: bool = True):
    """Let the block count vary without recompiling; tensor and channel blocks also vary in size. per_block: tensors
    of a row a block (scales, zero points), whose count is the block count, except per tensor, where the blocks
    are the tensor's rows (_tensor_rows) and they hold the one block's. unbacked=False (the graphs writing into
    given tensors): a backed block count, which lets inductor write the results straight into them (with unbacked
    counts it computes them apart and copies, twice the time), at the price of a graph of its own for a single
    block."""
    if not _compiling:  # marks for the compiler only (and the import of dynamo they need)
        return
    whole = spec.granularity in (Granularity.TENSOR, Granularity.CHANNEL)
    if spec.granularity == Granularity.TENSOR:
        per_block = ()
    for t in (*tensors, *per_block):
        if t is not None and t.dim() >= 1:
            if unbacked:
                torch._dynamo.decorators.mark_unbacked(t, 0)
            else:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            if whole and t.dim() == 2 and t.shape[1] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 1)  # backed: unbacked sizes stop vectorization


def _mark_tiles_dynamic(grid: torch.Tensor, *per_tile):
    """Let the tile counts of a (tile rows, bm, tile columns, bn) grid, and the count of per-tile tensors (scales,
    zero points; None skipped), vary without recompiling: unbacked, one graph for every shape."""
    if not _compiling:
        return
    torch._dynamo.decorators.mark_unbacked(grid, 0)
    torch._dynamo.decorators.mark_unbacked(grid, 2)
    for t in per_tile:
        if t is not None:
            torch._dynamo.decorators.mark_unbacked(t, 0)


def quantize(x: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None, *,
             out: QuantizedTensor | None = None) -> QuantizedTensor:
    """Same contract and bits as reference.quantize; out: as dispatch.quantize's, written by the compiled graph
    itself where the blocks are x's own memory in order (else the results are copied there)."""
    reference.check_input(x, spec, scales)
    x = x.detach()  # quantization has no gradient; a graph traced for autograd would be another compile
    if out is not None:
        check_out(out, spec, x.shape, x.device)
    if x.numel() == 0:
        qt = reference.quantize(x, spec, scales)  # nothing to compile
        return qt if out is None else copy_into(out, qt)
    if scales is not None:
        scales = scales.float().reshape(-1, 1)
    if spec.granularity == Granularity.TILE and (_quantize_tiles, spec) not in _eager:
        # padded here to whole tiles (zeros, as to_blocks pads), so that one graph serves every shape
        x2 = x.reshape(-1, x.shape[-1])
        rows, k = x2.shape
        x4 = reference.tile_grid(x2, spec.tile).contiguous()
        _mark_tiles_dynamic(x4, scales)
        codes, stored_scales, zero_points, tensor_scale = _run(_quantize_tiles, spec, x4, scales)
        return _result(codes[:rows, :k].reshape(x.shape).contiguous(), stored_scales, zero_points, tensor_scale, spec,
                       x.shape, out)
    blocks = _tensor_rows(x) if spec.granularity == Granularity.TENSOR else reference.to_blocks(x, spec, dtype=x.dtype)
    if out is not None and _in_order(blocks, x) and _apart(out.codes, x) \
            and (_quantize_blocks_into, spec) not in _eager:
        return _quantize_into(blocks, spec, scales, out)
    # contiguous: one memory layout per graph (channel blocks of axis != 0 are strided views)
    blocks = blocks.contiguous()
    _mark_blocks_dynamic(spec, blocks, per_block=(scales,))
    codes, stored_scales, zero_points, tensor_scale = _run(_quantize_blocks, spec, blocks, scales)
    codes = _codes_from_blocks(codes, spec, tuple(x.shape)).contiguous()
    return _result(codes, stored_scales, zero_points, tensor_scale, spec, x.shape, out)


def _tensor_rows(t: torch.Tensor) -> torch.Tensor:
    """A per-tensor block as the tensor's rows (a view where t is contiguous): a block of one row of every element
    kept a graph's outer loop, and so its work, to one thread."""
    return t.reshape(-1, t.shape[-1] if t.dim() else 1)


def _result(codes, stored_scales, zero_points, tensor_scale, spec: QuantSpec, shape, out) -> QuantizedTensor:
    """The QuantizedTensor of codes in the reference's layout and block-order scales (and zero points), copied
    into `out` when given."""
    sshape = spec.scale_shape(shape)
    zero_points = None if zero_points is None else zero_points.reshape(sshape)
    qt = QuantizedTensor(codes, reference.as_e8m0(stored_scales.reshape(sshape)), spec, tuple(shape), zero_points,
                         tensor_scale)
    return qt if out is None else copy_into(out, qt)


def _in_order(blocks: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the (B, E) blocks are x's own memory, row-major and unpadded: then block-order codes and scales are
    the row-major codes and scales of x's shape (E2M1's packed pairs included: its groups are even)."""
    return blocks.is_contiguous() and blocks.numel() == x.numel() and blocks.data_ptr() == x.data_ptr()


def _apart(written: torch.Tensor, read: torch.Tensor) -> bool:
    """Whether a graph may write `written` while it reads `read`: not one storage (aot_autograd cannot take the
    mutation of an input that shares a storage with another under another dtype; a client's scratch region may
    hold both)."""
    return written.untyped_storage().data_ptr() != read.untyped_storage().data_ptr()


def _quantize_into(blocks: torch.Tensor, spec: QuantSpec, scales, out: QuantizedTensor) -> QuantizedTensor:
    """quantize's codes written by the graph into out.codes; the small rest copied into out. A graph that fails to
    compile runs eagerly once, and the copying path serves from then on (quantize checks _eager)."""
    codes = out.codes.reshape(blocks.shape[0], -1)
    _mark_blocks_dynamic(spec, blocks, codes, per_block=(scales,), unbacked=False)
    stored_scales, zero_points, tensor_scale = _run(_quantize_blocks_into, spec, blocks, scales, codes)
    rest = dict(scales=stored_scales, zero_points=zero_points, tensor_scale=tensor_scale)
    copy_stored(out, {name: t for name, t in rest.items() if t is not None})
    return out


def dequantize(qt: QuantizedTensor, out_dtype: torch.dtype | None = None, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract and bits as reference.dequantize; out: as dispatch.dequantize's, written by the compiled graph
    itself where the code blocks are in row-major order (else the values are copied there)."""
    spec, shape = qt.spec, tuple(qt.shape)
    out_dtype = out_dtype or spec.dequant_dtype
    if out is not None:
        check_out_values(out, shape, out_dtype, qt.codes.device)
    if math.prod(shape) == 0 or spec.element is E2M1 and spec.granularity != Granularity.GROUP:
        values = reference.dequantize(qt, out_dtype)
        return values if out is None else out.copy_(values)
    scale = reference.scale_values(qt).reshape(-1, 1)
    zp = None if qt.zero_points is None else qt.zero_points.reshape(-1, 1)
    graphs = _dequantize_graphs(spec)
    if spec.granularity == Granularity.TILE and (_dequantize_tiles, graphs) not in _eager:
        # the codes' bytes padded to whole tiles (as quantize pads its input), so that one graph serves every shape
        c2 = qt.codes.reshape(-1, shape[-1]).view(torch.uint8)
        c4 = reference.tile_grid(c2, spec.tile).contiguous().view(qt.codes.dtype)  # (a bitcast in the graph: scalar)
        _mark_tiles_dynamic(c4, scale, zp)
        values = _run(_dequantize_tiles, graphs, c4, scale, zp, out_dtype)[:c2.shape[0], :c2.shape[1]].reshape(shape)
        return values.contiguous() if out is None else out.copy_(values)
    if spec.granularity == Granularity.TENSOR:  # the one block as the tensor's rows, its scale broadcast
        codes = _tensor_rows(qt.codes)
    else:
        codes = reference.to_blocks(qt.codes, _code_spec(spec), dtype=qt.codes.dtype)
    elems = spec.group_size if spec.element is E2M1 else codes.shape[1]
    if out is not None and _in_order(codes, qt.codes) and codes.shape[0] * elems == math.prod(shape) \
            and all(_apart(out, t) for t in qt.stored().values()) and (_dequantize_blocks_into, graphs) not in _eager:
        values = out.reshape(codes.shape[0], elems)
        _mark_blocks_dynamic(spec, codes, values, per_block=(scale, zp), unbacked=False)
        _run(_dequantize_blocks_into, graphs, codes, scale, zp, values)
        return out
    codes = codes.contiguous()
    _mark_blocks_dynamic(spec, codes, per_block=(scale, zp))
    values = reference.from_blocks(_run(_dequantize_blocks, graphs, codes, scale, zp, out_dtype), spec, shape)
    return values.contiguous() if out is None else out.copy_(values)


@functools.lru_cache(maxsize=None)
def _dequantize_graphs(spec: QuantSpec) -> QuantSpec:
    """The spec whose compiled functions dequantize `spec`'s codes: the same but for the scale encoding and the
    output dtype, which the graphs never see (they take fp32 scale values, and the output dtype as an argument),
    so that specs differing only in those share their graphs."""
    return dataclasses.replace(spec, scale_encoding=None, out_dtype="bfloat16")


# GEMMs on the CPU are the reference's (fp64 products of the dequantized operands).
matmul = reference.matmul


def _code_spec(spec: QuantSpec) -> QuantSpec:
    """The blocking of `spec`'s codes as stored. E2M1 groups (32 or 16) are even and start at even columns, so the
    pairs packed inside a group are the pairs reference.pack_nibbles forms along the last dim: its codes block as
    groups of half the size (the padding packs as code 0)."""
    if spec.element is not E2M1:
        return spec
    return QuantSpec(Format.FP8_E4M3, Granularity.GROUP, group_size=spec.group_size // 2)


def _codes_from_blocks(codes: torch.Tensor, spec: QuantSpec, shape: tuple) -> torch.Tensor:
    """Block-layout codes -> the reference's code layout (E2M1: packed pairs within each group)."""
    return reference.from_blocks(codes, _code_spec(spec), spec.code_shape(shape))
