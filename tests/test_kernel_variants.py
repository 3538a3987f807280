"""Every CUDA variant of the topk path against the element-wise reference.

GPU-only. Each check draws fresh random inputs (invalid ids, replica counts
past the map's slots or past 2^32, huge map values), poisons the output, and
demands exact equality of the physical ids and of the load. Speed targets live
in the benchmark, never here.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel variants need a CUDA GPU")

if torch.cuda.is_available():
    import eplb_compile.ops  # noqa: F401 - registers torch.ops.eplb_compile
    from eplb_compile import kernels
    from eplb_compile.kernels import cuda_histogram
    from eplb_compile.reference import expected_map_and_record, map_and_record_reference
    from tests.cases import make_case, poison_allocator

    VARIANT_NAMES = list(cuda_histogram.VARIANTS)
else:
    VARIANT_NAMES = []

ID_DTYPES = [torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8]
POISON = 0x5B


def _random_inputs(seed, tokens, k, num_logical, slots, num_physical, id_dtype, rc_dtype, device="cuda"):
    """The suite's random case, plus the edges only these kernels special-case."""
    case = make_case(seed, tokens, k, num_logical, slots, num_physical, torch.int64, True, None, True)
    ids, l2p, replica_count = case.topk_ids, case.l2p, case.replica_count
    if id_dtype == torch.int64 and tokens:
        # vLLM reads ids as int32: these wrap to 2 and 5, both valid.
        ids[0, 0] = (1 << 32) + 2
        ids[-1, -1] = -(1 << 33) + 5
    if id_dtype == torch.uint8 and tokens and num_logical > 130:
        ids[0, -1] = 130  # above int8's range: must be read unsigned
    if num_logical >= 3:
        replica_count[2] = -2  # counts below 1 act as 1
        if rc_dtype == torch.int64:
            replica_count[1] = (1 << 32) + 7  # hash % count == hash: in the map only while hash < slots
    if num_logical and slots:
        l2p[0, 0] = (1 << 35) + 3  # huge: kept by int64 ids, wrapped by narrow ones, never recorded
    tensors = (ids.to(id_dtype), l2p, replica_count.to(rc_dtype), case.load)
    return [t.to(device) for t in tensors]


def _run(launch, ids, l2p, replica_count, load, record, num_unpadded):
    gate = torch.tensor(record, device=ids.device)
    unpadded = None if num_unpadded is None else torch.tensor(num_unpadded, dtype=torch.int32, device=ids.device)
    out = torch.full(ids.shape, POISON, dtype=ids.dtype, device=ids.device)
    got_load = load.clone()
    launch(ids, l2p, replica_count, got_load, gate, unpadded, out)
    torch.cuda.synchronize()
    return out, got_load


def _check(launch, seed, tokens, k=8, num_logical=40, slots=4, num_physical=60, id_dtype=torch.int32,
           rc_dtype=torch.int64, record=True, num_unpadded=None):
    ids, l2p, replica_count, load = _random_inputs(seed, tokens, k, num_logical, slots, num_physical, id_dtype, rc_dtype)
    want_ids, want_load = expected_map_and_record(ids, l2p, replica_count, load, record, num_unpadded)
    got_ids, got_load = _run(launch, ids, l2p, replica_count, load, record, num_unpadded)
    assert torch.equal(got_ids.cpu(), want_ids), "physical ids differ from the reference"
    assert torch.equal(got_load.cpu(), want_load), "load differs from the reference"


def _strict(name):
    variant = cuda_histogram.VARIANTS[name]
    return lambda *args: variant(*args, fallback=False)


def _seed(*parts) -> int:
    """A stable seed per test case (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_variant_matches_reference(name, id_dtype):
    for tokens in (1, 3, 37, 700):
        for rc_dtype in (torch.int32, torch.int64):
            # 200 logical experts: uint8 ids above 127 are valid and must read unsigned.
            _check(_strict(name), _seed(name, id_dtype, tokens, rc_dtype), tokens, num_logical=200,
                   id_dtype=id_dtype, rc_dtype=rc_dtype)


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("record", [True, False])
@pytest.mark.parametrize("num_unpadded", [None, 0, -1, 5, 40, 10_000])
def test_variant_gate_and_padding(name, record, num_unpadded):
    _check(_strict(name), _seed(name, record, num_unpadded), 41, record=record, num_unpadded=num_unpadded)


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("k", [1, 6])
def test_variant_other_k(name, k):
    _check(_strict(name), _seed(name, k), 333, k=k, num_unpadded=300)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_large_grid_stride(name):
    """More elements than one pass of a capped grid: blocks loop over chunks."""
    num_sms, _ = cuda_histogram._device_limits(torch.cuda.current_device())
    tokens = 3 * num_sms * 1024 * cuda_histogram.ELEMENTS_PER_THREAD // 8 + 13
    _check(_strict(name), _seed(name), tokens, num_logical=256, slots=8, num_physical=288,
           num_unpadded=tokens - 1000)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_strided_tables(name):
    """Non-contiguous map and replica counts are read through their strides."""
    ids, l2p, replica_count, load = _random_inputs(_seed(name), 300, 8, 40, 6, 60, torch.int32, torch.int64)
    l2p_t = l2p.t().contiguous().t()  # column-major [40, 6]
    counts = torch.stack([replica_count, replica_count]).t().reshape(-1)[::2]  # stride 2
    assert not l2p_t.is_contiguous() and counts.stride(0) == 2
    want_ids, want_load = expected_map_and_record(ids, l2p_t, counts, load, True, 250)
    got_ids, got_load = _run(_strict(name), ids, l2p_t, counts, load, True, 250)
    assert torch.equal(got_ids.cpu(), want_ids)
    assert torch.equal(got_load.cpu(), want_load)


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
    l2p, counts = l2p.cuda(), counts.cuda()
    want_ids, want_load = expected_map_and_record(ids, l2p, counts, load, True, 500)
    got_ids, got_load = _run(_strict(name), ids, l2p, counts, load, True, 500)
    assert torch.equal(got_ids.cpu(), want_ids)
    assert torch.equal(got_load.cpu(), want_load)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_empty(name):
    ids = torch.empty(0, 8, dtype=torch.int32, device="cuda")
    l2p = torch.zeros(4, 2, dtype=torch.int64, device="cuda")
    replica_count = torch.ones(4, dtype=torch.int64, device="cuda")
    load = torch.arange(5, dtype=torch.int32, device="cuda")
    out = torch.empty_like(ids)
    cuda_histogram.VARIANTS[name](ids, l2p, replica_count, load, torch.tensor(True, device="cuda"), None, out,
                                  fallback=False)
    torch.cuda.synchronize()
    assert torch.equal(load.cpu(), torch.arange(5, dtype=torch.int32))


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_non_contiguous_ids_fall_back(name):
    ids, l2p, replica_count, load = _random_inputs(_seed(name), 50, 16, 40, 4, 60, torch.int32, torch.int64)
    strided = ids[:, ::2]  # [50, 8], not contiguous
    with pytest.raises(ValueError):
        _run(_strict(name), strided, l2p, replica_count, load, True, None)
    want_ids, want_load = expected_map_and_record(strided, l2p, replica_count, load, True, 30)
    got_ids, got_load = _run(cuda_histogram.VARIANTS[name], strided, l2p, replica_count, load, True, 30)
    assert torch.equal(got_ids.cpu(), want_ids)
    assert torch.equal(got_load.cpu(), want_load)


def _physical_for_smem(extra_bytes):
    """A physical-expert count whose histogram leaves ``extra_bytes`` of the opt-in limit (256 logical)."""
    _, limit = cuda_histogram._device_limits(torch.cuda.current_device())
    return (limit - 16 * 256 - extra_bytes) // 4


SMEM_NAMES = [n for n in VARIANT_NAMES if n in cuda_histogram.SMEM_VARIANTS]
HIST_NAMES = [n for n in VARIANT_NAMES if n in cuda_histogram.HIST_VARIANTS]


@pytest.mark.parametrize("name", SMEM_NAMES)
def test_smem_drops_map_cache_when_tight(name):
    """Histogram fits, histogram + map columns do not: the uncached kernel runs, still exact."""
    num_physical = _physical_for_smem(16)
    columns = cuda_histogram.SMEM_VARIANTS[name].map_columns
    _, limit = cuda_histogram._device_limits(torch.cuda.current_device())
    assert columns == 0 or cuda_histogram.smem_bytes(256, num_physical, columns) > limit
    _check(_strict(name), _seed(name), 300, num_logical=256, slots=6, num_physical=num_physical)


def _assert_refuses_then_falls_back(name: str, num_physical: int) -> None:
    """Strict, the variant refuses a histogram too large for shared memory; by
    default the same call runs the Triton kernel and is exact."""
    ids, l2p, replica_count, load = _random_inputs(_seed(name), 200, 8, 256, 4, num_physical, torch.int32,
                                                   torch.int64)
    with pytest.raises(ValueError):
        _run(_strict(name), ids, l2p, replica_count, load, True, None)
    want_ids, want_load = expected_map_and_record(ids, l2p, replica_count, load, True, None)
    got_ids, got_load = _run(cuda_histogram.VARIANTS[name], ids, l2p, replica_count, load, True, None)
    assert torch.equal(got_ids.cpu(), want_ids)
    assert torch.equal(got_load.cpu(), want_load)


@pytest.mark.parametrize("name", SMEM_NAMES)
def test_smem_falls_back_when_histogram_does_not_fit(name):
    _assert_refuses_then_falls_back(name, _physical_for_smem(-64))


@pytest.mark.parametrize("name", HIST_NAMES)
def test_hist_fits_and_falls_back(name):
    """The unstaged kernel needs only the histogram in shared memory: exact up to the limit, Triton past it."""
    _, limit = cuda_histogram._device_limits(torch.cuda.current_device())
    _check(_strict(name), _seed(name, "fits"), 300, num_logical=256, slots=6, num_physical=limit // 4)
    _assert_refuses_then_falls_back(name, limit // 4 + 1)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_in_cuda_graph_honours_gate_on_replay(name):
    """Gate and padding are read on the device: toggling them needs no re-capture."""
    ids, l2p, replica_count, load = _random_inputs(_seed(name), 257, 8, 40, 4, 60, torch.int32, torch.int64)
    gate = torch.tensor(True, device="cuda")
    unpadded = torch.tensor(200, dtype=torch.int32, device="cuda")
    out = torch.full_like(ids, POISON)
    variant = cuda_histogram.VARIANTS[name]
    variant(ids, l2p, replica_count, load.clone(), gate, unpadded, out, fallback=False)  # build before capture
    graph_load = load.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        variant(ids, l2p, replica_count, graph_load, gate, unpadded, out, fallback=False)
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


@pytest.mark.parametrize("plan_variant", ["triton", *VARIANT_NAMES])
def test_dispatcher_through_the_operator(monkeypatch, plan_variant):
    """The operator's eager CUDA path runs whichever variant TOPK_PLAN names."""
    monkeypatch.setattr(kernels, "TOPK_PLAN", ((0, "triton"), (64, plan_variant)))

    def through_op(ids, l2p, replica_count, load, gate, unpadded, out):
        poison_allocator("cuda", ids.numel())  # the op's own output starts as poison
        out.copy_(torch.ops.eplb_compile.map_and_record(ids, l2p, replica_count, load, gate, unpadded))

    for tokens in (3, 100):  # 24 elements: Triton; 800: the variant
        _check(through_op, _seed(plan_variant, tokens), tokens, num_unpadded=tokens - 1)
    assert kernels._cuda_failure is None, f"the CUDA kernels failed to build: {kernels._cuda_failure}"


def test_topk_plan_picks_by_numel(monkeypatch):
    monkeypatch.setattr(kernels, "TOPK_PLAN", ((0, "triton"), (128, "direct"), (4096, "smem")))
    assert [kernels.topk_variant(n) for n in (0, 127, 128, 4095, 4096, 10**7)] == [
        "triton", "triton", "direct", "direct", "smem", "smem"
    ]
