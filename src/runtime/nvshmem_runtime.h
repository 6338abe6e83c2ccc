// NVSHMEM runtime for the low-latency mode: bootstrap from a unique id that the MPI layer
// broadcasts (never torch.distributed), the symmetric heap, barriers and finalize. One
// initialisation per process; the environment (IBGDA, QPs, NVLS off...) is set by Python
// before init() because NVSHMEM reads it at init.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mpiep {
namespace nvshmem_rt {

std::string get_unique_id();  // 128 opaque bytes (call on one rank, broadcast over MPI)
// Initialises NVSHMEM on `device` as PE `rank` of `size`; throws mpiep::Error(kNvshmem) with a
// readable hint when NVSHMEM cannot start. heap_bytes sets NVSHMEM_SYMMETRIC_SIZE when unset.
void init(const std::string& unique_id, int rank, int size, int device, size_t heap_bytes);
// The same through NVSHMEM's MPI bootstrap plugin (nvshmem_bootstrap_mpi.so.3, built against
// Open MPI): `mpi_comm` is the MPI_Comm handle value (mpi4py's MPI._handleof(comm)). No sockets
// of NVSHMEM's own; throws mpiep::Error(kNvshmem) when the plugin does not load.
void init_with_mpi_comm(uint64_t mpi_comm, int rank, int size, int device, size_t heap_bytes);
std::string bootstrap();  // "uid", "mpi", or "" before init
bool initialized();
int my_pe();
int n_pes();
void* alloc(size_t bytes);          // collective: same size on every PE
void release(void* ptr);            // collective
void* peer_ptr(void* ptr, int pe);  // NVLink-mapped address of ptr on pe, or null
void barrier_all();
// Completes this PE's NVSHMEM operations issued so far, kernels' puts included: a one-thread
// kernel calling nvshmem_quiet, then a device synchronisation.
void quiet_device();
void finalize();

}  // namespace nvshmem_rt
}  // namespace mpiep
