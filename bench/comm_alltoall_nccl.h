// comm_alltoall_bench --backend nccl (comm_alltoall_nccl.cc; a build without NCCL links
// comm_alltoall_no_nccl.cc, which says so).
#ifndef EPX_BENCH_COMM_ALLTOALL_NCCL_H_
#define EPX_BENCH_COMM_ALLTOALL_NCCL_H_

#include <cstdint>
#include <vector>

#include "comm/communicator.h"

namespace epx::bench {

// Under mpirun, every rank: the round trips of `sizes` bytes; prints at rank 0. Exit code.
int RunNcclAllToAll(comm::Communicator& mpi, const std::vector<int64_t>& sizes);

}  // namespace epx::bench

#endif  // EPX_BENCH_COMM_ALLTOALL_NCCL_H_
