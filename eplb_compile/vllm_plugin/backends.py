"""Which vLLM prepare/finalize backends count tokens exactly per local expert.

The count path adds a backend's ``expert_tokens_meta.expert_num_tokens`` to
``load[start:start + num_local]``. That equals what the topk path would count
only if the counts are per local *physical* expert, not rounded up, exclude
padded rows (the plugin maps those to -1, so no backend dispatches them), and
are produced on every forward. This module answers that per backend class, as
a capability method on vLLM's ``FusedMoEPrepareAndFinalize`` (default False).
"""

from __future__ import annotations

import torch

from eplb_compile.vllm_plugin import vllm_surface

CAPABILITY = "supports_exact_expert_num_tokens"


def _capability(fn):
    setattr(fn, vllm_surface.MARK, True)
    return fn


@_capability
def never(self) -> bool:
    return False


@_capability
def always(self) -> bool:
    return True


@_capability
def without_round_robin_remap(self) -> bool:
    # Round-robin placement renumbers experts for dispatch, so the local slots
    # would not be the slice [start, start + num_local). EPLB forces linear
    # placement, where this table is None.
    return self.global_to_physical is None


@_capability
def deepep_ht_exact(self) -> bool:
    # The counts come from a host list copied to the device, which a CUDA
    # graph would replay frozen; DeepEP rounds them up to expert_alignment.
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return vllm_surface.deepep_ht_expert_alignment() == 1 and not capturing


# (module under fused_moe/prepare_finalize, class) -> capability. Others keep
# the default, False: Mori returns one total per rank, MoonEP sends invalid and
# capacity-padding rows to expert 0, and DeepEP v2's decode path, allgather /
# reduce-scatter, no-EP, FlashInfer and pass-through provide no counts.
EXACT_COUNT_BACKENDS = {
    ("batched", "BatchedPrepareAndFinalize"): always,
    ("deepep_ll", "DeepEPLLPrepareAndFinalize"): without_round_robin_remap,
    ("nixl_ep", "NixlEPPrepareAndFinalize"): without_round_robin_remap,
    ("deepep_ht", "DeepEPHTPrepareAndFinalize"): deepep_ht_exact,
}


def install() -> None:
    vllm_surface.install_capability(CAPABILITY, never, EXACT_COUNT_BACKENDS)


def has_exact_counts(impl) -> bool:
    """Whether a modular kernel (or None) will hand over exact counts."""
    return impl is not None and getattr(impl.prepare_finalize, CAPABILITY)()
