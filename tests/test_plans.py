"""Launch plans (kernels/plans.py): a call's kernels recorded once for its key and replayed, through the Triton
backend (interpreted on CPU tensors; compiled, replayed through Triton's launcher, on a GPU). Each replay must give
the reference's bits on fresh inputs, follow its own tensors (inputs, outputs, explicit scales, scratch) and never
replay a body that does more than launch kernels on them."""
import math

import pytest
import torch
import triton
import triton.language as tl

from quantd.kernels import plans, reference, triton_quantize
from quantd.kernels.spec import QuantizedTensor, QuantSpec
from quantd.kernels.triton_dequantize import dequantize
from triton_cases import (DTYPES, all_specs, assert_same_qt, assert_same_values, random_input, reference_quantize,
                          to_device)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SPECS = [QuantSpec(), QuantSpec(granularity="tile", tile=(128, 128)), QuantSpec(granularity="tensor"),
         QuantSpec(format="int8_sym", granularity="channel", axis=0), QuantSpec(format="int8_asym"),
         QuantSpec(format="fp8_e5m2", granularity="flat", block_size=100), QuantSpec(format="mxfp4"),
         QuantSpec(format="mxfp8"), QuantSpec(format="nvfp4")]


@pytest.fixture(autouse=True)
def fresh_plans():
    plans.clear()
    plans.counts.clear()
    yield
    plans.clear()


def outcomes(fn):
    """fn's result and planned()'s outcomes while it ran."""
    before = plans.counts.copy()
    result = fn()
    return result, dict(plans.counts - before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_replays_give_the_reference(spec, device, rng):
    shape = (40, 200)
    for call in range(3):
        x = random_input(shape, torch.bfloat16, rng, edge_cases=call == 2).to(device)
        qt, how = outcomes(lambda: triton_quantize.quantize(x, spec))
        assert how == {"recorded" if call == 0 else "replayed": 1}
        want = reference_quantize(x, spec)
        assert_same_qt(to_device(qt, "cpu"), want)
        values, how = outcomes(lambda: dequantize(qt, torch.float32))
        assert how == {"recorded" if call == 0 else "replayed": 1}
        assert_same_values(values.cpu(), reference.dequantize(want, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", range(len(all_specs())), ids=[name for name, _ in all_specs()])
def test_every_spec_replays_on_ragged_strided_views(n, device, rng):
    """Every format x granularity x scale encoding, in each input dtype: a strided view of ragged shape, recorded
    on one input and replayed on a fresh one."""
    name, spec = all_specs()[n]
    dtype = DTYPES[n % len(DTYPES)]
    for call in range(2):
        x = random_input((33, 203), dtype, rng).to(device)[:, 3:]
        qt, how = outcomes(lambda: triton_quantize.quantize(x, spec))
        assert how == {"recorded" if call == 0 else "replayed": 1}, name
        assert_same_qt(to_device(qt, "cpu"), reference_quantize(x, spec))


@pytest.mark.parametrize("device", DEVICES)
def test_views_with_other_strides_or_alignment_get_their_own_plans(device, rng):
    spec = QuantSpec(format="nvfp4")
    base = random_input((24, 98), torch.bfloat16, rng).to(device)
    for x in (base[:, :96], base[:, 2:], base[:, 1:97], base.T[:96], base[:, :96]):
        assert_same_qt(to_device(triton_quantize.quantize(x, spec), "cpu"), reference_quantize(x, spec))
    assert plans.counts == {"recorded": 4, "replayed": 1}


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_scales_amax_and_outputs_follow_each_call(device, rng):
    spec = QuantSpec(granularity="tensor")
    out = triton_quantize.quantize(torch.ones(16, 64, device=device), spec)
    for call in range(3):
        x = random_input((16, 64), torch.float32, rng, edge_cases=False).to(device) * (call + 1)
        scale = torch.tensor(0.01 * (call + 1))
        (qt, amax), how = outcomes(lambda: triton_quantize.quantize_with_amax(x, spec, scale, out=out))
        assert qt is out and how == {"recorded" if call == 0 else "replayed": 1}
        assert_same_qt(to_device(qt, "cpu"), reference_quantize(x, spec, scale))
        assert amax.item() == reference.amax(x.cpu()).item()
    nv = QuantSpec(format="nvfp4")
    for scale in (100.0, 3.0):
        x = random_input((8, 64), torch.bfloat16, rng, edge_cases=False).to(device)
        got = triton_quantize.quantize(x, nv, torch.tensor(scale))
        assert_same_qt(to_device(got, "cpu"), reference_quantize(x, nv, torch.tensor(scale)))


def test_zero_points_in_another_layout_are_copied_unplanned(rng):
    """INT8 asym zero points laid out unlike their scales are copied into the scales' layout first: a torch
    operation outside the kernel, so that key runs unplanned, and still gives the reference's values."""
    spec = QuantSpec(format="int8_asym", group_size=32)
    x = random_input((6, 64), torch.float32, rng)
    qt = triton_quantize.quantize(x, spec)
    moved = type(qt).from_stored({**qt.stored(), "zero_points": qt.zero_points.T.contiguous().T}, spec, qt.shape)
    for call in range(2):
        values, how = outcomes(lambda: dequantize(moved, torch.float32))
        assert how == {"recorded" if call == 0 else "ran": 1}
        assert_same_values(values, reference.dequantize(reference_quantize(x, spec), torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_dual_layout_replays(device, rng):
    spec = QuantSpec()
    for call in range(2):
        x = random_input((130, 256), torch.bfloat16, rng).to(device)
        (rows, cols), how = outcomes(lambda: triton_quantize.quantize_dual(x, spec))
        assert how == {"recorded" if call == 0 else "replayed": 1}
        assert_same_qt(to_device(rows, "cpu"), reference_quantize(x, spec))
        assert_same_qt(to_device(cols, "cpu"), reference_quantize(x.T.contiguous(), spec))


def test_a_body_that_computes_outside_kernels_runs_every_time():
    """A torch operation that is not a view or an allocation (here a copy) keeps a key from replaying: its body
    runs at each call, and its results follow each call's tensors."""
    src, dst = torch.arange(4.0), torch.zeros(4)
    for call in range(3):
        src += 1
        how = plans.planned(("copy",), [src, dst], src.device, lambda: dst.copy_(src))
        assert how == ("recorded" if call == 0 else "ran")
        assert torch.equal(dst, src)


def test_plans_off(monkeypatch, rng):
    monkeypatch.setenv("QUANTD_PLANS", "0")
    x = random_input((8, 128), torch.bfloat16, rng)
    for _ in range(2):
        assert_same_qt(triton_quantize.quantize(x, QuantSpec()), reference_quantize(x, QuantSpec()))
    assert plans.counts == {"ran": 2}


def test_recording_watches_its_own_thread_only(rng):
    """While one thread records a plan, torch operations of another thread neither refuse it nor are disturbed."""
    import threading
    stop, spun = threading.Event(), [0]

    def busy():
        t = torch.zeros(64)
        while not stop.is_set():
            t.add_(1)
            spun[0] += 1
    other = threading.Thread(target=busy)
    other.start()
    try:
        spec = QuantSpec(granularity="tensor")
        for call in range(2):
            x = random_input((16, 256), torch.bfloat16, rng)
            qt, how = outcomes(lambda: triton_quantize.quantize(x, spec))
            assert how == {"recorded" if call == 0 else "replayed": 1}
            assert_same_qt(qt, reference_quantize(x, spec))
    finally:
        stop.set()
        other.join()
    assert spun[0] > 0


def test_an_unhashable_config_runs_unplanned(rng):
    import dataclasses
    from quantd.kernels.config import DEFAULT
    config = dataclasses.replace(DEFAULT, nvfp4_launch=[1, 64, 1])  # a list: the key cannot be hashed
    x = random_input((8, 64), torch.bfloat16, rng)
    for _ in range(2):
        qt, how = outcomes(lambda: triton_quantize.quantize(x, QuantSpec(format="nvfp4"), config=config))
        assert how == {"ran": 1}
        assert_same_qt(qt, reference_quantize(x, QuantSpec(format="nvfp4")))


@triton.jit
def _add(x_ptr, n, amount, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + amount, mask=i < n)


@triton.jit
def _add_through(desc, amount, BLOCK: tl.constexpr):
    desc.store([0], desc.load([0]) + amount)


def test_descriptor_arguments_replay_over_each_calls_tensors():
    """A tensor argument replays as its offset, numbers as they were, and a TMA descriptor (which holds the address of
    this call's tensor) as its base's offset, rebuilt over each call's tensors; a descriptor over memory outside the
    call's tensors refuses the plan, so each call builds its own."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    x = torch.zeros(8)
    for call in range(2):
        how = plans.planned(("add",), [x], x.device, lambda: plans.launch(_add, (1,), x, 8, 2.0, BLOCK=8))
        assert how == ("recorded" if call == 0 else "replayed")
    assert torch.equal(x, torch.full((8,), 4.0))
    for call in range(2):
        y = torch.zeros(16)  # a fresh tensor each call: a kept descriptor would write the first one's memory
        how = plans.planned(("through",), [y], y.device,
                            lambda: plans.launch(_add_through, (1,), TensorDescriptor.from_tensor(y[8:], [8]), 2.0,
                                                 BLOCK=8))
        assert how == ("recorded" if call == 0 else "replayed")
        assert torch.equal(y, torch.tensor([0.0] * 8 + [2.0] * 8))
    for call in range(2):
        y, outside = torch.zeros(8), torch.zeros(8)
        how = plans.planned(("outside",), [y], y.device,
                            lambda: plans.launch(_add_through, (1,), TensorDescriptor.from_tensor(outside, [8]), 2.0,
                                                 BLOCK=8))
        assert how == ("recorded" if call == 0 else "ran")
        assert torch.equal(outside, torch.full((8,), 2.0))


def test_outputs_carved_from_one_buffer_replay(rng):
    """Codes and scales that are views of one buffer (as the server's shared-memory outputs are) each follow their
    own view; the buffer moves between calls."""
    spec = QuantSpec()
    store = spec.storage((16, 256))
    for call in range(2):
        region = torch.full((1 << 16,), 7, dtype=torch.uint8)[call * 64:]  # another address (and buffer) each call
        at, tensors = 0, {}
        for name, shape, dtype in store.tensors():
            n = math.prod(shape) * dtype.itemsize
            tensors[name] = region[at:at + n].view(dtype).reshape(shape)
            at += -(-n // 64) * 64
        out = QuantizedTensor.from_stored(tensors, spec, (16, 256))
        x = random_input((16, 256), torch.bfloat16, rng)
        _, how = outcomes(lambda: triton_quantize.quantize(x, spec, out=out))
        assert how == {"recorded" if call == 0 else "replayed": 1}
        assert_same_qt(out, reference_quantize(x, spec))
