"""The bench's device timing order: interleaved, and the lead passes round from repeat to repeat."""

from eplb_compile.bench.timing import rotations


def test_rotations_pass_the_lead_round_and_keep_every_name_once():
    orders = rotations(["none", "vllm", "ours"], 7)
    assert [order[0] for order in orders] == ["none", "vllm", "ours", "none", "vllm", "ours", "none"]
    assert all(sorted(order) == ["none", "ours", "vllm"] for order in orders)
    assert orders[1] == ["vllm", "ours", "none"]  # a rotation, not a shuffle: neighbours stay neighbours


def test_rotations_of_nothing_or_one():
    assert rotations([], 5) == []
    assert rotations(["only"], 3) == [["only"]] * 3
