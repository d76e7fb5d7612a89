"""Triton kernels for decode-size (M <= 8 tokens) NVFP4 GEMV and MoE on Hopper, reading vLLM's Marlin layout.

On Hopper vLLM runs NVFP4 weight-only through Marlin, which reaches a fraction of HBM bandwidth at 1-8 tokens.
These kernels read the very tensors Marlin holds after vLLM's repack (no second copy of the weights):
- `marlin_layout`: codec tensors -> Marlin tensors exactly as vLLM builds them, and back to true weights;
- `gemv`: `marlin_nvfp4_gemv`, a dense linear;
- `moe`: `marlin_nvfp4_moe`, gate/up + GeGLU + down + the weighted sum over the routed experts;
- `reference`: the same in plain torch, the correctness oracle.
"""
