// A cluster formed without a launcher, on loopback: a coordinator and its `epx worker`s as
// separate processes that find each other through registration, with the gloo data plane.
// Results are byte-identical to one process; workers started before the coordinator join;
// whatever does not belong is refused with a message naming it. A worker lost mid-request: with
// replicas every stream completes with the same tokens; without, the request fails naming it,
// and a new worker restores service.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/blocking_counter.h"
#include "common/safetensors.h"
#include "epx/v1/generation.grpc.pb.h"
#include "gtest/gtest.h"
#include "runtime/runtime.h"
#include "tests/coordinator/test_util.h"
#include "tests/serve_util.h"
#include "tests/test_process.h"
#include "worker/control_client.h"

namespace epx {
namespace {

using testing::AwaitHealth;
using testing::ChildProcess;
using testing::Completion;
using testing::EpxBinary;
using testing::FreePort;
using testing::Greedy;
using testing::ServerProcess;
using testing::TestDir;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Waits up to `seconds` for `text` in the process's log.
bool WaitForLog(const ChildProcess& p, const std::string& text, double seconds) {
  for (int i = 0; i < seconds * 20; ++i) {
    if (p.log().find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

std::unique_ptr<ChildProcess> StartWorker(const std::string& dir, const std::string& name,
                                          const std::string& coordinator,
                                          const std::string& extra = "") {
  return std::make_unique<ChildProcess>(
      absl::StrCat(EpxBinary(), " worker --model ", testing::TinyModelDir(), " --coordinator ",
                   coordinator, " ", extra),
      absl::StrCat(dir, "/", name, ".log"));
}

TEST(ClusterTest, GoldenEvalWithWorkersStartedFirstIsByteIdenticalToOneProcess) {
  const std::string dir = TestDir("cluster_eval");
  const int port = FreePort();
  ASSERT_NE(port, 0);
  const std::string coordinator = absl::StrCat("127.0.0.1:", port);
  std::vector<std::unique_ptr<ChildProcess>> workers;
  // One worker names the coordinator "localhost", which may resolve to ::1 first: its data plane
  // must still join the coordinator's IPv4 one.
  const std::string by_name = absl::StrCat("localhost:", port);
  for (int i = 0; i < 3; ++i)
    workers.push_back(
        StartWorker(dir, absl::StrCat("worker", i), i == 0 ? by_name : coordinator));
  // Every worker has tried and found no coordinator before there is one.
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(WaitForLog(*workers[i],
                           "waiting for the coordinator at " + (i == 0 ? by_name : coordinator),
                           60))
        << workers[i]->log();

  const std::string golden = testing::GoldenPath();
  testing::CommandResult cluster = testing::RunCommand(absl::StrCat(
      EpxBinary(), " eval --model ", testing::TinyModelDir(), " --input ", golden, " --output ",
      dir, "/cluster.safetensors --check --workers 3 --listen ", coordinator, " --stats 2>&1"));
  ASSERT_EQ(cluster.exit_code, 0) << cluster.output;
  EXPECT_NE(cluster.output.find("data plane gloo formed with 3 worker(s)"), std::string::npos)
      << cluster.output;
  // Every worker computed rows.
  for (int r = 1; r <= 3; ++r)
    EXPECT_NE(cluster.output.find(absl::StrCat("rank", r, "=")), std::string::npos)
        << cluster.output;
  testing::CommandResult alone = testing::RunCommand(
      absl::StrCat(EpxBinary(), " eval --model ", testing::TinyModelDir(), " --input ", golden,
                   " --output ", dir, "/alone.safetensors 2>&1"));
  ASSERT_EQ(alone.exit_code, 0) << alone.output;
  const std::string expected = ReadFile(dir + "/alone.safetensors");
  ASSERT_FALSE(expected.empty());
  EXPECT_TRUE(ReadFile(dir + "/cluster.safetensors") == expected)
      << "the cluster's eval output differs from the single-process one";
  for (auto& w : workers) {
    EXPECT_EQ(w->Wait(60), 0) << w->log();
    EXPECT_NE(w->log().find("the coordinator ended the job"), std::string::npos) << w->log();
  }
}

TEST(ClusterTest, ServesGoldenGreedyAndRefusesWhatDoesNotBelong) {
  const std::string dir = TestDir("cluster_serve");
  ServerProcess server("cluster_serve", "",
                       "--model " + testing::TinyModelDir() +
                           " --workers 3 --heartbeat-ms 200 --heartbeat-timeout-ms 5000");
  ASSERT_TRUE(server.ok()) << server.log();
  // Listening, not serving: generation says why.
  auto stub = server.generation();
  std::vector<std::vector<int32_t>> greedy;
  std::vector<std::vector<int32_t>> prompts;
  for (const testing::GoldenPrompt& p : testing::ReadGoldenPrompts()) {
    prompts.push_back(p.tokens);
    greedy.push_back(p.greedy);
  }
  ASSERT_FALSE(prompts.empty());
  Completion early = testing::Generate(*stub, Greedy(prompts[0], 2));
  EXPECT_EQ(early.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(early.status.error_message().find("worker 1 has not registered"), std::string::npos)
      << early.status.error_message();
  EXPECT_NE(testing::Health(server).exit_code, 0);

  const std::string coordinator = server.address();
  auto held = StartWorker(dir, "rank2", coordinator, "--rank 2");
  ASSERT_TRUE(WaitForLog(*held, "as worker 2 of 3", 60)) << held->log();
  // A second worker asking for rank 2.
  auto duplicate = StartWorker(dir, "rank2_again", coordinator, "--rank 2");
  EXPECT_EQ(duplicate->Wait(60), 1) << duplicate->log();
  EXPECT_NE(duplicate->log().find("rank 2 is already held by worker 2"), std::string::npos)
      << duplicate->log();
  // A worker that read another config.
  const std::string other = dir + "/other_model";
  ASSERT_EQ(testing::RunCommand(absl::StrCat(EpxBinary(), " make-model --preset tiny --num-layers 1"
                                             " --out ", other, " 2>&1"))
                .exit_code,
            0);
  auto other_config = std::make_unique<ChildProcess>(
      absl::StrCat(EpxBinary(), " worker --model ", other, " --coordinator ", coordinator),
      dir + "/other_config.log");
  EXPECT_EQ(other_config->Wait(60), 1) << other_config->log();
  EXPECT_NE(other_config->log().find("loaded a model config with hash"), std::string::npos)
      << other_config->log();
  // Another build and another data plane, as such a worker would register.
  std::unique_ptr<ControlClient> client = ControlClient::Create(coordinator, "");
  auto config = ModelConfig::FromDir(testing::TinyModelDir());
  ASSERT_TRUE(config.ok());
  WorkerInfo self{.host = "elsewhere", .device = "cpu", .pid = 1, .build_id = "epx-0.0.1-other",
                  .config_hash = config->Hash(), .data_plane = "gloo"};
  absl::StatusOr<Assignment> refused = client->Register(self, absl::Seconds(30));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("runs build epx-0.0.1-other but the coordinator runs " +
                                            BuildId()),
            std::string::npos)
      << refused.status();
  self.build_id = BuildId();
  self.data_plane = "nccl";
  refused = client->Register(self, absl::Seconds(30));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find(
                "uses data plane \"nccl\" but the coordinator uses \"gloo\""),
            std::string::npos)
      << refused.status();

  // The two that complete the cluster.
  auto first = StartWorker(dir, "any1", coordinator);
  auto third = StartWorker(dir, "any2", coordinator);
  testing::CommandResult ready = testing::Health(server, 60);
  ASSERT_EQ(ready.exit_code, 0) << ready.output << server.log();
  // One more joins the running cluster (scale up): it takes a new slot, is given copies of
  // experts, and the data plane re-forms with it between two steps.
  auto extra = StartWorker(dir, "extra", coordinator);
  ASSERT_TRUE(WaitForLog(*extra, "joined the data plane (gloo, epoch 2) as rank 4 of 5", 60))
      << extra->log() << server.log();
  ASSERT_EQ(testing::Health(server, 60).exit_code, 0) << server.log();
  testing::CommandResult placement =
      testing::RunCommand(absl::StrCat(EpxBinary(), " placement --server ", coordinator, " 2>&1"));
  EXPECT_EQ(placement.exit_code, 0) << placement.output;
  EXPECT_NE(placement.output.find("epoch       2 (workers 1, 2, 3, 4)"), std::string::npos)
      << placement.output;
  EXPECT_NE(placement.output.find(", 4]"), std::string::npos) << placement.output;

  for (size_t i = 0; i < prompts.size(); ++i) {
    Completion c = testing::Generate(*stub, Greedy(prompts[i], static_cast<int>(greedy[i].size())));
    ASSERT_TRUE(c.status.ok()) << c.status.error_message();
    EXPECT_EQ(c.tokens, greedy[i]) << "prompt " << i;
  }
  server.Stop();
  EXPECT_EQ(server.Wait(30), 0);
  for (ChildProcess* w : {held.get(), first.get(), third.get(), extra.get()})
    EXPECT_EQ(w->Wait(60), 0) << w->log();
}

// A coordinator told to shut down while it waits for its workers ends cleanly.
TEST(ClusterTest, ShutdownWhileFormingEndsCleanly) {
  ServerProcess server("cluster_forming", "", "--model " + testing::TinyModelDir() + " --workers 2");
  ASSERT_TRUE(server.ok()) << server.log();
  grpc::ClientContext context;
  v1::ShutdownResponse reply;
  ASSERT_TRUE(server.admin()->Shutdown(&context, {}, &reply).ok());
  EXPECT_EQ(server.Wait(30), 0) << server.log();
  EXPECT_NE(server.log().find("shut down before the cluster formed"), std::string::npos)
      << server.log();
}

// Without a replica of its experts, a lost worker fails the request in flight with its rank and
// readiness turns NOT_SERVING, but the coordinator keeps running: a new worker takes the free
// slot, gets the lost one's experts, and the cluster serves the same tokens as one process again.
TEST(ClusterTest, LostWorkerWithoutReplicaStopsServingUntilANewWorkerTakesItsPlace) {
  const std::string dir = TestDir("cluster_kill");
  ServerProcess server("cluster_kill", "",
                       "--model " + testing::TinyModelDir() +
                           " --workers 3 --comm-timeout 10 --heartbeat-ms 200"
                           " --heartbeat-timeout-ms 5000");
  ASSERT_TRUE(server.ok()) << server.log();
  std::vector<std::unique_ptr<ChildProcess>> workers;
  for (int r = 1; r <= 3; ++r)
    workers.push_back(
        StartWorker(dir, absl::StrCat("worker", r), server.address(), absl::StrCat("--rank ", r)));
  ASSERT_EQ(testing::Health(server, 60).exit_code, 0) << server.log();

  // A long request; once it streams, worker 2 dies.
  const testing::GoldenPrompt golden = testing::ReadGoldenPrompts()[0];
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::GenerateRequest request = Greedy(golden.tokens, 200);
  auto stub = server.generation();
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response)) << server.log();
  workers[1]->Signal(SIGKILL);
  int streamed = 1;
  while (reader->Read(&response)) ++streamed;
  const grpc::Status status = reader->Finish();
  EXPECT_LT(streamed, 200);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  // Its closed connection names it at once; if gloo does not see the close, the comm timeout
  // does. Either way the experts it held have no other worker.
  const std::string& message = status.error_message();
  EXPECT_NE(message.find("worker 2 lost"), std::string::npos) << message;
  EXPECT_NE(message.find("has no live worker (it was on worker 2)"), std::string::npos) << message;
  testing::CommandResult health = AwaitHealth(server, "NOT_SERVING", 10);
  EXPECT_NE(health.exit_code, 0);
  EXPECT_NE(health.output.find("NOT_SERVING"), std::string::npos) << health.output;
  EXPECT_EQ(workers[1]->Wait(10), 128 + SIGKILL);
  // Still there, and saying why it does not serve.
  Completion refused = testing::Generate(*stub, Greedy(golden.tokens, 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(refused.status.error_message().find("no live worker"), std::string::npos)
      << refused.status.error_message();

  // A new worker takes the free slot and the lost one's experts.
  auto replacement = StartWorker(dir, "replacement", server.address());
  ASSERT_EQ(testing::Health(server, 60).exit_code, 0) << server.log() << replacement->log();
  EXPECT_NE(replacement->log().find("epoch 2"), std::string::npos) << replacement->log();
  Completion again =
      testing::Generate(*stub, Greedy(golden.tokens, static_cast<int>(golden.greedy.size())));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message() << server.log();
  EXPECT_EQ(again.tokens, golden.greedy);
  testing::CommandResult stats =
      testing::RunCommand(absl::StrCat(EpxBinary(), " stats --server ", server.address(), " 2>&1"));
  EXPECT_EQ(stats.exit_code, 0) << stats.output;
  EXPECT_NE(stats.output.find("epoch 2 of the data plane"), std::string::npos) << stats.output;
  EXPECT_NE(stats.output.find("lost: worker 2"), std::string::npos) << stats.output;
  EXPECT_NE(stats.output.find("joined: worker 2"), std::string::npos) << stats.output;

  server.Stop();
  EXPECT_EQ(server.Wait(30), 0) << server.log();
  for (ChildProcess* w : {workers[0].get(), workers[2].get(), replacement.get()})
    EXPECT_EQ(w->Wait(60), 0) << w->log();
}

// 16 greedy streams of 200 tokens, three workers holding every expert twice: one worker is
// killed (SIGKILL) or stopped (SIGSTOP, found by the comm timeout) once every stream has its
// first token. Every stream completes with the tokens one process gives.
class ReplicaTest : public ::testing::TestWithParam<int> {};

TEST_P(ReplicaTest, LostWorkerLosesNoStreamAndChangesNoToken) {
  const int signal = GetParam();
  const std::string name = signal == SIGKILL ? "replica_kill" : "replica_stop";
  const std::string dir = TestDir(name);
  constexpr int kStreams = 16, kTokens = 200;
  std::vector<v1::GenerateRequest> requests;
  const std::vector<testing::GoldenPrompt> golden = testing::ReadGoldenPrompts();
  for (int i = 0; i < kStreams; ++i) {
    std::vector<int32_t> prompt = golden[i % golden.size()].tokens;
    prompt.push_back(3 + i);  // 16 different prompts
    requests.push_back(Greedy(prompt, kTokens));
  }
  // What one process gives.
  std::vector<std::vector<int32_t>> expected(kStreams);
  {
    ServerProcess alone(name + "_alone", "", "--model " + testing::TinyModelDir());
    ASSERT_TRUE(alone.ok()) << alone.log();
    auto stub = alone.generation();
    for (int i = 0; i < kStreams; ++i) {
      Completion c = testing::Generate(*stub, requests[i]);
      ASSERT_TRUE(c.status.ok()) << c.status.error_message();
      ASSERT_EQ(c.tokens.size(), static_cast<size_t>(kTokens));
      expected[i] = c.tokens;
    }
  }

  ServerProcess server(name, "",
                       "--model " + testing::TinyModelDir() +
                           " --workers 3 --replicas 2 --comm-timeout 3 --heartbeat-ms 200"
                           " --heartbeat-timeout-ms 2000");
  ASSERT_TRUE(server.ok()) << server.log();
  std::vector<std::unique_ptr<ChildProcess>> workers;
  for (int r = 1; r <= 3; ++r)
    workers.push_back(
        StartWorker(dir, absl::StrCat("worker", r), server.address(), absl::StrCat("--rank ", r)));
  ASSERT_EQ(testing::Health(server, 60).exit_code, 0) << server.log();

  auto stub = server.generation();
  absl::BlockingCounter started(kStreams);
  std::vector<Completion> got(kStreams);
  std::vector<std::thread> streams;
  for (int i = 0; i < kStreams; ++i)
    streams.emplace_back([&, i] {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(240));
      auto reader = stub->Generate(&context, requests[i]);
      v1::GenerateResponse response;
      bool first = true;
      while (reader->Read(&response)) {
        got[i].tokens.insert(got[i].tokens.end(), response.token_ids().begin(),
                             response.token_ids().end());
        if (first) started.DecrementCount();
        first = false;
      }
      if (first) started.DecrementCount();
      got[i].status = reader->Finish();
    });
  started.Wait();
  workers[1]->Signal(signal);
  for (std::thread& t : streams) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(got[i].status.ok())
        << "stream " << i << ": " << got[i].status.error_message() << "\n"
        << server.log();
    EXPECT_EQ(got[i].tokens, expected[i]) << "stream " << i;
  }
  EXPECT_EQ(testing::Health(server).exit_code, 0) << server.log();
  testing::CommandResult stats =
      testing::RunCommand(absl::StrCat(EpxBinary(), " stats --server ", server.address(), " 2>&1"));
  EXPECT_EQ(stats.exit_code, 0) << stats.output;
  EXPECT_NE(stats.output.find("lost: worker 2"), std::string::npos) << stats.output;
  EXPECT_NE(stats.output.find("epoch 2: the data plane re-formed with workers 1, 3"),
            std::string::npos)
      << stats.output;
  // Worker 2's experts now live on their other replicas only.
  EXPECT_NE(stats.output.find("expert 0 -> [1]; expert 1 -> [1, 3]; expert 2 -> [3]"),
            std::string::npos)
      << stats.output;

  if (signal == SIGSTOP) {
    // Resumed, it finds itself removed from the cluster and leaves.
    workers[1]->Signal(SIGCONT);
    EXPECT_EQ(workers[1]->Wait(60), 1) << workers[1]->log();
    EXPECT_NE(workers[1]->log().find("was removed from the cluster"), std::string::npos)
        << workers[1]->log();
  } else {
    EXPECT_EQ(workers[1]->Wait(10), 128 + SIGKILL);
  }
  server.Stop();
  EXPECT_EQ(server.Wait(30), 0) << server.log();
  for (int i : {0, 2}) EXPECT_EQ(workers[i]->Wait(60), 0) << workers[i]->log();
}

INSTANTIATE_TEST_SUITE_P(Signals, ReplicaTest, ::testing::Values(SIGKILL, SIGSTOP),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::string(info.param == SIGKILL ? "Kill" : "Stop");
                         });

// Runs `requests` concurrently; calls `during` once every stream has its first token.
std::vector<Completion> RunConcurrently(v1::Generation::Stub& stub,
                                        const std::vector<v1::GenerateRequest>& requests,
                                        const std::function<void()>& during = nullptr) {
  const int n = static_cast<int>(requests.size());
  absl::BlockingCounter started(n);
  std::vector<Completion> got(n);
  std::vector<std::thread> streams;
  for (int i = 0; i < n; ++i)
    streams.emplace_back([&, i] {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(240));
      auto reader = stub.Generate(&context, requests[i]);
      v1::GenerateResponse response;
      bool first = true;
      while (reader->Read(&response)) {
        got[i].tokens.insert(got[i].tokens.end(), response.token_ids().begin(),
                             response.token_ids().end());
        if (first) started.DecrementCount();
        first = false;
      }
      if (first) started.DecrementCount();
      got[i].status = reader->Finish();
    });
  started.Wait();
  if (during) during();
  for (std::thread& t : streams) t.join();
  return got;
}

// What one process answers `requests` with.
std::vector<std::vector<int32_t>> AloneTokens(const std::string& name,
                                              const std::vector<v1::GenerateRequest>& requests) {
  std::vector<std::vector<int32_t>> out;
  ServerProcess alone(name + "_alone", "", "--model " + testing::TinyModelDir());
  EXPECT_TRUE(alone.ok()) << alone.log();
  auto stub = alone.generation();
  for (const v1::GenerateRequest& r : requests) {
    Completion c = testing::Generate(*stub, r);
    EXPECT_TRUE(c.status.ok()) << c.status.error_message();
    out.push_back(c.tokens);
  }
  return out;
}

// A skewed prompt set (one golden prompt with a different last token each).
std::vector<v1::GenerateRequest> SkewedRequests(int n, int tokens) {
  std::vector<v1::GenerateRequest> requests;
  const std::vector<int32_t> prompt = testing::ReadGoldenPrompts()[1].tokens;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p = prompt;
    p.push_back(5 + 7 * i);
    requests.push_back(Greedy(p, tokens));
  }
  return requests;
}

std::string RunOk(const std::string& command) {
  testing::CommandResult r = testing::RunCommand(command + " 2>&1");
  EXPECT_EQ(r.exit_code, 0) << command << "\n" << r.output;
  return r.output;
}

// Waits (bounded) until the placement in use is the one the cluster moves to and the data plane
// is past epoch `epoch`; returns the last `epx placement` output.
std::string AwaitPlacementMoved(const std::string& server, int64_t epoch) {
  std::string out;
  for (int i = 0; i < 300; ++i) {
    out = RunOk(absl::StrCat(EpxBinary(), " placement --server ", server));
    int64_t now = 0;
    if (sscanf(out.c_str(), "epoch %ld", &now) == 1 && now > epoch &&
        out.find("moving to") == std::string::npos)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return out;
}

// The router's load moves hot experts onto more workers while serving, a worker drains, and a
// placement set by hand takes over: no request fails and every token equals one process's.
TEST(ClusterTest, RebalanceDrainAndSetPlacementChangeNoToken) {
  const std::string dir = TestDir("cluster_rebalance");
  const std::vector<v1::GenerateRequest> requests = SkewedRequests(8, 48);
  const std::vector<std::vector<int32_t>> expected = AloneTokens("cluster_rebalance", requests);
  ServerProcess server("cluster_rebalance", "",
                       "--model " + testing::TinyModelDir() +
                           " --workers 3 --rebalance-interval 16 --heartbeat-ms 100"
                           " --heartbeat-timeout-ms 5000");
  ASSERT_TRUE(server.ok()) << server.log();
  std::vector<std::unique_ptr<ChildProcess>> workers;
  for (int r = 1; r <= 3; ++r)
    workers.push_back(
        StartWorker(dir, absl::StrCat("worker", r), server.address(), absl::StrCat("--rank ", r)));
  ASSERT_EQ(testing::Health(server, 60).exit_code, 0) << server.log();
  auto stub = server.generation();
  auto check = [&](const std::vector<Completion>& got, const std::string& round) {
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(got[i].status.ok())
          << round << " stream " << i << ": " << got[i].status.error_message() << "\n"
          << server.log();
      EXPECT_EQ(got[i].tokens, expected[i]) << round << " stream " << i;
    }
  };
  const std::string before =
      RunOk(absl::StrCat(EpxBinary(), " placement --server ", server.address()));

  // Round 1 under rebalancing: the hot experts gain replicas (one spare copy per worker).
  check(RunConcurrently(*stub, requests), "rebalance");
  std::string moved = AwaitPlacementMoved(server.address(), 1);
  EXPECT_NE(moved, before);
  const std::string stats = RunOk(absl::StrCat(EpxBinary(), " stats --server ", server.address()));
  EXPECT_NE(stats.find("re-placement: placement 1 (rebalanced for the load of the last 16 steps"),
            std::string::npos)
      << stats << server.log();
  int64_t copies = 0;
  {
    // 11 copies of 8 experts now: "expert 0 -> [1, 3]" counts two.
    const std::string line = moved.substr(moved.find("placement   "));
    for (size_t at = line.find('['); at != std::string::npos; at = line.find('[', at + 1))
      copies += 1 + std::count(line.begin() + at, line.begin() + line.find(']', at), ',');
  }
  EXPECT_EQ(copies, 11) << moved;

  // Round 2: worker 3 drains while the streams run; it leaves, and the others hold everything.
  check(RunConcurrently(*stub, requests,
                        [&] {
                          RunOk(absl::StrCat(EpxBinary(), " drain --server ", server.address(),
                                             " --rank 3 --wait --timeout 60"));
                        }),
        "drain");
  EXPECT_EQ(workers[2]->Wait(60), 0) << workers[2]->log();
  EXPECT_NE(workers[2]->log().find("leaves"), std::string::npos) << workers[2]->log();
  const std::string drained =
      RunOk(absl::StrCat(EpxBinary(), " placement --server ", server.address()));
  EXPECT_NE(drained.find("(workers 1, 2)"), std::string::npos) << drained;

  // Round 3: a placement set by hand (every expert on both workers), in use before the streams.
  const std::string file = dir + "/both.json";
  std::ofstream(file) << R"({"experts": {"0": [1, 2], "1": [1, 2], "2": [1, 2], "3": [1, 2],
                             "4": [1, 2], "5": [1, 2], "6": [1, 2], "7": [1, 2]}})";
  const std::string set = RunOk(absl::StrCat(EpxBinary(), " placement --server ", server.address(),
                                             " --set ", file, " --wait --timeout 60"));
  EXPECT_NE(set.find("expert 0 -> [1, 2]; expert 1 -> [1, 2]"), std::string::npos) << set;
  EXPECT_EQ(set.find("moving to"), std::string::npos) << set;
  check(RunConcurrently(*stub, requests), "set");
  // ModelInfo reports the placement in use.
  std::string info = RunOk(absl::StrCat(EpxBinary(), " model-info --server ", server.address()));
  info.erase(std::remove_if(info.begin(), info.end(),
                            [](unsigned char c) { return std::isspace(c) != 0; }),
             info.end());
  const std::string all = R"("experts":[0,1,2,3,4,5,6,7])";
  const size_t first = info.find(all);
  ASSERT_NE(first, std::string::npos) << info;
  EXPECT_NE(info.find(all, first + 1), std::string::npos) << info;
  EXPECT_EQ(info.find(R"("rank":3)"), std::string::npos) << info;

  server.Stop();
  EXPECT_EQ(server.Wait(30), 0) << server.log();
  for (int i : {0, 1}) EXPECT_EQ(workers[i]->Wait(60), 0) << workers[i]->log();
}

}  // namespace
}  // namespace epx
