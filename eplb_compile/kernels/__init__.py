"""GPU kernels of the eager CUDA path and the choice between them.

- ``call.py``: ``KernelCall``, the seven tensors of one call, by name, and
  ``TOPK_PARAMS``, the CUDA kernels' parameter order;
- ``plans.py`` + ``configs/``: the measured kernel plan of each card, as data;
- ``chooser.py``: ``choose(call)`` / ``choose_counts(device)``, the one place
  that decides which kernel runs (and the one failure latch); it only decides;
- ``triton_kernels.py``: the Triton topk kernel (also what torch.compile traces);
- ``cuda_variants.py`` + ``eplb_topk.cu``, ``eplb_counts.cu``: the CUDA kernels
  a plan can pick, and the count kernel with its launch;
- ``nvrtc.py``: compiling and launching CUDA source at run time (generic);
- ``eager_extension.py`` + ``eager_launch.cpp``: the C++ eager launcher, built
  in the background on first use, and its launch tables, which this module
  builds from the card's plan when the Python path has run a shape once.

Importing this package imports neither Triton nor CUDA: ``call``, ``plans``
and ``eager_extension`` are plain torch; ``chooser`` and ``triton_kernels``
need Triton and are imported by the operators only on CUDA.
"""


def reload_plans() -> None:
    """Re-read the kernel plans (after ``EPLB_COMPILE_KERNEL_PLAN`` changed): the
    chooser's plans and the C++ launcher's tables built from them alike."""
    from eplb_compile.kernels import chooser, eager_extension

    chooser.clear_cache()
    eager_extension.clear()
