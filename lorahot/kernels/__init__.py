"""The compute layer: operators, CUDA kernels and compiler passes the LoRA layers run through.

Each concept is a file; its Triton half, where it has one, is ``triton_<name>.py``, imported only
where Triton and CUDA exist (:mod:`~lorahot.kernels.triton_import`).

One adapter for the whole batch:

- :mod:`~lorahot.kernels.lora_linear`: the fused LoRA linear at decode sizes (base product, shrink,
  scale, expand and bias in one kernel);
- :mod:`~lorahot.kernels.wide_linear`: the wide linear above them, over ``[[W, s*B], [A, 0]]``;
- :mod:`~lorahot.kernels.wide_groups`: the wide layers that read one input, as one GEMM;
- :mod:`~lorahot.kernels.stacked_shrinks`, :mod:`~lorahot.kernels.extern_inputs`: compiler passes
  over inductor's graph (one shrink for layers sharing an input; no copy of an input a library
  call wrote), on :mod:`~lorahot.kernels.fx_graph`'s helpers;
- :mod:`~lorahot.kernels.compile_mode`: whether the graph being compiled replays CUDA graphs.

One adapter per row (mixed batches):

- :mod:`~lorahot.kernels.routed_linear`: the routed fused linear at decode sizes;
- :mod:`~lorahot.kernels.routed_lora`: the gather and segmented kernels after the base GEMM;
- :mod:`~lorahot.kernels.stacked_routed`: one routed shrink for layers sharing an input (off).

Runtime steps on the device:

- :mod:`~lorahot.kernels.row_scale`: scaled copies of many row blocks in one launch (the wide
  layers' ``s * B`` columns, a stack's per-row scales);
- :mod:`~lorahot.kernels.word_sums`: row and column sums of many weights in one launch (merged
  mode's record of what it wrote).

Launch machinery: :mod:`~lorahot.kernels.op_registry` (operators registered with the dispatcher),
:mod:`~lorahot.kernels.direct_launch` (Triton binaries launched without the JIT's binding),
:mod:`~lorahot.kernels.pdl` (early launches on sm90), :mod:`~lorahot.kernels.device_guard`.
"""
