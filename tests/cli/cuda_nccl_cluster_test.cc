// gpu: a CUDA coordinator and a CUDA worker over the NCCL data plane, as two `epx` processes of a
// launcher-free cluster on one GPU (each with its own NCCL_HOSTID, which NCCL needs to take two
// ranks on one device; the tests skip, saying so, where it still refuses). The golden eval is
// within the bf16 tolerance of the CPU oracle exactly where the single-GPU eval is, and a worker
// killed mid-request fails the request with UNAVAILABLE naming it within the comm timeout.
// Skips without a device or an NCCL build.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "comm/nccl_communicator.h"
#include "epx/v1/generation.grpc.pb.h"
#include "gtest/gtest.h"
#include "kernels/cuda/runtime.h"
#include "tests/coordinator/test_util.h"
#include "tests/serve_util.h"
#include "tests/test_process.h"

namespace epx {
namespace {

using testing::ChildProcess;
using testing::EpxBinary;
using testing::TestDir;

constexpr const char* kBf16Tolerance = "3e-2";

bool HaveNcclDevice() { return comm::NcclBuilt() && cuda::DeviceCount() > 0; }

std::unique_ptr<ChildProcess> StartCudaWorker(const std::string& dir, const std::string& address) {
  return std::make_unique<ChildProcess>(
      absl::StrCat("env NCCL_HOSTID=epx-test-worker ", EpxBinary(), " worker --model ",
                   testing::TinyModelDir(), " --coordinator ", address,
                   " --device cuda --data-plane nccl --rank 1"),
      dir + "/worker.log");
}

bool DuplicateGpu(const std::string& log) { return log.find("Duplicate GPU") != std::string::npos; }

TEST(NcclClusterTest, GoldenEvalWithinTheBf16ToleranceAsOnOneGpu) {
  if (!HaveNcclDevice()) GTEST_SKIP() << "needs a CUDA device and an NCCL build";
  const std::string dir = TestDir("nccl_eval");
  const std::string check =
      absl::StrCat(" --input ", testing::GoldenPath(), " --check --tolerance ", kBf16Tolerance);
  testing::CommandResult alone = testing::RunCommand(
      absl::StrCat(EpxBinary(), " eval --model ", testing::TinyModelDir(), check, " --output ", dir,
                   "/alone.safetensors --device cuda 2>&1"));
  ASSERT_EQ(alone.exit_code, 0) << "the single-GPU eval itself fails:\n" << alone.output;

  // The worker starts first and waits for the coordinator.
  const int port = testing::FreePort();
  ASSERT_NE(port, 0);
  const std::string address = absl::StrCat("127.0.0.1:", port);
  std::unique_ptr<ChildProcess> worker = StartCudaWorker(dir, address);
  testing::CommandResult cluster = testing::RunCommand(
      absl::StrCat("env NCCL_HOSTID=epx-test-coordinator ", EpxBinary(), " eval --model ",
                   testing::TinyModelDir(), check, " --output ", dir,
                   "/cluster.safetensors --device cuda --data-plane nccl --workers 1 --listen ",
                   address, " --stats 2>&1"));
  if (cluster.exit_code != 0 && (DuplicateGpu(cluster.output) || DuplicateGpu(worker->log())))
    GTEST_SKIP() << "NCCL refuses two ranks on one GPU even with distinct NCCL_HOSTID:\n"
                 << cluster.output << "\nworker:\n"
                 << worker->log();
  ASSERT_EQ(cluster.exit_code, 0) << cluster.output << "\nworker:\n" << worker->log();
  EXPECT_NE(cluster.output.find("data plane nccl formed with 1 worker(s)"), std::string::npos)
      << cluster.output;
  EXPECT_NE(cluster.output.find("check passed"), std::string::npos) << cluster.output;
  EXPECT_NE(cluster.output.find("rank1="), std::string::npos) << cluster.output;
  EXPECT_EQ(worker->Wait(60), 0) << worker->log();
}

TEST(NcclClusterTest, KilledWorkerIsUnavailableWithinTheTimeoutAndNothingHangs) {
  if (!HaveNcclDevice()) GTEST_SKIP() << "needs a CUDA device and an NCCL build";
  const std::string dir = TestDir("nccl_kill");
  testing::ServerProcess server("nccl_kill", "env NCCL_HOSTID=epx-test-coordinator",
                                "--model " + testing::TinyModelDir() +
                                    " --device cuda --data-plane nccl --workers 1"
                                    " --comm-timeout 10 --failure-grace-s 2");
  ASSERT_TRUE(server.ok()) << server.log();
  std::unique_ptr<ChildProcess> worker = StartCudaWorker(dir, server.address());
  const testing::CommandResult health = testing::Health(server, 120);
  if (health.exit_code != 0 && DuplicateGpu(worker->log()))
    GTEST_SKIP() << "NCCL refuses two ranks on one GPU:\n" << worker->log();
  ASSERT_EQ(health.exit_code, 0) << server.log() << "\nworker:\n" << worker->log();

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::GenerateRequest request = testing::Greedy(testing::ReadGoldenPrompts()[0].tokens, 4000);
  request.set_max_tokens(2000);
  auto stub = server.generation();
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response)) << server.log();
  worker->Signal(SIGKILL);
  const auto killed = std::chrono::steady_clock::now();
  while (reader->Read(&response)) {
  }
  const grpc::Status status = reader->Finish();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_NE(status.error_message().find("rank 1"), std::string::npos) << status.error_message();
  EXPECT_NE(status.error_message().find("layer"), std::string::npos) << status.error_message();
  // The watchdog's limit is the comm timeout; the ctest TIMEOUT catches a hang.
  EXPECT_LT(seconds, 60) << status.error_message();
  EXPECT_EQ(server.Wait(60), 1) << server.log();
}

}  // namespace
}  // namespace epx
