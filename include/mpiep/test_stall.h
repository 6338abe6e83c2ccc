// Test-only stall switch: a rank told to stall a phase skips its part of that kernel (it sends
// nothing to its peers there), so that the peers must time out. Set per engine from Python
// (set_test_stall, or MPIEP_TEST_STALL=<rank>:<phase> at engine creation); 0 in production.
// python/mpiep/stall.py mirrors these values (a test compares them).
#pragma once

namespace mpiep {

enum TestStall : int {
  kStallNone = 0,
  kStallLlDispatchCount = 1,  // low-latency dispatch: no token counts (and so no rows) to peers
  kStallLlDispatchData = 2,   // low-latency dispatch: the counts, but no rows to peers
  kStallLlCombine = 4,        // low-latency combine: no rows back to peers
  kStallDispatch = 8,         // normal mode: the dispatch data kernel is not launched
  kStallCombine = 16,         // normal mode: the combine kernel is not launched
};

}  // namespace mpiep
