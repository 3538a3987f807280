"""GPU kernels of the eager CUDA path and the choice between them.

- ``call.py``: ``KernelCall``, the seven tensors of one call, by name;
- ``plans.py`` + ``configs/``: the measured kernel plan of each card, as data;
- ``chooser.py``: ``choose(call) -> launcher``, the one place that decides
  (and ``record_counts``, the count kernel behind the same failure latch);
- ``triton_kernels.py``: the Triton topk kernel (also what torch.compile traces);
- ``cuda_variants.py`` + ``eplb_topk.cu``, ``eplb_counts.cu``: the CUDA kernels
  a plan can pick, and the count kernel;
- ``nvrtc.py``: compiling and launching CUDA source at run time (generic);
- ``eager_extension.py`` + ``eager_launch.cpp``: the C++ eager launcher, built
  in the background on first use, which runs an eager call in one C++ call
  once the chooser has handed it that shape's kernels.

Importing this package imports neither Triton nor CUDA: ``call`` and
``plans`` are plain torch; ``chooser`` and ``triton_kernels`` need Triton and
are imported by the operators only on CUDA.
"""
