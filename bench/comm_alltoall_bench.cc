// The raw data planes under mpirun: rank 0 sends `bytes` to every worker and gets `bytes` back
// from each (the shape of one layer's dispatch + combine), through epx's MPI communicator and
// its gloo communicator (the data plane of a launcher-free cluster; TCP, formed here through a
// store in files so that mpirun only starts the processes), and through MPI_Alltoallv (the
// library's own collective), on the same buffers and ranks. Prints median and p90 microseconds
// per round trip and GB/s at rank 0, so the per-layer dispatch/combine times of `epx ... --stats`
// can be read against the cost of moving the bytes.
//
//   mpirun -np 1+W build/bench/comm_alltoall_bench [--backend host|nccl] [bytes ...]
//
// --backend nccl (one GPU per rank, by local rank) measures the NCCL data plane instead, next to
// NCCL's own grouped ncclSend/ncclRecv of the same bytes (bench/comm_alltoall_nccl.cc). It also
// runs without mpirun, each rank started by hand:
//   comm_alltoall_bench --backend nccl --rank R --world W --dir DIR [--cuda-device N] [bytes ...]
#include <mpi.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "bench/comm_alltoall_nccl.h"
#include "comm/data_plane.h"
#include "comm/gloo_communicator.h"
#include "comm/key_value_store.h"
#include "comm/mpi_communicator.h"
#include "comm/nccl_communicator.h"
#include "kernels/cuda/runtime.h"

namespace {

// One dispatch + combine through `comm`; microseconds. The ranks line up through `comm` itself
// first: an MPI barrier would leave the early ranks spinning in MPI while a gloo exchange needs
// its transport threads scheduled.
double RoundTrip(epx::comm::Communicator& comm, std::vector<char>& send, std::vector<char>& recv,
                 const std::vector<int64_t>& out, const std::vector<int64_t>& in) {
  const int rank = comm.rank(), world = comm.world_size();
  const std::vector<int64_t> none(world, 0);
  char mine = 0;
  std::vector<char> all(world);
  if (!comm.AllGather(&mine, 1, all.data(), epx::comm::Tag::kHandshake, absl::Seconds(60),
                      "bench barrier")
           .ok())
    MPI_Abort(MPI_COMM_WORLD, 1);
  const auto start = std::chrono::steady_clock::now();
  absl::Status s = comm.AllToAllV(send.data(), rank == 0 ? out : none, recv.data(),
                                  rank == 0 ? none : in, epx::comm::Tag::kDispatch,
                                  absl::Seconds(60), "bench");
  if (s.ok())
    s = comm.AllToAllV(send.data(), rank == 0 ? none : out, recv.data(), rank == 0 ? in : none,
                       epx::comm::Tag::kCombine, absl::Seconds(60), "bench");
  if (!s.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, s.ToString().c_str());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

namespace epx::bench {

Timing Summarise(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[us.size() * 9 / 10]};
}

}  // namespace epx::bench

int main(int argc, char** argv) {
  std::vector<int64_t> sizes;
  bool nccl = false;
  int self_rank = -1, self_world = 0, cuda_device = -1;
  std::string dir_flag;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--backend" && has_value) {
      const std::string backend = argv[++i];
      if (backend != "host" && backend != "nccl") {
        std::fprintf(stderr, "--backend must be host or nccl\n");
        return 2;
      }
      nccl = backend == "nccl";
    } else if (arg == "--rank" && has_value) {
      self_rank = std::atoi(argv[++i]);
    } else if (arg == "--world" && has_value) {
      self_world = std::atoi(argv[++i]);
    } else if (arg == "--dir" && has_value) {
      dir_flag = argv[++i];
    } else if (arg == "--cuda-device" && has_value) {
      cuda_device = std::atoi(argv[++i]);
    } else {
      sizes.push_back(std::atoll(argv[i]));
    }
  }
  if (sizes.empty()) {
    // One token to 4096 tokens of a 4096-wide hidden state (fp32 on the host planes, bf16 on
    // NCCL), spread over the workers.
    for (int64_t tokens : {1, 16, 256, 4096}) sizes.push_back(tokens * 4096 * (nccl ? 2 : 4));
  }
  const int devices = epx::cuda::DeviceCount();
  if (nccl && !epx::comm::LaunchedByMpi()) {
    // Without a launcher each rank is started by hand, with the same --dir for the rendezvous.
    if (self_rank < 0 || self_world < 2 || self_rank >= self_world || dir_flag.empty()) {
      std::fprintf(stderr, "--backend nccl without mpirun needs --rank R --world W --dir DIR\n");
      return 2;
    }
    epx::comm::FileKeyValueStore store(dir_flag);
    absl::StatusOr<std::string> id = epx::comm::ShareNcclUniqueId(
        store, "nccl/", self_rank, absl::Seconds(120), epx::comm::NewNcclUniqueId);
    if (!id.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", self_rank, id.status().ToString().c_str());
      return 1;
    }
    return epx::bench::RunNcclAllToAll(self_rank, self_world, *id,
                                       cuda_device >= 0 ? cuda_device : 0, sizes);
  }
  auto created = epx::comm::CreateMpiCommunicator(&argc, &argv);
  if (!created.ok()) {
    std::fprintf(stderr, "comm_alltoall_bench: %s\n", created.status().ToString().c_str());
    return 1;
  }
  epx::comm::Communicator& comm = **created;
  const int rank = comm.rank(), world = comm.world_size();
  if (nccl) {
    absl::StatusOr<std::string> id =
        epx::comm::BroadcastNcclUniqueId(comm, absl::Seconds(60), epx::comm::NewNcclUniqueId);
    if (!id.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", rank, id.status().ToString().c_str());
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    const int local = epx::comm::LocalRankFromEnvironment();
    const int device = cuda_device >= 0 ? cuda_device
                                        : (devices > 0 ? (local >= 0 ? local : rank) % devices : 0);
    return epx::bench::RunNcclAllToAll(rank, world, *id, device, sizes);
  }
  // The gloo group of the same ranks, on loopback; rank 0 names the store's directory.
  char dir[256] = {};
  if (rank == 0) {
    const std::string made =
        (std::filesystem::temp_directory_path() / absl::StrCat("epx_gloo_bench_", getpid()))
            .string();
    std::filesystem::create_directories(made);
    std::snprintf(dir, sizeof(dir), "%s", made.c_str());
  }
  MPI_Bcast(dir, sizeof(dir), MPI_CHAR, 0, MPI_COMM_WORLD);
  epx::comm::FileKeyValueStore store(dir);
  auto gloo_created = epx::comm::CreateGlooCommunicator({.rank = rank,
                                                          .world_size = world,
                                                          .store = &store,
                                                          .store_prefix = "bench/",
                                                          .host = "127.0.0.1",
                                                          .connect_timeout = absl::Seconds(60)});
  if (!gloo_created.ok()) {
    std::fprintf(stderr, "comm_alltoall_bench: %s\n", gloo_created.status().ToString().c_str());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  epx::comm::Communicator& gloo = **gloo_created;
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0) std::filesystem::remove_all(dir);
  if (rank == 0) {
    std::printf("# %d ranks (1 coordinator + %d workers); per round trip: coordinator sends "
                "`bytes` to each worker, each worker sends `bytes` back\n",
                world, world - 1);
    std::printf("%12s %14s %12s %12s %15s %13s %13s %14s %12s %12s\n", "bytes",
                "epx_median_us", "epx_p90_us", "epx_GB/s", "gloo_median_us", "gloo_p90_us",
                "gloo_GB/s", "mpi_median_us", "mpi_p90_us", "mpi_GB/s");
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
    std::vector<double> ours, over_gloo, theirs;
    for (int r = 0; r < reps + 5; ++r) {
      const double us = RoundTrip(comm, send, recv, out, in);
      if (r >= 5) ours.push_back(us);
      const double gloo_us = RoundTrip(gloo, send, recv, out, in);
      if (r >= 5) over_gloo.push_back(gloo_us);

      // The same two exchanges with MPI's own collective.
      std::vector<int> zero(world, 0);
      MPI_Barrier(MPI_COMM_WORLD);
      const auto start = std::chrono::steady_clock::now();
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
      using epx::bench::Summarise;
      const epx::bench::Timing a = Summarise(ours), g = Summarise(over_gloo),
                               b = Summarise(theirs);
      const double moved = 2.0 * bytes * (world - 1);
      std::printf("%12lld %14.1f %12.1f %12.3f %15.1f %13.1f %13.3f %14.1f %12.1f %12.3f\n",
                  static_cast<long long>(bytes), a.median_us, a.p90_us, moved / a.median_us / 1e3,
                  g.median_us, g.p90_us, moved / g.median_us / 1e3, b.median_us, b.p90_us,
                  moved / b.median_us / 1e3);
    }
  }
  return 0;
}
