// Low-latency (DeepEP-style) expert-parallel dispatch/combine over NVSHMEM: the types shared
// by the host launcher, the kernels and the bindings. Torch-free: device pointers and sizes.
//
// Symmetric heap: two equal halves (double buffering: calls alternate halves so that two
// dispatch/combine pairs can be in flight). Each half starts with a fixed-size signal area,
// then data regions laid out from the call's (hidden, max_tokens, num_experts):
//   disp_count   [E_local][R] u64   count+1 written by source rank s (0 = not yet)
//   disp_arrival [E_local][R] u64   +1 per row after its data (NVSHMEM signal / release add)
//   comb_arrival [max_tokens] u64   per combined row received for a local token: 1 in the low
//                                   32 bits + a hash of its expert in the high 32 (see
//                                   kernels/low_latency_common.cuh, combine_signal)
//   disp_readers [E_local]    u32   local: how many receive blocks have read an expert's signals
//   comb_beacon  [R]          u64   rank masking only: source s started combine epoch e (e + 1);
//                                   at the end of the signal area, whatever the call's sizes:
//                                   beacons only grow (never reset but by a clean)
//   disp_send    [max][row]           staged (FP8-cast) messages of this rank's tokens
//   disp_recv    [E_local][R][max][row]  slot of row i from source s for local expert e
//   comb_send    [E_local][R*max][H] bf16  zero-copy combine input / staging for NVSHMEM puts
//   comb_recv    [E][max][H] bf16        expert e's output for local token t
// Every signal a call writes is reset by its receiver once read, so the signal areas are all
// zero between completed calls whatever parameters the next call uses; data regions never
// overlap signal areas, so changing (hidden, max, E) between calls needs no cleaning.
//
// Rank masking (Buffer(enable_shrink=True)): Common::active points to [R] device words (1: the
// rank takes part), read by every launch so that CUDA graphs follow mask changes. Launches then
// skip masked ranks: no counts or rows to them, no waits on them, their experts' slots add 0
// in combine. A wait that times out masks its peer there and the call finishes without it.
// Every combine then also tells each active rank that it started (comb_beacon), so that a rank
// that stops is noticed by every survivor within one dispatch/combine pair. The host acts on a
// recorded timeout at the second combine after it (settled_error: by then every survivor has
// recorded it, whatever the host's timing) and agrees on the survivors (python/mpiep/shrink.py).
//
// Combine epochs: the number of combines launched before (a dispatch shares the epoch of the
// combine that follows it); every launch knows its epoch, so a timeout records it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mpiep {
namespace ll {

constexpr size_t kSignalBytes = size_t(1) << 20;  // per half; see kernels for the bound check
constexpr int kThreads = 512;                     // threads per block of every LL kernel

enum Phase : int { kSendPhase = 1, kRecvPhase = 2 };
// What a timed-out wait was waiting for (reported to Python).
enum WaitPhase : int {
  kWaitDispatchCount = 1,
  kWaitDispatchData = 2,
  kWaitCombineData = 3,
  kWaitCombineStart = 4,  // rank masking: a source's combine beacon
};

// Written by the first kernel thread that gives up waiting; lives in host-mapped memory so the
// host reads it without synchronising.
struct ErrorRecord {
  volatile int flag;
  volatile int rank;
  volatile int phase;  // WaitPhase
  volatile int peer;   // source rank waited on (-1 when unknown)
  volatile int index;  // local expert or token waited on
  volatile int epoch;  // combine epoch of the launch that timed out
  volatile long long observed;
  volatile long long expected;
};

struct Regions {
  uint64_t* disp_count;
  uint64_t* disp_arrival;
  uint64_t* comb_arrival;
  unsigned* disp_readers;
  uint64_t* comb_beacon;
  uint8_t* disp_send;
  uint8_t* disp_recv;
  uint8_t* comb_send;
  uint8_t* comb_recv;
};

struct Common {
  uint8_t* heap;               // this PE's symmetric heap base
  uint8_t* const* peer_bases;  // [R] device array: peer heap mapped here (NVLink), or null: puts
  int rank;
  int num_ranks;
  uint64_t timeout_ns;  // globaltimer nanoseconds a wait may spin
  ErrorRecord* err;     // host-mapped (device view)
  int* err_lock;        // device word: 0 until the first timeout; then (unmasked) all bail out
  int* active;          // [R] device words, 1 = the rank takes part; null: no rank masking
  int epoch;            // combine epoch of this launch (recorded with a timeout; beacons)
};

struct DispatchParams {
  Common c;
  Regions r;
  const void* x;            // [T, H] bf16
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, hidden, max_tokens, num_experts;
  bool fp8, round_scale, ue8m0;
  void* recv_x;        // [E_local, R*max, H] bf16 or e4m3
  void* recv_scales;   // [E_local, R*max, H/128] f32 or [.., ceil(H/512)] i32 (UE8M0), or null
  int* recv_count;     // [E_local]
  int* src_token_idx;  // [E_local, R*max]
  int* layout_range;   // [E_local, R, 2]
  int* stats;          // [E_local] cumulative, or null
  int row_bytes;       // stride of a message slot
  int msg_bytes;       // bytes actually moved per message (multiple of 16)
  int phases;
  int num_blocks;
  int stall;  // test only (mpiep/test_stall.h): kStallLlDispatchCount / kStallLlDispatchData
};

struct CombineParams {
  Common c;
  Regions r;
  const void* y;              // [E_local, R*max, H] bf16
  const int64_t* topk_idx;    // [T, K]
  const float* topk_weights;  // [T, K]
  const int* src_token_idx;   // [E_local, R*max] from the dispatch handle
  const int* layout_range;    // [E_local, R, 2]
  void* out;                  // [T, H] bf16
  int num_tokens, num_topk, hidden, max_tokens, num_experts;
  bool zero_copy;
  int phases;
  int num_blocks;
  int stall;  // test only (mpiep/test_stall.h): kStallLlCombine
};

// Combine launches that may skip ranks (masking or a stall) read the top-k of a token from
// shared memory and keep which slots to add in one 32-bit word.
constexpr int kMaxTopkSkipping = 32;

// Bytes of one dispatch message slot: 16-byte header (source token id) + BF16 payload. The FP8
// payload (H bytes + H/128 f32 scales) fits inside.
inline size_t row_bytes(int hidden) { return (16 + size_t(hidden) * 2 + 15) / 16 * 16; }
inline size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Bytes one half needs; python/mpiep/config.py reads it (low_latency_half_bytes) and keeps a
// mirror for installs without the core (tests/test_sizes.py checks they agree).
inline size_t half_bytes_needed(int hidden, int max_tokens, int num_experts) {
  const size_t row = row_bytes(hidden), E = num_experts, M = max_tokens, H = hidden;
  return kSignalBytes + align_up(M * row, 128) + align_up(E * M * row, 128) +
         2 * align_up(E * M * H * 2, 128);
}

// The beacons take the last R <= E words.
inline size_t signal_bytes_needed(int max_tokens, int num_experts) {
  return size_t(num_experts) * 16 + size_t(max_tokens) * 8 + size_t(num_experts) * 4 +
         size_t(num_experts) * 8;
}

inline Regions make_regions(uint8_t* half, int hidden, int max_tokens, int num_experts,
                            int num_ranks) {
  const size_t row = row_bytes(hidden), E = num_experts, M = max_tokens, H = hidden;
  Regions r;
  r.disp_count = reinterpret_cast<uint64_t*>(half);
  r.disp_arrival = r.disp_count + E;
  r.comb_arrival = r.disp_arrival + E;
  r.disp_readers = reinterpret_cast<unsigned*>(r.comb_arrival + M);
  r.comb_beacon = reinterpret_cast<uint64_t*>(half + kSignalBytes) - num_ranks;
  uint8_t* p = half + kSignalBytes;
  r.disp_send = p;
  p += align_up(M * row, 128);
  r.disp_recv = p;
  p += align_up(E * M * row, 128);
  r.comb_send = p;
  p += align_up(E * M * H * 2, 128);
  r.comb_recv = p;
  return r;
}

void launch_dispatch(const DispatchParams& p, void* stream);
void launch_combine(const CombineParams& p, void* stream);

// Blocks of the dispatch (combine) kernel that one SM holds at once, for `num_ranks` ranks
// (the smaller of the kernel's two variants). Every block of a launch must be resident, since
// receiving blocks spin on sending ones: the context never launches more than this per SM.
int dispatch_blocks_per_sm(int num_ranks);
int combine_blocks_per_sm(int num_ranks);

}  // namespace ll
}  // namespace mpiep
