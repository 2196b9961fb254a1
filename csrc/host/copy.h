// Row copies into tensors the caller reads later: non-temporal stores skip the read-for-
// ownership of every destination line, which on a memory-bound host is a third of the traffic.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace dispatch::host {

inline void copy_row_streaming(void* dst, const void* src, size_t num_bytes) {
#if defined(__AVX2__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  size_t i = 0;
  if ((reinterpret_cast<uintptr_t>(d) & 31) == 0) {
    for (; i + 128 <= num_bytes; i += 128) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32));
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 64));
      const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 96));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), a);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32), b);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 64), c);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 96), e);
    }
  }
  std::memcpy(d + i, s + i, num_bytes - i);
#else
  std::memcpy(dst, src, num_bytes);
#endif
}

// Orders the streaming stores before whatever the caller publishes next.
inline void streaming_fence() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

}  // namespace dispatch::host
