"""Every CUDA variant of the topk path against the reference, and the chooser.

GPU-only. Each check draws fresh random inputs (invalid ids, replica counts
past the map's slots or past 2^32, huge map values), poisons the output, and
demands exact equality of the physical ids and of the load. Speed targets live
in the benchmark, never here.
"""

from __future__ import annotations

import random
import warnings
import zlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel variants need a CUDA GPU")

if torch.cuda.is_available():
    import eplb_compile.ops  # noqa: F401 - registers torch.ops.eplb_compile
    from eplb_compile.kernels import chooser, cuda_variants, nvrtc, plans, reload_plans
    from eplb_compile.kernels.call import KernelCall
    from eplb_compile.kernels.triton_kernels import launch_map
    from eplb_compile.reference import expected_map_and_record, map_and_record_reference, map_only_reference
    from tests.cases import make_case
    from tests.guards import POISON, poison_allocator

    VARIANT_NAMES = list(cuda_variants.VARIANTS)
    HIST_NAMES = [n for n, v in cuda_variants.VARIANTS.items() if v.histogram]
else:
    VARIANT_NAMES = HIST_NAMES = []

ID_DTYPES = [torch.int32, torch.int64, torch.int16, torch.int8]


def _random_inputs(seed, tokens, k, num_logical, slots, num_physical, id_dtype, rc_dtype, device="cuda"):
    """The suite's random case, plus the edges only these kernels special-case."""
    case = make_case(seed, tokens, k, num_logical, slots, num_physical, torch.int64, True, None, True)
    ids, l2p, replica_count = case.topk_ids, case.l2p, case.replica_count
    if id_dtype == torch.int64 and tokens:
        # vLLM reads ids as int32: these wrap to 2 and 5, both valid.
        ids[0, 0] = (1 << 32) + 2
        ids[-1, -1] = -(1 << 33) + 5
    if num_logical >= 3:
        replica_count[2] = -2  # counts below 1 act as 1
        if rc_dtype == torch.int64:
            replica_count[1] = (1 << 32) + 7  # hash % count == hash: in the map only while hash < slots
    if num_logical and slots:
        l2p[0, 0] = (1 << 35) + 3  # huge: kept by int64 ids, wrapped by narrow ones, never recorded
    tensors = (ids.to(id_dtype), l2p, replica_count.to(rc_dtype), case.load)
    return [t.to(device) for t in tensors]


def _run(launch, ids, l2p, replica_count, load, record, num_unpadded):
    """``launch(KernelCall)`` on fresh out and load; returns (out, load)."""
    gate = torch.tensor(record, device=ids.device)
    unpadded = None if num_unpadded is None else torch.tensor(num_unpadded, dtype=torch.int32, device=ids.device)
    out = torch.full(ids.shape, POISON, dtype=ids.dtype, device=ids.device)
    got_load = load.clone()
    launch(KernelCall(ids, l2p, replica_count, out, got_load, gate, unpadded))
    torch.cuda.synchronize()
    return out, got_load


def _assert_exact(launch, ids, l2p, replica_count, load, record, num_unpadded):
    want_ids, want_load = expected_map_and_record(ids, l2p, replica_count, load, record, num_unpadded)
    got_ids, got_load = _run(launch, ids, l2p, replica_count, load, record, num_unpadded)
    assert torch.equal(got_ids.cpu(), want_ids), "physical ids differ from the reference"
    assert torch.equal(got_load.cpu(), want_load), "load differs from the reference"


def _check(launch, seed, tokens, k=8, num_logical=40, slots=4, num_physical=60, id_dtype=torch.int32,
           rc_dtype=torch.int64, record=True, num_unpadded=None):
    ids, l2p, replica_count, load = _random_inputs(seed, tokens, k, num_logical, slots, num_physical, id_dtype, rc_dtype)
    _assert_exact(launch, ids, l2p, replica_count, load, record, num_unpadded)


def _strict(name):
    return cuda_variants.VARIANTS[name].launch


def _seed(*parts) -> int:
    """A stable seed per test case (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_variant_matches_reference(name, id_dtype):
    for tokens in (1, 3, 37, 700):
        for rc_dtype in (torch.int32, torch.int64):
            _check(_strict(name), _seed(name, id_dtype, tokens, rc_dtype), tokens, num_logical=100,
                   id_dtype=id_dtype, rc_dtype=rc_dtype)


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("record", [True, False])
@pytest.mark.parametrize("num_unpadded", [None, 0, -1, 5, 40, 10_000])
def test_variant_gate_and_padding(name, record, num_unpadded):
    _check(_strict(name), _seed(name, record, num_unpadded), 41, record=record, num_unpadded=num_unpadded)


@pytest.mark.parametrize("num_unpadded", [None, 0, -1, 5, 40, 10_000])
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_direct_map_only_padding(num_unpadded, id_dtype):
    """The map_only call (no load, no gate): padded rows come back -1, in one kernel."""
    ids, l2p, replica_count, _ = _random_inputs(_seed(num_unpadded, id_dtype), 41, 8, 40, 4, 60, id_dtype,
                                                torch.int64)
    unpadded = None if num_unpadded is None else torch.tensor(num_unpadded, dtype=torch.int32, device="cuda")
    for launch in (cuda_variants.VARIANTS["direct"].launch, launch_map):
        out = torch.full(ids.shape, POISON, dtype=ids.dtype, device="cuda")
        launch(KernelCall(ids, l2p, replica_count, out, num_unpadded=unpadded))
        want = map_only_reference(ids.cpu(), l2p.cpu(), replica_count.cpu(), num_unpadded)
        assert torch.equal(out.cpu(), want), launch


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("k", [1, 6])
def test_variant_other_k(name, k):
    _check(_strict(name), _seed(name, k), 333, k=k, num_unpadded=300)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_large_grid_stride(name):
    """More elements than one pass of a capped grid: blocks loop over chunks."""
    num_sms, _ = nvrtc.device_limits(torch.cuda.current_device())
    tokens = 3 * num_sms * 1024 * 4 // 8 + 13
    _check(_strict(name), _seed(name), tokens, num_logical=256, slots=8, num_physical=288,
           num_unpadded=tokens - 1000)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_strided_tables(name):
    """Non-contiguous map and replica counts are read through their strides."""
    ids, l2p, replica_count, load = _random_inputs(_seed(name), 300, 8, 40, 6, 60, torch.int32, torch.int64)
    l2p_t = l2p.t().contiguous().t()  # column-major [40, 6]
    counts = torch.stack([replica_count, replica_count]).t().reshape(-1)[::2]  # stride 2
    assert not l2p_t.is_contiguous() and counts.stride(0) == 2
    _assert_exact(_strict(name), ids, l2p_t, counts, load, True, 250)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_vllm_shaped_map(name):
    """vLLM's own map shape: [256, 1024] int64 padded with -1, int64 counts, 288 physical."""
    rng = random.Random(_seed(name))
    ids, _, _, load = _random_inputs(_seed(name), 513, 8, 256, 1, 288, torch.int32, torch.int64)
    l2p = torch.full((256, 1024), -1, dtype=torch.int64)
    counts = torch.ones(256, dtype=torch.int64)
    for extra in rng.sample(range(256), 32):
        counts[extra] += 1
    physical = torch.randperm(288, generator=torch.Generator().manual_seed(_seed(name))).tolist()
    for e in range(256):
        for r in range(int(counts[e])):
            l2p[e, r] = physical.pop()
    _assert_exact(_strict(name), ids, l2p.cuda(), counts.cuda(), load, True, 500)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_empty(name):
    ids = torch.empty(0, 8, dtype=torch.int32, device="cuda")
    load = torch.arange(5, dtype=torch.int32, device="cuda")
    _run(_strict(name), ids, torch.zeros(4, 2, dtype=torch.int64, device="cuda"),
         torch.ones(4, dtype=torch.int64, device="cuda"), load, True, None)
    assert torch.equal(load.cpu(), torch.arange(5, dtype=torch.int32))


def _assert_refused_then_chosen_around(name, ids, l2p, replica_count, load):
    """The variant refuses (ValueError, nothing launched); Triton, which the chooser falls to, is exact."""
    with pytest.raises(ValueError):
        _run(_strict(name), ids, l2p, replica_count, load, True, 30)
    call = KernelCall(ids, l2p, replica_count, torch.empty_like(ids), load.clone(), torch.tensor(True, device="cuda"))
    assert not cuda_variants.VARIANTS[name].supports(call)
    _assert_exact(launch_map, ids, l2p, replica_count, load, True, 30)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_refuses_non_contiguous_ids(name):
    ids, l2p, replica_count, load = _random_inputs(_seed(name), 50, 16, 40, 4, 60, torch.int32, torch.int64)
    _assert_refused_then_chosen_around(name, ids[:, ::2], l2p, replica_count, load)
    call = KernelCall(ids[:, ::2], l2p, replica_count, torch.empty(50, 8, dtype=ids.dtype, device="cuda"), load,
                      torch.tensor(True, device="cuda"))
    assert chooser.choose(call).launch is launch_map  # no CUDA variant takes strided ids


@pytest.mark.parametrize("name", HIST_NAMES)
def test_hist_fits_and_refuses(name):
    """The histogram kernels need num_physical ints of shared memory: exact up to the limit, refused past it."""
    _, limit = nvrtc.device_limits(torch.cuda.current_device())
    _check(_strict(name), _seed(name, "fits"), 300, num_logical=256, slots=6, num_physical=limit // 4)
    ids, l2p, replica_count, load = _random_inputs(_seed(name), 200, 8, 256, 4, limit // 4 + 1, torch.int32,
                                                   torch.int64)
    _assert_refused_then_chosen_around(name, ids, l2p, replica_count, load)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_in_cuda_graph_honours_gate_on_replay(name):
    """Gate and padding are read on the device: toggling them needs no re-capture."""
    ids, l2p, replica_count, load = _random_inputs(_seed(name), 257, 8, 40, 4, 60, torch.int32, torch.int64)
    gate = torch.tensor(True, device="cuda")
    unpadded = torch.tensor(200, dtype=torch.int32, device="cuda")
    out = torch.full_like(ids, POISON)
    graph_load = load.clone()
    call = KernelCall(ids, l2p, replica_count, out, graph_load, gate, unpadded)
    _strict(name)(call)  # build before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _strict(name)(call)
    graph_load.copy_(load)
    expected_load = load.cpu()
    for record, tokens in ((True, 200), (False, 200), (True, 57), (True, 0)):
        gate.fill_(record)
        unpadded.fill_(tokens)
        out.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        want_ids, expected_load = map_and_record_reference(
            ids.cpu(), l2p.cpu(), replica_count.cpu(), expected_load, record, tokens
        )
        assert torch.equal(out.cpu(), want_ids)
        assert torch.equal(graph_load.cpu(), expected_load)


@pytest.fixture
def plan_file(tmp_path, monkeypatch):
    """Write a plan file, point EPLB_COMPILE_KERNEL_PLAN at it, forget cached plans."""
    def write(rows):
        path = tmp_path / "plan.json"
        path.write_text(plans_json(rows))
        monkeypatch.setenv(plans.PLAN_ENV, str(path))
        reload_plans()

    yield write
    monkeypatch.delenv(plans.PLAN_ENV, raising=False)
    reload_plans()


def plans_json(rows) -> str:
    import json

    return json.dumps({"format": 1, "device_name": "test", "topk_plan": rows, "count_path_min_tokens": 1,
                       "measured_with": {"note": "test"}})


@pytest.mark.parametrize("plan_variant", ["triton", *VARIANT_NAMES])
def test_chooser_through_the_operator(plan_file, plan_variant):
    """The operator's eager CUDA path runs whichever variant the plan names."""
    plan_file([[0, "triton"], [64, plan_variant]])

    def through_op(call):
        assert chooser.variant_name(call) == (plan_variant if call.ids.numel() >= 64 else "triton")
        poison_allocator("cuda", call.ids.numel())  # the op's own output starts as poison
        call.out.copy_(torch.ops.eplb_compile.map_and_record(call.ids, call.l2p, call.replica_count, call.load,
                                                             call.gate, call.num_unpadded))

    for tokens in (3, 100):  # 24 elements: Triton; 800: the variant
        _check(through_op, _seed(plan_variant, tokens), tokens, num_unpadded=tokens - 1)
    assert chooser.cuda_failure() is None, f"the CUDA kernels failed to build: {chooser.cuda_failure()}"


def test_shipped_plan_of_this_card():
    """The running card's plan loads, and names only live variants."""
    plan = plans.plan_for_device(torch.device("cuda"))
    assert {name for _, name in plan.topk_plan} <= {"triton", *VARIANT_NAMES}


def test_build_failure_latches_to_triton_and_torch(monkeypatch):
    """If NVRTC cannot build the kernels: one warning, then the topk path runs
    Triton and record_counts one torch op, both still exact."""

    def fail(*args, **kwargs):
        raise RuntimeError("compiling CUDA kernels with NVRTC failed: planted")

    monkeypatch.setattr(cuda_variants, "compiled_functions", fail)
    monkeypatch.setattr(cuda_variants, "count_function", fail)
    monkeypatch.setattr(chooser, "_cuda_failure", None)
    ids, l2p, replica_count, load = _random_inputs(_seed("latch"), 300, 8, 40, 4, 60, torch.int32, torch.int64)
    with pytest.warns(UserWarning, match="planted"):
        _assert_exact(chooser.choose(KernelCall(ids, l2p, replica_count, torch.empty_like(ids), load,
                                                torch.tensor(True, device="cuda"))).launch,
                      ids, l2p, replica_count, load, True, None)
    assert chooser.cuda_failure() is not None
    counts = torch.randint(0, 50, (12,), dtype=torch.int32, device="cuda")
    got = load.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # latched: no second warning
        choice = chooser.choose_counts(got.get_device())
        assert choice.kernel == "torch"
        choice.launch(got, counts, 7, torch.tensor(True, device="cuda"))
    want = load.clone()
    want[7:19] += counts
    assert torch.equal(got, want)
