// Shared by the torch op layer (mpiep._ops): argument checks that cost no device work, the
// caller's current CUDA stream, and output allocation. This layer may use libtorch; the
// kernels and runtime below it (src/kernels, src/runtime) stay torch-free.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>

#include <optional>
#include <string>
#include <utility>

#include "mpiep/errors.h"
#include "runtime/stream_hop.h"

namespace mpiep {
namespace ops {

[[noreturn]] inline void bad_arg(const std::string& msg) {
  throw Error(ErrorCode::kInvalidArgument, msg);
}

// `t` must be a contiguous CUDA tensor of `dtype` with `dim` dimensions (on `device` when
// it is >= 0). The messages and exception types match Buffer's Python checks
// (python/mpiep/validate.py), which run instead of these only with validation on.
inline void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim,
                  int device = -1) {
  if (t.scalar_type() != dtype)
    throw Error(ErrorCode::kType, std::string(name) + " must have dtype " + c10::toString(dtype) +
                                      ", got " + c10::toString(t.scalar_type()));
  if (t.dim() != dim)
    bad_arg(std::string(name) + " must have " + std::to_string(dim) + " dimensions, got " +
            std::to_string(t.dim()));
  if (!t.is_contiguous()) bad_arg(std::string(name) + " must be contiguous (call .contiguous())");
  if (!t.is_cuda()) bad_arg(std::string(name) + " must be a CUDA tensor, got " + t.device().str());
  if (device >= 0 && t.get_device() != device)
    bad_arg(std::string(name) + " is on " + t.device().str() +
            ", but this Buffer works on cuda:" + std::to_string(device));
}

inline void check_size(const at::Tensor& t, const char* name, int64_t axis, int64_t want) {
  if (t.size(axis) != want)
    bad_arg(std::string(name) + " has size " + std::to_string(t.size(axis)) + " in dimension " +
            std::to_string(axis) + ", expected " + std::to_string(want));
}

// The current stream of `device` through c10's device-guard interface: no link against
// libc10_cuda, so the op layer also builds (and fails cleanly) against a CPU-only torch.
inline cudaStream_t current_stream(const at::Device& device) {
  const c10::Stream s = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(s.native_handle());
}

// For one normal-mode op: its work goes to the Buffer's comm stream (runtime/stream_hop.h)
// behind what the caller's stream already holds, and the caller's stream waits for it at the
// end, also when the op throws after launching. Without a hop (address 0), or when the caller
// already runs on the comm stream (Buffer's async/event path switches in Python), the op runs
// on the current stream.
class HopGuard {
 public:
  HopGuard(int64_t hop_address, const at::Device& device) : compute_(current_stream(device)) {
    auto* hop = reinterpret_cast<StreamHop*>(hop_address);
    if (hop == nullptr || hop->comm() == compute_) {
      stream_ = compute_;
      return;
    }
    stream_ = hop->begin(compute_);
    hop_ = hop;
  }
  ~HopGuard() {
    if (hop_ != nullptr) hop_->end(compute_);
  }
  HopGuard(const HopGuard&) = delete;
  HopGuard& operator=(const HopGuard&) = delete;
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t compute_ = nullptr, stream_ = nullptr;
  StreamHop* hop_ = nullptr;
};

// The row bytes of normal dispatch's `x`, which check_dispatch_inputs (normal_checks.h) has
// checked (a contiguous 2-D CUDA tensor): rows must be 16-byte multiples on a 16-byte boundary
// (the kernels copy 16 bytes at a time).
inline int64_t dispatch_row_bytes_of(const at::Tensor& checked_x) {
  const int64_t hb = checked_x.size(1) * checked_x.element_size();
  if (hb % 16 || reinterpret_cast<uintptr_t>(checked_x.data_ptr()) % 16)
    bad_arg("x: rows must be 16-byte multiples and aligned (hidden=" +
            std::to_string(checked_x.size(1)) + ")");
  return hb;
}

// The hidden size of normal combine's `x`, which check_combine_inputs has checked (contiguous
// 2-D BF16 on the device): a multiple of 8 (one 16-byte load), 16-byte aligned.
inline int64_t combine_hidden_of(const at::Tensor& checked_x) {
  const int64_t H = checked_x.size(1);
  if (H % 8 || reinterpret_cast<uintptr_t>(checked_x.data_ptr()) % 16)
    bad_arg("combine: hidden (" + std::to_string(H) +
            ") must be a multiple of 8 and x 16-byte aligned");
  return H;
}

// Optional bias of combine: bf16 [T, H], contiguous.
inline void check_bias(const std::optional<at::Tensor>& b, const char* name, int64_t T, int64_t H,
                       int device = -1) {
  if (!b) return;
  check(*b, name, at::kBFloat16, 2, device);
  check_size(*b, name, 0, T);
  check_size(*b, name, 1, H);
}

template <class T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <class T>
T* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

inline at::Tensor empty(at::IntArrayRef shape, at::ScalarType dtype, const at::Device& device) {
  return at::empty(shape, at::TensorOptions().dtype(dtype).device(device));
}

// Several outputs from one allocation: a contiguous tensor of `dtype` and `shape` over the
// bytes of `base` from `byte_offset` on, made without the dispatcher (a new TensorImpl on
// base's storage, as at::from_blob does). One allocation and a few of these cost less than
// one allocation per output; the outputs then keep each other's memory alive, so group
// only outputs that live together.
inline at::Tensor typed_slice(const at::Tensor& base, int64_t byte_offset, at::IntArrayRef shape,
                              at::ScalarType dtype) {
  const auto meta = caffe2::TypeMeta::fromScalarType(dtype);
  auto t =
      at::detail::make_tensor<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(), meta);
  t.unsafeGetTensorImpl()->set_sizes_contiguous(shape);
  t.unsafeGetTensorImpl()->set_storage_offset(byte_offset / static_cast<int64_t>(meta.itemsize()));
  return t;
}

// Column `col` of a contiguous 2-D tensor as a 1-D strided view (what m[:, col] gives), made
// the same way: no dispatcher, no copy kernel.
inline at::Tensor column_view(const at::Tensor& m, int64_t col) {
  auto t =
      at::detail::make_tensor<c10::TensorImpl>(c10::Storage(m.storage()), m.key_set(), m.dtype());
  const int64_t rows = m.size(0), stride = m.size(1);
  const int64_t size[1] = {rows}, strides[1] = {stride};
  t.unsafeGetTensorImpl()->set_sizes_and_strides(c10::IntArrayRef(size), c10::IntArrayRef(strides));
  t.unsafeGetTensorImpl()->set_storage_offset(m.storage_offset() + col);
  return t;
}

// Normal dispatch sizes the handle's per-row tensors before the notify for the most rows the
// buffers hold, to save an allocation after the host wait; past this many bytes it allocates
// them after the wait instead (huge buffers with small rows).
constexpr int64_t kMaxEarlyTailBytes = int64_t(1) << 20;

// Byte offsets of consecutive blocks inside one allocation, each aligned to 256 bytes.
struct ByteLayout {
  int64_t total = 0;
  int64_t add(int64_t bytes) {
    const int64_t at = total;
    total += (bytes + 255) / 256 * 256;
    return at;
  }
};

// Combine's outputs, the summed rows [T, H] bf16 and (with weights) the summed weights
// [T, K] float, from one allocation: views of one storage, so the weights keep the rows'
// memory alive while they live (as with DeepEP-style outputs, used together).
// Set while a torch custom op runs (torch_library.cpp): its returns may not alias each other,
// so OutputBlock gives each output an allocation of its own there.
inline thread_local bool t_separate_outputs = false;

class SeparateOutputs {
 public:
  SeparateOutputs() : previous_(t_separate_outputs) { t_separate_outputs = true; }
  ~SeparateOutputs() { t_separate_outputs = previous_; }
  SeparateOutputs(const SeparateOutputs&) = delete;
  SeparateOutputs& operator=(const SeparateOutputs&) = delete;

 private:
  bool previous_;
};

// The outputs of one call as aligned views of one allocation (each allocation costs about
// 2 us of host time), or, under SeparateOutputs, one allocation each.
class OutputBlock {
 public:
  OutputBlock(const ByteLayout& layout, const at::Device& device)
      : device_(device),
        storage_(t_separate_outputs ? at::Tensor() : empty({layout.total}, at::kByte, device)) {}
  at::Tensor take(int64_t byte_offset, at::IntArrayRef shape, at::ScalarType dtype) const {
    return storage_.defined() ? typed_slice(storage_, byte_offset, shape, dtype)
                              : empty(shape, dtype, device_);
  }

 private:
  at::Device device_;
  at::Tensor storage_;
};

inline std::pair<at::Tensor, std::optional<at::Tensor>> combine_outputs(int64_t T, int64_t H,
                                                                        int64_t K, bool weights,
                                                                        const at::Device& dev) {
  ByteLayout o;
  const int64_t x_at = o.add(T * H * 2), w_at = weights ? o.add(T * K * 4) : 0;
  const OutputBlock block(o, dev);
  std::optional<at::Tensor> w;
  if (weights) w = block.take(w_at, {T, K}, at::kFloat);
  return {block.take(x_at, {T, H}, at::kBFloat16), w};
}

}  // namespace ops
}  // namespace mpiep
