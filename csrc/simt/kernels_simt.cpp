// The CUDA backend's kernel files, compiled as C++ against the SIMT runtime (one translation unit:
// g++ does not know the .cu suffix). setup.py builds it into dispatch._simt; the kernel tests of
// tests/simt build it again with ThreadSanitizer and with the known-bad variants.
#include "../cuda/intranode_combine.cu"
#include "../cuda/intranode_dispatch.cu"
#include "../cuda/layout.cu"
#include "../cuda/notify.cu"
#include "../cuda/rail_combine.cu"
#include "../cuda/rail_dispatch.cu"
#include "../cuda/runtime.cu"
