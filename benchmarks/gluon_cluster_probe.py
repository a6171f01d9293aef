"""What the imported triton's Gluon gives a Hopper GEMM that would share operands across a cluster of two CTAs,
compiled for sm_90 on a machine without a GPU (no launch): prints the PTX of

  multicast  a TMA copy of a 128 x 128 FP8 tile into shared memory that both CTAs of the cluster hold
             (cga_layout [[0, 0]], multicast=True): the cp.async.bulk instruction and who issues it;
  arrive     an arrive on a barrier allocated for the CTA pair (allocate_mbarrier(two_ctas=True)): local
             (shared::cta) or remote (shared::cluster, to CTA 0 of the pair).

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
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

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


def ptx(fn, signature, constexprs) -> str:
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs={})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_ctas": 2}).asm["ptx"]


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, 2 CTAs a cluster")
    keys = ("cp.async.bulk.tensor", "ctarank", "mbarrier.arrive", "mbarrier.init", "mapa", "reqnctapercluster")
    for name, text in (
            ("multicast", ptx(multicast, {"a_desc": f"tensordesc<fp8e4nv[128, 128],{SHARED!r}>",
                                          "LAYOUT": "constexpr"}, {(1,): SHARED})),
            ("arrive", ptx(arrive, {"out_ptr": "*fp32"}, {}))):
        print(f"== {name}")
        for line in text.splitlines():
            if any(k in line for k in keys):
                print("   ", line.strip())


if __name__ == "__main__":
    main()
