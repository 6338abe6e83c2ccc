#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdlib>
#include <cstring>

#include "mpiep/errors.h"
#include "runtime/nvshmem_runtime.h"

namespace mpiep {
namespace nvshmem_rt {
namespace {

bool g_initialized = false;

[[noreturn]] void fail(const std::string& what) { throw Error(ErrorCode::kNvshmem, what); }

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

}  // namespace

std::string get_unique_id() {
  nvshmemx_uniqueid_t id;
  std::memset(&id, 0, sizeof(id));
  if (int st = nvshmemx_get_uniqueid(&id); st != 0) {
    fail("nvshmemx_get_uniqueid failed (status " + std::to_string(st) +
         "): NVSHMEM's unique-id bootstrap could not open a socket; set "
         "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME to an interface every rank can reach");
  }
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

namespace {

std::string g_bootstrap;

bool already_running(int rank, int size) {
  if (!g_initialized) return false;
  if (nvshmem_my_pe() == rank && nvshmem_n_pes() == size) return true;
  fail("NVSHMEM is already initialised with another rank/size in this process");
}

// Starts NVSHMEM with a prepared attribute set (`flags` names the bootstrap). The public
// nvshmemx_init_attr() exit()s the process on failure; the underlying call returns a status,
// which lets us raise a Python exception that says what to try.
void start(unsigned flags, nvshmemx_init_attr_t& attr, int rank, int size, int device,
           size_t heap_bytes, const char* how) {
  MPIEP_CUDA_CHECK(cudaSetDevice(device));
  // The heap must hold the Buffer's areas plus NVSHMEM's own internal allocations.
  std::string heap = std::to_string(heap_bytes + (size_t(256) << 20));
  setenv("NVSHMEM_SYMMETRIC_SIZE", heap.c_str(), 0);
  nvshmemx_init_init_attr_ver_only(attr);
  int provided = 0;
  nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                NVSHMEM_VENDOR_PATCH_VERSION};
  int st = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, flags, &attr, version);
  if (st != 0) {
    fail("NVSHMEM failed to initialise (" + std::string(how) + " bootstrap) on rank " +
         std::to_string(rank) + " of " + std::to_string(size) + " (status " + std::to_string(st) +
         ", device " + std::to_string(device) +
         ", NVSHMEM_REMOTE_TRANSPORT=" + env_or("NVSHMEM_REMOTE_TRANSPORT", "<default>") +
         ", NVSHMEM_IB_ENABLE_IBGDA=" + env_or("NVSHMEM_IB_ENABLE_IBGDA", "<unset>") +
         ", NVSHMEM_SYMMETRIC_SIZE=" + env_or("NVSHMEM_SYMMETRIC_SIZE", "<unset>") +
         "). Rerun with NVSHMEM_DEBUG=INFO to see which transport failed. Common fixes: on one "
         "node without InfiniBand set NVSHMEM_REMOTE_TRANSPORT=none; for IBGDA load nvidia_peermem "
         "and set NVSHMEM_HCA_LIST per local rank; if the symmetric heap does not fit, lower "
         "num_rdma_bytes; with several ranks per GPU start CUDA MPS; if the MPI bootstrap "
         "plugin does not load (it needs Open MPI's libmpi.so.40), use "
         "MPIEP_NVSHMEM_BOOTSTRAP=uid.");
  }
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != size) {
    fail("NVSHMEM started as PE " + std::to_string(nvshmem_my_pe()) + " of " +
         std::to_string(nvshmem_n_pes()) + " but MPI says rank " + std::to_string(rank) + " of " +
         std::to_string(size) + ": the bootstrap did not join exactly these ranks");
  }
  g_initialized = true;
  g_bootstrap = how;
}

}  // namespace

void init(const std::string& unique_id, int rank, int size, int device, size_t heap_bytes) {
  if (already_running(rank, size)) return;
  if (unique_id.size() != sizeof(nvshmemx_uniqueid_t)) {
    throw Error(ErrorCode::kInvalidArgument, "NVSHMEM unique id must be " +
                                                 std::to_string(sizeof(nvshmemx_uniqueid_t)) +
                                                 " bytes, got " + std::to_string(unique_id.size()));
  }
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (int st = nvshmemx_set_attr_uniqueid_args(rank, size, &id, &attr); st != 0) {
    fail("nvshmemx_set_attr_uniqueid_args failed (status " + std::to_string(st) + ")");
  }
  start(NVSHMEMX_INIT_WITH_UNIQUEID, attr, rank, size, device, heap_bytes, "uid");
}

void init_with_mpi_comm(uint64_t mpi_comm, int rank, int size, int device, size_t heap_bytes) {
  if (already_running(rank, size)) return;
  // NVSHMEM reads an MPI_Comm through this pointer (Open MPI: a pointer-sized handle). It must
  // stay valid during init only.
  static uint64_t comm_storage;
  comm_storage = mpi_comm;
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (int st = nvshmemx_set_attr_mpi_comm_args(&comm_storage, &attr); st != 0) {
    fail("nvshmemx_set_attr_mpi_comm_args failed (status " + std::to_string(st) + ")");
  }
  start(NVSHMEMX_INIT_WITH_MPI_COMM, attr, rank, size, device, heap_bytes, "mpi");
}

std::string bootstrap() { return g_initialized ? g_bootstrap : std::string(); }

bool initialized() { return g_initialized; }
int my_pe() { return g_initialized ? nvshmem_my_pe() : -1; }
int n_pes() { return g_initialized ? nvshmem_n_pes() : 0; }

void* alloc(size_t bytes) {
  if (!g_initialized) fail("NVSHMEM is not initialised");
  void* p = nvshmem_malloc(bytes);
  if (p == nullptr) {
    fail("nvshmem_malloc(" + std::to_string(bytes) +
         ") failed: raise NVSHMEM_SYMMETRIC_SIZE / "
         "NVSHMEM_MAX_MEMORY_PER_GPU or lower num_rdma_bytes");
  }
  return p;
}

void release(void* ptr) {
  if (g_initialized && ptr) nvshmem_free(ptr);
}

void* peer_ptr(void* ptr, int pe) { return g_initialized ? nvshmem_ptr(ptr, pe) : nullptr; }

void barrier_all() {
  if (g_initialized) nvshmem_barrier_all();
}

namespace {
__global__ void quiet_kernel() { nvshmem_quiet(); }
}  // namespace

void quiet_device() {
  if (!g_initialized) return;
  quiet_kernel<<<1, 1>>>();
  MPIEP_CUDA_CHECK(cudaGetLastError());
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
}

void finalize() {
  if (!g_initialized) return;
  nvshmem_finalize();
  g_initialized = false;
  g_bootstrap.clear();
}

}  // namespace nvshmem_rt
}  // namespace mpiep
