// gpu: a CUDA coordinator and a CUDA worker over the NCCL data plane, as two `epx` processes of a
// launcher-free cluster on one GPU (each with its own NCCL_HOSTID, which NCCL needs to take two
// ranks on one device; the tests skip, saying so, where it still refuses). The golden eval is
// within the bf16 tolerance of the CPU oracle exactly where the single-GPU eval is. A launcher-free
// NCCL cluster re-forms as a gloo one does (docs/ARCHITECTURE.md, "Losing and gaining workers"):
// without a replica a killed worker fails the request naming it, the coordinator keeps running
// NOT_SERVING and a new worker brings it back; with every expert on two workers a killed worker
// changes no token of a stream. Skips without a device or an NCCL build.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

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

// `host_id`: NCCL's host hash, distinct per process so that NCCL takes them all on one GPU.
std::unique_ptr<ChildProcess> StartCudaWorker(const std::string& dir, const std::string& address,
                                              const std::string& host_id = "epx-test-worker",
                                              const std::string& extra = "--rank 1") {
  return std::make_unique<ChildProcess>(
      absl::StrCat("env NCCL_HOSTID=", host_id, " ", EpxBinary(), " worker --model ",
                   testing::TinyModelDir(), " --coordinator ", address,
                   " --device cuda --data-plane nccl ", extra),
      dir + "/" + host_id + ".log");
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

// The tokens of `request` on `server`.
std::vector<int32_t> Tokens(testing::ServerProcess& server, const v1::GenerateRequest& request) {
  auto stub = server.generation();
  testing::Completion c = testing::Generate(*stub, request);
  EXPECT_TRUE(c.status.ok()) << c.status.error_message() << "\n" << server.log();
  return c.tokens;
}

// Streams `request`, sends `signal` to `victim` once the first tokens arrived, and returns how
// the stream ended.
testing::Completion StreamAndSignal(testing::ServerProcess& server,
                                    const v1::GenerateRequest& request, ChildProcess& victim,
                                    int signal) {
  testing::Completion c;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(240));
  auto stub = server.generation();
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  bool signalled = false;
  while (reader->Read(&response)) {
    c.tokens.insert(c.tokens.end(), response.token_ids().begin(), response.token_ids().end());
    if (!signalled) victim.Signal(signal);
    signalled = true;
  }
  c.status = reader->Finish();
  return c;
}

TEST(NcclClusterTest, LostWorkerWithoutReplicaStopsServingUntilANewWorkerTakesItsPlace) {
  if (!HaveNcclDevice()) GTEST_SKIP() << "needs a CUDA device and an NCCL build";
  const std::string dir = TestDir("nccl_kill");
  testing::ServerProcess server("nccl_kill", "env NCCL_HOSTID=epx-test-coordinator",
                                "--model " + testing::TinyModelDir() +
                                    " --device cuda --data-plane nccl --workers 1"
                                    " --comm-timeout 10 --heartbeat-ms 200"
                                    " --heartbeat-timeout-ms 5000");
  ASSERT_TRUE(server.ok()) << server.log();
  std::unique_ptr<ChildProcess> worker = StartCudaWorker(dir, server.address());
  const testing::CommandResult health = testing::Health(server, 120);
  if (health.exit_code != 0 && DuplicateGpu(worker->log()))
    GTEST_SKIP() << "NCCL refuses two ranks on one GPU:\n" << worker->log();
  ASSERT_EQ(health.exit_code, 0) << server.log() << "\nworker:\n" << worker->log();
  const testing::GoldenPrompt golden = testing::ReadGoldenPrompts()[0];
  const v1::GenerateRequest short_request = testing::Greedy(golden.tokens, 32);
  const std::vector<int32_t> before = Tokens(server, short_request);
  ASSERT_EQ(before.size(), 32u);

  const auto killed = std::chrono::steady_clock::now();
  testing::Completion cut =
      StreamAndSignal(server, testing::Greedy(golden.tokens, 2000), *worker, SIGKILL);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  EXPECT_LT(cut.tokens.size(), 2000u);
  EXPECT_EQ(cut.status.error_code(), grpc::StatusCode::UNAVAILABLE) << cut.status.error_message();
  EXPECT_NE(cut.status.error_message().find("(it was on worker 1)"), std::string::npos)
      << cut.status.error_message();
  // The watchdog's limit is the comm timeout; the ctest TIMEOUT catches a hang.
  EXPECT_LT(seconds, 60) << cut.status.error_message();
  const testing::CommandResult down = testing::AwaitHealth(server, "NOT_SERVING", 30);
  EXPECT_NE(down.output.find("NOT_SERVING"), std::string::npos) << down.output;
  EXPECT_EQ(worker->Wait(10), 128 + SIGKILL);

  // A new worker (another NCCL host id) takes the free slot; the data plane forms anew.
  std::unique_ptr<ChildProcess> replacement =
      StartCudaWorker(dir, server.address(), "epx-test-replacement", "");
  ASSERT_EQ(testing::Health(server, 120).exit_code, 0) << server.log() << replacement->log();
  EXPECT_NE(replacement->log().find("epoch 2"), std::string::npos) << replacement->log();
  EXPECT_EQ(Tokens(server, short_request), before);
  server.Stop();
  EXPECT_EQ(server.Wait(60), 0) << server.log();
  EXPECT_EQ(replacement->Wait(60), 0) << replacement->log();
}

// Two workers holding every expert: one killed mid-stream (its peers' NCCL waits end through the
// heartbeat's left_epoch), the other serves on, and the stream's tokens equal those of a stream
// during which nothing failed.
TEST(NcclClusterTest, LostWorkerWithAReplicaChangesNoToken) {
  if (!HaveNcclDevice()) GTEST_SKIP() << "needs a CUDA device and an NCCL build";
  const std::string dir = TestDir("nccl_replica");
  testing::ServerProcess server("nccl_replica", "env NCCL_HOSTID=epx-test-coordinator",
                                "--model " + testing::TinyModelDir() +
                                    " --device cuda --data-plane nccl --workers 2 --replicas 2"
                                    " --comm-timeout 5 --heartbeat-ms 200"
                                    " --heartbeat-timeout-ms 3000");
  ASSERT_TRUE(server.ok()) << server.log();
  std::unique_ptr<ChildProcess> first =
      StartCudaWorker(dir, server.address(), "epx-test-worker1", "--rank 1");
  std::unique_ptr<ChildProcess> second =
      StartCudaWorker(dir, server.address(), "epx-test-worker2", "--rank 2");
  const testing::CommandResult health = testing::Health(server, 120);
  if (health.exit_code != 0 && (DuplicateGpu(first->log()) || DuplicateGpu(second->log())))
    GTEST_SKIP() << "NCCL refuses three ranks on one GPU:\n" << first->log();
  ASSERT_EQ(health.exit_code, 0) << server.log() << "\nworkers:\n" << first->log() << second->log();
  const v1::GenerateRequest request = testing::Greedy(testing::ReadGoldenPrompts()[1].tokens, 300);
  const std::vector<int32_t> expected = Tokens(server, request);
  ASSERT_EQ(expected.size(), 300u);

  testing::Completion got = StreamAndSignal(server, request, *second, SIGKILL);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message() << "\n" << server.log();
  EXPECT_EQ(got.tokens, expected);
  EXPECT_EQ(testing::Health(server).exit_code, 0) << server.log();
  testing::CommandResult stats =
      testing::RunCommand(absl::StrCat(EpxBinary(), " stats --server ", server.address(), " 2>&1"));
  EXPECT_NE(stats.output.find("lost: worker 2"), std::string::npos) << stats.output;
  EXPECT_NE(stats.output.find("epoch 2: the data plane re-formed with worker 1"), std::string::npos)
      << stats.output;
  EXPECT_NE(first->log().find("epoch 2"), std::string::npos) << first->log();
  EXPECT_EQ(second->Wait(10), 128 + SIGKILL);
  server.Stop();
  EXPECT_EQ(server.Wait(60), 0) << server.log();
  EXPECT_EQ(first->Wait(60), 0) << first->log();
}

}  // namespace
}  // namespace epx
