#include "runtime/stream_hop.h"

#include "mpiep/errors.h"

namespace mpiep {

StreamHop::StreamHop(cudaStream_t comm) : comm_(comm) {
  MPIEP_CUDA_CHECK(cudaEventCreateWithFlags(&in_, cudaEventDisableTiming));
  MPIEP_CUDA_CHECK(cudaEventCreateWithFlags(&out_, cudaEventDisableTiming));
}

StreamHop::~StreamHop() {
  if (in_) cudaEventDestroy(in_);
  if (out_) cudaEventDestroy(out_);
}

cudaStream_t StreamHop::begin(cudaStream_t compute) {
  MPIEP_CUDA_CHECK(cudaEventRecord(in_, compute));
  MPIEP_CUDA_CHECK(cudaStreamWaitEvent(comm_, in_, 0));
  return comm_;
}

void StreamHop::end(cudaStream_t compute) noexcept {
  if (cudaEventRecord(out_, comm_) == cudaSuccess) (void)cudaStreamWaitEvent(compute, out_, 0);
}

}  // namespace mpiep
