// RunNcclAllToAll for builds without NCCL.
#include <cstdio>

#include "bench/comm_alltoall_nccl.h"

namespace epx::bench {

int RunNcclAllToAll(int rank, int, const std::string&, int, const std::vector<int64_t>&) {
  if (rank == 0)
    std::fprintf(stderr, "comm_alltoall_bench: --backend nccl: this build has no NCCL\n");
  return 1;
}

}  // namespace epx::bench
