"""What the imported triton's Gluon gives a Hopper GEMM that would share operands across a cluster of two CTAs,
compiled for sm_90 on a machine without a GPU (no launch): prints the PTX of

  multicast  a TMA copy of a 128 x 128 FP8 tile into shared memory that both CTAs of the cluster hold
             (cga_layout [[0, 0]], multicast=True): the cp.async.bulk instruction and who issues it;
  arrive     an arrive on a barrier allocated for the CTA pair (allocate_mbarrier(two_ctas=True)): local
             (shared::cta) or remote (shared::cluster, to CTA 0 of the pair);
  ring       (triton 3.9) an FP8 GEMM of 256 x 128 tiles over the pair, each CTA 128 rows of A with the whole B
             tile: a producer warp streams A (each CTA its half) and B (multicast by CTA 0) into a ring of STAGES
             slots; the consumer warpgroup's wgmma reads them. A slots are released to each CTA's own producer, B
             slots on a pair barrier that both CTAs' consumers arrive on, initialised and waited on in CTA 0 only
             (3.9 predicates both on the CTA rank). Compiled only: the untimed skeleton of a multicast ring,
             without the block-scaled promotion of kernels/gluon_gemm.py.

    PYTHONPATH=DIR python benchmarks/gluon_cluster_probe.py   (DIR: triton 3.7 or later, e.g. its wheel unpacked)

Runs on triton 3.7's Gluon and on 3.9's (where the cluster barrier after the barriers' init replaces
mbarrier.sync_cluster_init; 3.6 has no multicast). A ring of shared-memory slots filled by multicast needs both:
the copy into the peer's slot, and the peer's consumers releasing that slot to the issuing CTA's producer
(BENCHMARKS.md, GEMM).
"""
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

try:  # triton 3.9: the cluster's barrier publishes the barriers' init (3.7: sync_cluster_init)
    from triton.experimental.gluon.language.nvidia.hopper.cluster import barrier as cluster_init
except ImportError:
    cluster_init = mbarrier.sync_cluster_init
_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # the names of 3.9 or of 3.7
_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

SHARED = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2, cga_layout=[[0, 0]])


@gluon.jit
def multicast(a_desc, LAYOUT: gl.constexpr):
    bar = mbarrier.allocate_mbarrier()
    mbarrier.init(bar, count=1)
    cluster_init()
    smem = gl.allocate_shared_memory(gl.float8e4nv, [128, 128], LAYOUT)
    mbarrier.expect(bar, 128 * 128)
    _load(a_desc, [0, 0], bar, smem, multicast=True)
    mbarrier.wait(bar, 0)
    _store(a_desc, [0, 0], smem)
    tma.store_wait(0)


@gluon.jit
def arrive(out_ptr):
    bar = mbarrier.allocate_mbarrier(two_ctas=True)
    mbarrier.init(bar, count=2)
    cluster_init()
    mbarrier.arrive(bar)
    mbarrier.wait(bar, 0)


RING_STAGES = gl.constexpr(4)
A_HALVES = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2, cga_layout=[[1, 0]])  # rows
ACC = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32], cga_layout=[[1, 0]])
OUT = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0], cga_layout=[[1, 0]])


@gluon.jit
def _ring_producer(a_desc, b_desc, a_ring, b_ring, ready, a_free, b_free, K, STAGES: gl.constexpr):
    i = 0
    for k in range(0, K, 128):
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(a_free.index(s), phase ^ 1)
        mbarrier.wait(b_free.index(s), phase ^ 1)  # the pair's barrier: waited on in CTA 0 only
        mbarrier.expect(ready.index(s), 2 * 128 * 128)  # bytes a CTA: its half of A, the whole B
        _load(a_desc, [0, k], ready.index(s), a_ring.index(s))
        _load(b_desc, [0, k], ready.index(s), b_ring.index(s), multicast=True)
        i += 1


@gluon.jit
def _ring_consumer(a_ring, b_ring, ready, a_free, b_free, c_ptr, K, ACC_LAYOUT: gl.constexpr,
                   OUT_LAYOUT: gl.constexpr, STAGES: gl.constexpr):
    acc = gl.zeros([256, 128], gl.float32, ACC_LAYOUT)
    i = 0
    for k in range(0, K, 128):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        acc = warpgroup_mma(a_ring.index(s), b_ring.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(a_free.index(s))
        mbarrier.arrive(b_free.index(s))  # remote from CTA 1
        i += 1
    out = gl.convert_layout(acc, OUT_LAYOUT)
    rows = gl.arange(0, 256, layout=gl.SliceLayout(1, OUT_LAYOUT))
    cols = gl.arange(0, 128, layout=gl.SliceLayout(0, OUT_LAYOUT))
    gl.store(c_ptr + rows[:, None] * 128 + cols[None, :], out)


@gluon.jit
def ring(a_desc, b_desc, c_ptr, K, A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr, ACC_LAYOUT: gl.constexpr,
         OUT_LAYOUT: gl.constexpr):
    a_ring = gl.allocate_shared_memory(gl.float8e4nv, [RING_STAGES, 256, 128], A_LAYOUT)
    b_ring = gl.allocate_shared_memory(gl.float8e4nv, [RING_STAGES, 128, 128], B_LAYOUT)
    ready = mbarrier.allocate_mbarrier(batch=RING_STAGES)
    a_free = mbarrier.allocate_mbarrier(batch=RING_STAGES)
    b_free = mbarrier.allocate_mbarrier(batch=RING_STAGES, two_ctas=True)
    for s in gl.static_range(RING_STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(a_free.index(s), count=1)
        mbarrier.init(b_free.index(s), count=1)  # an arrival from each CTA (3.9 initialises it with 2)
    cluster_init()
    gl.warp_specialize([(_ring_consumer, (a_ring, b_ring, ready, a_free, b_free, c_ptr, K, ACC_LAYOUT, OUT_LAYOUT,
                                          RING_STAGES)),
                        (_ring_producer, (a_desc, b_desc, a_ring, b_ring, ready, a_free, b_free, K, RING_STAGES))],
                       [1], [24])


def ptx(fn, signature, constexprs) -> str:
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs={})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_ctas": 2}).asm["ptx"]


def ring_ptx() -> str:
    return ptx(ring, {"a_desc": f"tensordesc<fp8e4nv[256, 128],{A_HALVES!r}>",
                      "b_desc": f"tensordesc<fp8e4nv[128, 128],{SHARED!r}>", "c_ptr": "*fp32", "K": "i32",
                      "A_LAYOUT": "constexpr", "B_LAYOUT": "constexpr", "ACC_LAYOUT": "constexpr",
                      "OUT_LAYOUT": "constexpr"}, {(4,): A_HALVES, (5,): SHARED, (6,): ACC, (7,): OUT})


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, 2 CTAs a cluster")
    keys = ("cp.async.bulk.tensor", "ctarank", "mbarrier.arrive", "mbarrier.init", "mapa", "reqnctapercluster",
            "skipWait", "try_wait")
    probes = [("multicast", lambda: ptx(multicast, {"a_desc": f"tensordesc<fp8e4nv[128, 128],{SHARED!r}>",
                                                    "LAYOUT": "constexpr"}, {(1,): SHARED})),
              ("arrive", lambda: ptx(arrive, {"out_ptr": "*fp32"}, {}))]
    if tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 9):
        probes.append(("ring", ring_ptx))
    for name, make in probes:
        text = make()
        print(f"== {name}")
        for line in text.splitlines():
            if any(k in line for k in keys):
                print("   ", line.strip()[:150])
        if name == "ring":
            print("    wgmma.mma_async:", text.count("wgmma.mma_async"), "(a CTA's 128 x 128 x 128 block: 2 x 4)")


if __name__ == "__main__":
    main()
