// The host side of a notify: wait until a kernel publishes a token in host-mapped memory,
// checking the kernels' error record and the stream as it goes, with a deadline.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <string>

#include "mpiep/export.h"

namespace mpiep {

// Returns once *ready == token. Throws what `check_error` throws (a kernel reported a
// timeout or overflow), Error(kCuda) when the stream failed, and Error(kTimeout) after
// timeout_s + 1 s (a little longer than the kernels' own timeout, so that they report first
// and name the peer and phase). `who` names the rank in messages.
void wait_for_token(const volatile int64_t* ready, int64_t token, double timeout_s,
                    cudaStream_t stream, const std::function<void()>& check_error,
                    const std::string& who);

// Throws Error(kInvalidArgument) when `stream` is capturing a CUDA graph: a dispatch that
// will wait on the host for its counts cannot be captured. Called before anything is
// launched, so that the capture is left intact and the message says why.
MPIEP_API void refuse_capture(cudaStream_t stream, const std::string& who);

}  // namespace mpiep
