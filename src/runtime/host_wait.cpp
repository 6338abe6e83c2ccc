#include "runtime/host_wait.h"

#include <atomic>
#include <chrono>
#include <thread>

#include "mpiep/errors.h"

namespace mpiep {

namespace {
const char* kNotCapturable =
    ": this dispatch cannot be captured in a CUDA graph: it waits on the host for the notify "
    "kernel's counts to size its outputs (capture a cached dispatch, with a handle, or one "
    "with num_worst_tokens)";
}  // namespace

void refuse_capture(cudaStream_t stream, const std::string& who) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return;  // the wait's own check below still applies
  }
  if (status != cudaStreamCaptureStatusNone)
    throw Error(ErrorCode::kInvalidArgument, who + kNotCapturable);
}

void wait_for_token(const volatile int64_t* ready, int64_t token, double timeout_s,
                    cudaStream_t stream, const std::function<void()>& check_error,
                    const std::string& who) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const auto deadline = start + std::chrono::duration<double>(timeout_s + 1.0);
  int polls = 0;
  while (*ready != token) {
    check_error();
    if ((++polls & 1023) == 0) {
      const cudaError_t err = cudaStreamQuery(stream);
      if (err == cudaErrorStreamCaptureUnsupported || err == cudaErrorStreamCaptureInvalidated) {
        // Inside a CUDA graph capture nothing runs and the query is forbidden: say why.
        (void)cudaGetLastError();  // the query's error, not the caller's to see later
        throw Error(ErrorCode::kInvalidArgument, who + kNotCapturable);
      }
      if (err != cudaSuccess && err != cudaErrorNotReady) {
        throw Error(ErrorCode::kCuda, who + ": notify kernel failed: " + cudaGetErrorString(err));
      }
      if (clock::now() > deadline) {
        throw Error(ErrorCode::kTimeout, who + ": no notify result within " +
                                             std::to_string(timeout_s) +
                                             "s (a peer crashed, hangs, or skipped this call)");
      }
      // Spin while the answer is likely close; then yield the core.
      if (clock::now() - start > std::chrono::milliseconds(2)) {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  check_error();
}

}  // namespace mpiep
