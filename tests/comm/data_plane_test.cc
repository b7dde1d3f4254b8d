// The data-plane factory's host-side logic: how --data-plane resolves on each rank, and how the
// NCCL unique id reaches the ranks (the coordinator's store without a launcher, a broadcast over
// the launcher's communicator with one). The NCCL exchanges themselves are gpu tests
// (tests/comm/nccl_communicator_test.cc).
#include "comm/data_plane.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/inproc_communicator.h"
#include "comm/nccl_communicator.h"
#include "kernels/cuda/runtime.h"

namespace epx::comm {
namespace {

TEST(DataPlaneTest, AutoResolvesByLauncherAndDevice) {
  EXPECT_EQ(ResolveDataPlane("auto", true, false).value_or(""), "mpi");
  EXPECT_EQ(ResolveDataPlane("auto", false, false).value_or(""), "gloo");
  // On a GPU, auto is NCCL where the build has it, and the host planes otherwise.
  EXPECT_EQ(ResolveDataPlane("auto", true, true).value_or(""), NcclBuilt() ? "nccl" : "mpi");
  EXPECT_EQ(ResolveDataPlane("auto", false, true).value_or(""), NcclBuilt() ? "nccl" : "gloo");
  EXPECT_EQ(ResolveDataPlane("gloo", false, true).value_or(""), "gloo");
  EXPECT_EQ(ResolveDataPlane("mpi", true, true).value_or(""), "mpi");
}

TEST(DataPlaneTest, RefusesWhatCannotWorkHere) {
  EXPECT_EQ(ResolveDataPlane("mpi", false, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ResolveDataPlane("gloo", true, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::string> cpu = ResolveDataPlane("nccl", false, false);
  EXPECT_EQ(cpu.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(cpu.status().message().find("--device cuda"), std::string::npos) << cpu.status();
  absl::StatusOr<std::string> gpu = ResolveDataPlane("nccl", true, true);
  if (NcclBuilt()) {
    EXPECT_EQ(gpu.value_or(""), "nccl");
  } else {
    EXPECT_EQ(gpu.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(gpu.status().message().find("without NCCL"), std::string::npos) << gpu.status();
  }
  absl::StatusOr<std::string> bad = ResolveDataPlane("tcp", false, false);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("auto, mpi, gloo or nccl"), std::string::npos);
}

TEST(DataPlaneTest, UniqueIdThroughTheStoreIsDrawnOnceByRankZero) {
  MemoryKeyValueStore store;
  int drawn = 0;
  const NewIdFn new_id = [&]() -> absl::StatusOr<std::string> {
    ++drawn;
    return std::string("id-of-rank-0");
  };
  // Workers that ask first wait for it.
  std::vector<std::string> got(3);
  std::vector<std::thread> workers;
  for (int r = 1; r <= 2; ++r)
    workers.emplace_back([&, r] {
      got[r] = ShareNcclUniqueId(store, "nccl/epoch-1/", r, absl::Seconds(60), new_id).value_or("");
    });
  got[0] = ShareNcclUniqueId(store, "nccl/epoch-1/", 0, absl::Seconds(60), new_id).value_or("");
  for (std::thread& t : workers) t.join();
  EXPECT_EQ(drawn, 1);
  for (const std::string& id : got) EXPECT_EQ(id, "id-of-rank-0");
  // Another epoch is another key: a worker of epoch 2 does not take epoch 1's id.
  absl::StatusOr<std::string> late =
      ShareNcclUniqueId(store, "nccl/epoch-2/", 1, absl::ZeroDuration(), new_id);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded) << late.status();
  EXPECT_NE(late.status().message().find("NCCL unique id"), std::string::npos) << late.status();
}

TEST(DataPlaneTest, UniqueIdFailureOnRankZeroReachesEveryRank) {
  MemoryKeyValueStore store;
  const NewIdFn fails = [] {
    return absl::StatusOr<std::string>(absl::InternalError("no socket"));
  };
  EXPECT_EQ(ShareNcclUniqueId(store, "p/", 0, absl::Seconds(1), fails).status().code(),
            absl::StatusCode::kInternal);
}

TEST(DataPlaneTest, UniqueIdOverTheLaunchersCommunicator) {
  InProcGroup group(3);
  std::vector<absl::StatusOr<std::string>> got(3, std::string());
  std::vector<std::thread> ranks;
  for (int r = 0; r < 3; ++r)
    ranks.emplace_back([&, r] {
      std::unique_ptr<Communicator> comm = group.Join(r);
      got[r] =
          BroadcastNcclUniqueId(*comm, absl::Seconds(60), [r]() -> absl::StatusOr<std::string> {
            return std::string(128, static_cast<char>(r == 0 ? 'x' : 'y'));
          });
    });
  for (std::thread& t : ranks) t.join();
  for (int r = 0; r < 3; ++r) EXPECT_EQ(got[r].value_or(""), std::string(128, 'x')) << r;
}

TEST(DataPlaneTest, UniqueIdOverTheLaunchersCommunicatorWhenRankZeroFails) {
  InProcGroup group(2);
  std::vector<absl::Status> got(2);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r)
    ranks.emplace_back([&, r] {
      std::unique_ptr<Communicator> comm = group.Join(r);
      got[r] = BroadcastNcclUniqueId(*comm, absl::Seconds(60), [] {
                 return absl::StatusOr<std::string>(absl::InternalError("ncclGetUniqueId failed"));
               }).status();
    });
  for (std::thread& t : ranks) t.join();
  EXPECT_EQ(got[0].code(), absl::StatusCode::kInternal) << got[0];
  EXPECT_EQ(got[1].code(), absl::StatusCode::kUnavailable) << got[1];
  EXPECT_NE(got[1].message().find("rank 0"), std::string::npos) << got[1];
}

TEST(DataPlaneTest, UniqueIdThroughAFileStore) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/file_store_", getpid());
  std::filesystem::create_directories(dir);
  FileKeyValueStore store(dir);
  std::string worker;
  std::thread waiting([&] {
    worker = ShareNcclUniqueId(store, "nccl/epoch-1/", 1, absl::Seconds(60), nullptr).value_or("");
  });
  const NewIdFn new_id = [] { return absl::StatusOr<std::string>(std::string(128, 'z')); };
  EXPECT_EQ(ShareNcclUniqueId(store, "nccl/epoch-1/", 0, absl::Seconds(60), new_id).value_or(""),
            std::string(128, 'z'));
  waiting.join();
  EXPECT_EQ(worker, std::string(128, 'z'));
  const absl::StatusOr<std::string> missing = store.Get("other", absl::ZeroDuration());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(missing.status().message().find("other"), std::string::npos) << missing.status();
  std::filesystem::remove_all(dir);
}

TEST(DataPlaneTest, NcclWithoutADeviceIsAClearError) {
  if (NcclBuilt() && cuda::DeviceCount() > 0) GTEST_SKIP() << "a CUDA device is visible";
  MemoryKeyValueStore store;
  DataPlaneOptions options{.name = "nccl"};
  options.gloo = {.rank = 0, .world_size = 2, .store = &store, .store_prefix = "nccl/"};
  absl::StatusOr<std::unique_ptr<Communicator>> comm = CreateDataPlane(options);
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kFailedPrecondition) << comm.status();
  EXPECT_NE(comm.status().message().find(NcclBuilt() ? "CUDA device" : "without NCCL"),
            std::string::npos)
      << comm.status();
}

}  // namespace
}  // namespace epx::comm
