// The raw data plane under mpirun: rank 0 sends `bytes` to every worker and gets `bytes` back
// from each (the shape of one layer's dispatch + combine), through comm::Communicator (what the
// engine uses) and through MPI_Alltoallv (the library's own collective) on the same buffers.
// Prints median and p90 microseconds per round trip and GB/s at rank 0, so the per-layer
// dispatch/combine times of `epx ... --stats` can be read against the cost of moving the bytes.
//
//   mpirun -np 1+W build/bench/comm_alltoall_bench [bytes ...]
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/time/time.h"
#include "comm/mpi_communicator.h"

namespace {

struct Timing {
  double median_us, p90_us;
};

Timing Summarise(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[us.size() * 9 / 10]};
}

}  // namespace

int main(int argc, char** argv) {
  auto created = epx::comm::CreateMpiCommunicator(&argc, &argv);
  if (!created.ok()) {
    std::fprintf(stderr, "comm_alltoall_bench: %s\n", created.status().ToString().c_str());
    return 1;
  }
  epx::comm::Communicator& comm = **created;
  const int rank = comm.rank(), world = comm.world_size();
  std::vector<int64_t> sizes;
  for (int i = 1; i < argc; ++i) sizes.push_back(std::atoll(argv[i]));
  if (sizes.empty()) {
    // One token to 4096 tokens of a 4096-wide fp32 hidden state, spread over the workers.
    for (int64_t tokens : {1, 16, 256, 4096}) sizes.push_back(tokens * 4096 * 4);
  }
  if (rank == 0) {
    std::printf("# %d ranks (1 coordinator + %d workers); per round trip: coordinator sends "
                "`bytes` to each worker, each worker sends `bytes` back\n",
                world, world - 1);
    std::printf("%12s %14s %12s %12s %14s %12s %12s\n", "bytes", "epx_median_us", "epx_p90_us",
                "epx_GB/s", "mpi_median_us", "mpi_p90_us", "mpi_GB/s");
  }
  for (int64_t bytes : sizes) {
    const int reps = bytes >= (1 << 24) ? 20 : 200;
    std::vector<char> send(bytes * world), recv(bytes * world);
    std::vector<int64_t> out(world, 0), in(world, 0);
    std::vector<int> counts_out(world, 0), counts_in(world, 0), displs(world, 0);
    for (int p = 0; p < world; ++p) displs[p] = static_cast<int>(p * bytes);
    if (rank == 0) {
      for (int p = 1; p < world; ++p) out[p] = in[p] = bytes;
    } else {
      out[0] = in[0] = bytes;
    }
    for (int p = 0; p < world; ++p) {
      counts_out[p] = static_cast<int>(out[p]);
      counts_in[p] = static_cast<int>(in[p]);
    }
    std::vector<double> ours, theirs;
    for (int r = 0; r < reps + 5; ++r) {
      MPI_Barrier(MPI_COMM_WORLD);
      auto start = std::chrono::steady_clock::now();
      // Dispatch then combine, as one layer does.
      absl::Status s = comm.AllToAllV(send.data(), rank == 0 ? out : std::vector<int64_t>(world),
                                      recv.data(), rank == 0 ? std::vector<int64_t>(world) : in,
                                      epx::comm::Tag::kDispatch, absl::Seconds(60), "bench");
      if (s.ok())
        s = comm.AllToAllV(send.data(), rank == 0 ? std::vector<int64_t>(world) : out, recv.data(),
                           rank == 0 ? in : std::vector<int64_t>(world), epx::comm::Tag::kCombine,
                           absl::Seconds(60), "bench");
      if (!s.ok()) {
        std::fprintf(stderr, "rank %d: %s\n", rank, s.ToString().c_str());
        comm.Abort(1, "bench failed");
      }
      const double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
              .count();
      if (r >= 5) ours.push_back(us);

      // The same two exchanges with MPI's own collective.
      std::vector<int> zero(world, 0);
      MPI_Barrier(MPI_COMM_WORLD);
      start = std::chrono::steady_clock::now();
      MPI_Alltoallv(send.data(), rank == 0 ? counts_out.data() : zero.data(), displs.data(),
                    MPI_BYTE, recv.data(), rank == 0 ? zero.data() : counts_in.data(),
                    displs.data(), MPI_BYTE, MPI_COMM_WORLD);
      MPI_Alltoallv(send.data(), rank == 0 ? zero.data() : counts_out.data(), displs.data(),
                    MPI_BYTE, recv.data(), rank == 0 ? counts_in.data() : zero.data(),
                    displs.data(), MPI_BYTE, MPI_COMM_WORLD);
      const double mpi_us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
              .count();
      if (r >= 5) theirs.push_back(mpi_us);
    }
    if (rank == 0) {
      const Timing a = Summarise(ours), b = Summarise(theirs);
      const double moved = 2.0 * bytes * (world - 1);
      std::printf("%12lld %14.1f %12.1f %12.3f %14.1f %12.1f %12.3f\n",
                  static_cast<long long>(bytes), a.median_us, a.p90_us, moved / a.median_us / 1e3,
                  b.median_us, b.p90_us, moved / b.median_us / 1e3);
    }
  }
  return 0;
}
