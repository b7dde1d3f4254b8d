// comm_alltoall_bench --backend nccl: one GPU per rank, the same round trip
// (coordinator sends `bytes` to each worker, each sends `bytes` back) through epx's NCCL
// communicator (grouped transfers queued on a stream, then the watchdog's wait) and through
// NCCL's own ncclSend/ncclRecv with a plain stream synchronisation: the library's cost of the
// same bytes, measured in the same run.
#include "bench/comm_alltoall_nccl.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/data_plane.h"
#include "comm/device_communicator.h"
#include "comm/nccl_communicator.h"

namespace epx::bench {
namespace {

void Check(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "comm_alltoall_bench --backend nccl: %s failed\n", what);
  std::exit(1);
}

}  // namespace

int RunNcclAllToAll(int rank, int world, const std::string& unique_id, int cuda_device,
                    const std::vector<int64_t>& sizes) {
  absl::StatusOr<std::unique_ptr<comm::Communicator>> ours =
      comm::CreateNcclCommunicator({.rank = rank,
                                    .world_size = world,
                                    .unique_id = unique_id,
                                    .cuda_device = cuda_device,
                                    .timeout = absl::Seconds(60)});
  if (!ours.ok()) std::fprintf(stderr, "rank %d: %s\n", rank, ours.status().ToString().c_str());
  Check(ours.ok(), "joining epx's NCCL communicator");
  comm::Communicator& host = **ours;
  comm::DeviceCommunicator& dev = *host.device();
  // The ranks line up through the communicator's own host call (no launcher needed).
  auto barrier = [&] {
    char mine = 0;
    std::vector<char> all(world);
    Check(host.AllGather(&mine, 1, all.data(), comm::Tag::kHandshake, absl::Seconds(60), "barrier")
              .ok(),
          "barrier");
  };
  // NCCL's own communicator over the same ranks, for the peer numbers; its id travels over ours.
  ncclUniqueId raw_id;
  if (rank == 0) Check(ncclGetUniqueId(&raw_id) == ncclSuccess, "ncclGetUniqueId");
  Check(
      host.Broadcast(&raw_id, sizeof(raw_id), 0, comm::Tag::kHandshake, absl::Seconds(60), "raw id")
          .ok(),
      "sharing the raw NCCL id");
  ncclComm_t raw;
  Check(ncclCommInitRank(&raw, world, raw_id, rank) == ncclSuccess, "ncclCommInitRank");
  cudaStream_t stream;
  Check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess, "stream");

  if (rank == 0) {
    std::printf(
        "# %d ranks on GPUs (1 coordinator + %d workers); per round trip: coordinator "
        "sends `bytes` to each worker, each worker sends `bytes` back\n",
        world, world - 1);
    std::printf("%12s %14s %12s %12s %15s %13s %13s\n", "bytes", "epx_median_us", "epx_p90_us",
                "epx_GB/s", "nccl_median_us", "nccl_p90_us", "nccl_GB/s");
  }
  using Transfer = comm::DeviceCommunicator::Transfer;
  for (int64_t bytes : sizes) {
    const int reps = bytes >= (1 << 24) ? 20 : 200;
    void* send = nullptr;
    void* recv = nullptr;
    Check(cudaMalloc(&send, bytes * world) == cudaSuccess, "cudaMalloc");
    Check(cudaMalloc(&recv, bytes * world) == cudaSuccess, "cudaMalloc");
    auto at = [&](void* base, int p) { return static_cast<char*>(base) + p * bytes; };
    std::vector<Transfer> out, back;
    std::vector<int> peers;
    for (int p = 0; p < world; ++p) {
      if ((rank == 0) == (p == 0)) continue;  // the coordinator and each worker
      out.push_back({.is_send = rank == 0,
                     .peer = p,
                     .data = at(rank == 0 ? send : recv, p),
                     .bytes = bytes});
      back.push_back({.is_send = rank != 0,
                      .peer = p,
                      .data = at(rank == 0 ? recv : send, p),
                      .bytes = bytes});
      peers.push_back(p);
    }
    std::vector<double> epx_us, nccl_us;
    for (int r = 0; r < reps + 5; ++r) {
      barrier();
      auto start = std::chrono::steady_clock::now();
      Check(dev.Post(out, stream, "bench dispatch").ok(), "Post");
      Check(dev.Post(back, stream, "bench combine").ok(), "Post");
      Check(dev.Synchronize(stream, absl::Seconds(60), peers, "bench").ok(), "Synchronize");
      const double a =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
              .count();
      barrier();
      start = std::chrono::steady_clock::now();
      for (const std::vector<Transfer>* group : {&out, &back}) {
        ncclGroupStart();
        for (const Transfer& t : *group) {
          if (t.is_send)
            ncclSend(t.data, bytes, ncclUint8, t.peer, raw, stream);
          else
            ncclRecv(t.data, bytes, ncclUint8, t.peer, raw, stream);
        }
        Check(ncclGroupEnd() == ncclSuccess, "ncclGroupEnd");
      }
      Check(cudaStreamSynchronize(stream) == cudaSuccess, "cudaStreamSynchronize");
      const double b =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
              .count();
      if (r >= 5) {
        epx_us.push_back(a);
        nccl_us.push_back(b);
      }
    }
    if (rank == 0) {
      const double moved = 2.0 * bytes * (world - 1);
      const Timing a = Summarise(epx_us), b = Summarise(nccl_us);
      std::printf("%12lld %14.1f %12.1f %12.3f %15.1f %13.1f %13.3f\n",
                  static_cast<long long>(bytes), a.median_us, a.p90_us,
                  moved / a.median_us / 1e3, b.median_us, b.p90_us,
                  moved / b.median_us / 1e3);
    }
    cudaFree(send);
    cudaFree(recv);
  }
  ncclCommDestroy(raw);
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace epx::bench
