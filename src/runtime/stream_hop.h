// The comm-stream hop of normal mode: a Buffer's communication stream and two events that
// order it against the caller's stream. Normal-mode ops run on the comm stream after
// everything already queued on the caller's stream, and the caller's stream waits for them
// (DeepEP does the same). Doing it here rather than in Python (torch.cuda.stream() and
// friends) saves about 30 us per call.
#pragma once

#include <cuda_runtime.h>

#include "mpiep/export.h"

namespace mpiep {

class MPIEP_API StreamHop {
 public:
  explicit StreamHop(cudaStream_t comm);  // events on the current device
  ~StreamHop();
  StreamHop(const StreamHop&) = delete;
  StreamHop& operator=(const StreamHop&) = delete;

  cudaStream_t comm() const { return comm_; }
  // Queue the comm stream behind `compute`; returns the stream to launch on.
  cudaStream_t begin(cudaStream_t compute);
  // Queue `compute` behind the comm stream. Does not throw (runs from destructors): a CUDA
  // failure is left for the next call to report.
  void end(cudaStream_t compute) noexcept;

 private:
  cudaStream_t comm_ = nullptr;
  cudaEvent_t in_ = nullptr, out_ = nullptr;
};

}  // namespace mpiep
