// Error handling shared by the whole core: one exception type that carries a
// code, and the CUDA check macro that produces it. The bindings translate
// mpiep::Error into a Python RuntimeError (TimeoutError for kTimeout).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace mpiep {

enum class ErrorCode : int {
  kOk = 0,
  kInvalidArgument = 1,
  kCuda = 2,
  kNvshmem = 3,
  kTimeout = 4,
  kCapacity = 5,
  kType = 6,  // a tensor of the wrong dtype (Python: TypeError)
};

class __attribute__((visibility("default"))) Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& what) : std::runtime_error(what), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace mpiep

#define MPIEP_CUDA_CHECK(expr)                                                               \
  do {                                                                                       \
    cudaError_t mpiep_err_ = (expr);                                                         \
    if (mpiep_err_ != cudaSuccess) {                                                         \
      throw ::mpiep::Error(::mpiep::ErrorCode::kCuda,                                        \
                           std::string(#expr " failed: ") + cudaGetErrorString(mpiep_err_) + \
                               " at " __FILE__ ":" + std::to_string(__LINE__));              \
    }                                                                                        \
  } while (0)

#define MPIEP_CHECK_ARG(cond, msg)                                                  \
  do {                                                                              \
    if (!(cond)) throw ::mpiep::Error(::mpiep::ErrorCode::kInvalidArgument, (msg)); \
  } while (0)
