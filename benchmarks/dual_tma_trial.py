"""A trial of speed: the E4M3 1 x 128 dual layout (X along its rows and X^T along its rows, quantize_dual's two
results) from 128 x 128 tiles that TMA copies into shared memory, each tile's row and column scales reduced from
the one copy and both codes stored through TMA (or plain stores), timed against the shipped quantize_dual in one
process and compared with it byte for byte (random bf16, one tile of other scales: the careless path only).

    python3 benchmarks/dual_tma_trial.py [--n 16384] [--sms 96] VARIANT...

VARIANT: warps,persist,stages,tma_store (persist: programs an SM looping over tiles with `stages` copies in
flight, 0: one tile a program; tma_store 0: the codes by tl.store). Figures: BENCHMARKS.md (2026-12-07).
"""
import argparse
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from profile_kernels import restrict_sms  # noqa: E402
from quantize import bench, time_copy, op_bytes  # noqa: E402
from quantd.kernels import triton_quantize  # noqa: E402
from quantd.kernels.launch import sm_count  # noqa: E402
from quantd.kernels.quantize_plan import element_constants  # noqa: E402
from quantd.kernels.spec import QuantSpec  # noqa: E402
from quantd.kernels.triton_elements import (CORRECTED_ANY_ZERO, GUARDED, block_scale, encode_float,  # noqa: E402
                                            finite_abs, quotient)

SPEC = QuantSpec()
FMT = element_constants(SPEC)


@triton.jit
def _tile(t, xd, cd, ctd, c_ptr, ct_ptr, s_ptr, st_ptr, M, K, tiles_c, BR: tl.constexpr, BC: tl.constexpr,
          FMT: tl.constexpr, TMA_STORE: tl.constexpr):
    tr = t // tiles_c
    tc = t - tr * tiles_c
    x = xd.load([tr * BR, tc * BC]).to(tl.float32)
    a = finite_abs(x)
    rs, _ = block_scale(tl.max(a, axis=1), 0.0, FMT, CORRECTED_ANY_ZERO)
    cs, _ = block_scale(tl.max(a, axis=0), 0.0, FMT, CORRECTED_ANY_ZERO)
    q = encode_float(quotient(x, rs[:, None], GUARDED), FMT).to(tl.uint8)
    qt = encode_float(quotient(x, cs[None, :], GUARDED), FMT).to(tl.uint8)
    rows = tr * BR + tl.arange(0, BR)
    cols = tc * BC + tl.arange(0, BC)
    tl.store(s_ptr + rows * (K // BC) + tc, rs, mask=rows < M)
    tl.store(st_ptr + cols * (M // BR) + tr, cs, mask=cols < K)
    if TMA_STORE:
        cd.store([tr * BR, tc * BC], q)
        ctd.store([tc * BC, tr * BR], tl.trans(qt))
    else:
        tl.store(c_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q)
        tl.store(ct_ptr + cols[None, :].to(tl.int64) * M + rows[:, None], qt)


@triton.jit
def _dual_kernel(xd, cd, ctd, c_ptr, ct_ptr, s_ptr, st_ptr, M, K, tiles_c, tiles, BR: tl.constexpr, BC: tl.constexpr,
                 FMT: tl.constexpr, PERSIST: tl.constexpr, STAGES: tl.constexpr, TMA_STORE: tl.constexpr):
    if PERSIST:
        for t in tl.range(tl.program_id(0), tiles, tl.num_programs(0), num_stages=STAGES):
            _tile(t, xd, cd, ctd, c_ptr, ct_ptr, s_ptr, st_ptr, M, K, tiles_c, BR, BC, FMT, TMA_STORE)
    else:
        _tile(tl.program_id(0), xd, cd, ctd, c_ptr, ct_ptr, s_ptr, st_ptr, M, K, tiles_c, BR, BC, FMT, TMA_STORE)


def runner(x, rows, cols, warps, persist, stages, tma_store):
    M, K = x.shape
    B = 128
    if M % B or K % B:
        raise SystemExit(f"dual_tma_trial: whole 128 x 128 tiles only, got {M} x {K}")
    xd = TensorDescriptor(x, [M, K], [K, 1], [B, B])
    cd = TensorDescriptor(rows.codes.view(torch.uint8), [M, K], [K, 1], [B, B])
    ctd = TensorDescriptor(cols.codes.view(torch.uint8), [K, M], [M, 1], [B, B])
    tiles_c, tiles = K // B, (M // B) * (K // B)
    grid = (min(tiles, persist * sm_count(x.device)),) if persist else (tiles,)

    def run():
        _dual_kernel[grid](xd, cd, ctd, rows.codes.view(torch.uint8), cols.codes.view(torch.uint8), rows.scales,
                           cols.scales, M, K, tiles_c, tiles, BR=B, BC=B, FMT=FMT, PERSIST=bool(persist),
                           STAGES=stages, TMA_STORE=bool(tma_store), num_warps=warps)
    return run


def same(a, b):
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in
               ((a.codes, b.codes), (a.scales, b.scales)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--sms", type=int)
    args = ap.parse_args()
    if args.sms:
        restrict_sms(args.sms)
    x = torch.randn(args.n, args.n, device="cuda", dtype=torch.bfloat16) * 3
    x[:128, :128] *= 1e-3  # a tile of other scales
    _, copy_gbs = time_copy(x)
    nbytes = op_bytes(x, SPEC, "dual")
    print(f"copy {copy_gbs:.0f} GB/s on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}", flush=True)
    want_r, want_c = triton_quantize.quantize_dual(x, SPEC)

    def shipped():
        t = bench(lambda: triton_quantize.quantize_dual(x, SPEC))
        print(f"  shipped dual {nbytes / t / 1e6 / copy_gbs:.3f} x copy", flush=True)
    shipped()
    for v in args.variants:
        warps, persist, stages, tma_store = map(int, v.split(","))
        got_r, got_c = triton_quantize.quantize_dual(x * 0, SPEC)
        try:
            run = runner(x, got_r, got_c, warps, persist, stages, tma_store)
            run()
            flag = "" if same(got_r, want_r) and same(got_c, want_c) else "  RESULT DIFFERS"
            print(f"  trial {v}: {nbytes / bench(run) / 1e6 / copy_gbs:.3f} x copy{flag}", flush=True)
        except Exception as e:  # a variant that does not compile or fit
            print(f"  trial {v}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    shipped()


if __name__ == "__main__":
    main()
