"""PyTorch mirror of the Long-VITA model for NPU (torch_npu) and GPU, sharing configs and
checkpoints with vita_jax. `torch_npu` is only imported behind a guard (see device.py)."""
