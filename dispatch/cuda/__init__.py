"""CUDA backend (one node): staging buffers in device memory shared through CUDA IPC, SM-limited
dispatch/combine kernels (``csrc/cuda``), and a loopback mode for several ranks on one GPU."""
