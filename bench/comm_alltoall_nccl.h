// What comm_alltoall_bench's sources share: the summary of the timings, and --backend nccl
// (comm_alltoall_nccl.cc; a build without NCCL links comm_alltoall_no_nccl.cc, which says so).
#ifndef EPX_BENCH_COMM_ALLTOALL_NCCL_H_
#define EPX_BENCH_COMM_ALLTOALL_NCCL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace epx::bench {

// Median and 90th percentile of round-trip times (comm_alltoall_bench.cc).
struct Timing {
  double median_us, p90_us;
};
Timing Summarise(std::vector<double> us);

// Every rank of a job of `world` ranks: the round trips of `sizes` bytes on the GPU `cuda_device`;
// prints at rank 0. `unique_id`: rank 0's NCCL unique id (comm/data_plane.h shares it). Exit code.
int RunNcclAllToAll(int rank, int world, const std::string& unique_id, int cuda_device,
                    const std::vector<int64_t>& sizes);

}  // namespace epx::bench

#endif  // EPX_BENCH_COMM_ALLTOALL_NCCL_H_
