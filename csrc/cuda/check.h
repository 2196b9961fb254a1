// One home for the checking macros of the CUDA backend's host code (the same on the SIMT target,
// whose runtime returns CUDA-style error codes).
#pragma once

#include <stdexcept>
#include <string>

#include "port.h"

// Every CUDA runtime call goes through this: a failure throws, naming the call and the place.
#define DISPATCH_CUDA_CHECK(expr)                                                                      \
  do {                                                                                                 \
    const cudaError_t status_ = (expr);                                                                \
    if (status_ != cudaSuccess) {                                                                      \
      throw std::runtime_error(std::string("CUDA error at " __FILE__ ":") + std::to_string(__LINE__) + \
                               ": " #expr ": " + cudaGetErrorString(status_));                         \
    }                                                                                                  \
  } while (0)

// A launcher's precondition on its arguments: std::invalid_argument (ValueError in Python).
#define DISPATCH_CHECK_ARG(condition, message)                                  \
  do {                                                                          \
    if (!(condition)) throw std::invalid_argument(std::string(message));        \
  } while (0)
