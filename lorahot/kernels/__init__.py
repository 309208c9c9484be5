"""Fused kernels: :mod:`~lorahot.kernels.lora_linear` (the op and where it applies) and its
Triton implementation :mod:`~lorahot.kernels.triton_lora_linear` (imported only with CUDA)."""
