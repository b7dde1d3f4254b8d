// Expert parallelism with ranks as threads (comm::InProcGroup): the real Runtime, handshake,
// distributed executor and worker loop. Outputs must be bitwise identical to the single-process
// engine for any worker count and placement; failures must name the rank.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <set>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "cli/commands.h"
#include "runtime/runtime.h"
#include "comm/inproc_communicator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "worker/expert_worker.h"
#include "tests/coordinator/test_util.h"

namespace epx {
namespace {

using testing::GoldenPath;
using ::testing::HasSubstr;
using testing::ReadVector;
using testing::TinyModelDir;

// Logits of the three golden prompts: one batched prefill, then `steps` batched greedy steps.
absl::StatusOr<std::vector<float>> RunPrompts(Engine& engine, int steps, int64_t seq_base = 0) {
  auto golden = SafetensorsFile::Open(GoldenPath());
  if (!golden.ok()) return golden.status();
  std::vector<std::vector<int32_t>> tokens;
  for (int i = 0; i < 3; ++i)
    tokens.push_back(ReadVector<int32_t>(**golden, "prompt_" + std::to_string(i) + ".tokens"));
  const int64_t vocab = engine.config().vocab_size;
  std::vector<float> all;
  std::vector<SequenceInput> batch;
  for (int i = 0; i < 3; ++i) {
    EPX_RETURN_IF_ERROR(engine.AddSequence(seq_base + i));
    batch.push_back({seq_base + i, tokens[i], true});
  }
  std::vector<int32_t> next(3);
  for (int s = 0; s <= steps; ++s) {
    EPX_ASSIGN_OR_RETURN(Tensor logits, engine.Step(batch));
    all.insert(all.end(), logits.data<float>(), logits.data<float>() + logits.numel());
    for (int i = 0; i < 3; ++i) {
      const float* last = logits.data<float>() + (logits.dim(0) - 3 + i) * vocab;
      next[i] = cpu::ArgMax({last, static_cast<size_t>(vocab)});
    }
    batch.clear();
    for (int i = 0; i < 3; ++i)
      batch.push_back({seq_base + i, absl::MakeConstSpan(&next[i], 1), false});
  }
  return all;
}

struct ClusterResult {
  absl::Status coordinator;
  std::vector<float> logits;
  std::vector<absl::Status> ranks;     // Start/serve status of every rank
  std::vector<uint64_t> bytes_mapped;   // per rank
  std::vector<int64_t> worker_tokens;   // rows each rank received (coordinator's counters)
};

// Runs a job of 1 + workers ranks as threads. `tweak(rank, options)` may change a rank's
// options; `silent` ranks start (handshake) but never serve.
ClusterResult RunCluster(int workers, const std::string& placement, int steps,
                         std::function<void(int, RuntimeOptions&)> tweak = nullptr,
                         std::set<int> silent = {}, absl::Duration timeout = absl::Seconds(30),
                         std::function<void(comm::InProcGroup&)> after_first_step = nullptr) {
  const int world = workers + 1;
  comm::InProcGroup group(world);
  ClusterResult result;
  result.ranks.resize(world);
  result.bytes_mapped.resize(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      std::unique_ptr<comm::Communicator> comm = group.Join(r);
      RuntimeOptions options;
      options.model_dir = TinyModelDir();
      options.placement = placement;
      options.comm = comm.get();
      options.comm_timeout = timeout;
      if (tweak) tweak(r, options);
      auto rt = Runtime::Start(options);
      if (!rt.ok()) {
        result.ranks[r] = rt.status();
        return;
      }
      result.bytes_mapped[r] = (*rt)->weights()->bytes_mapped();
      if ((*rt)->is_worker()) {
        if (silent.count(r)) {
          while (!group.aborted()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
          result.ranks[r] = absl::AbortedError("silent");
          return;
        }
        result.ranks[r] = (*rt)->ServeAsWorker();
        return;
      }
      absl::StatusOr<std::vector<float>> logits;
      if (after_first_step) {
        logits = RunPrompts((*rt)->engine(), 0);
        after_first_step(group);
        if (logits.ok()) logits = RunPrompts((*rt)->engine(), steps, /*seq_base=*/10);
      } else {
        logits = RunPrompts((*rt)->engine(), steps);
      }
      if (logits.ok()) result.logits = *logits;
      result.worker_tokens = (*rt)->expert_parallel_stats()->worker_tokens;
      result.coordinator = (*rt)->Finish(logits.status());
      result.ranks[0] = result.coordinator;
    });
  }
  for (auto& t : threads) t.join();
  return result;
}

std::vector<float> SingleProcessLogits(int steps) {
  RuntimeOptions options;
  options.model_dir = TinyModelDir();
  auto rt = Runtime::Start(options);
  EXPECT_TRUE(rt.ok()) << rt.status();
  auto logits = RunPrompts((*rt)->engine(), steps);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return *logits;
}

bool BitwiseEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

constexpr int kSteps = 6;

class WorkerCountTest : public ::testing::TestWithParam<int> {};

TEST_P(WorkerCountTest, BitwiseIdenticalToSingleProcess) {
  const std::vector<float> want = SingleProcessLogits(kSteps);
  ClusterResult got = RunCluster(GetParam(), "round-robin", kSteps);
  for (size_t r = 0; r < got.ranks.size(); ++r)
    EXPECT_TRUE(got.ranks[r].ok()) << r << ": " << got.ranks[r];
  EXPECT_TRUE(BitwiseEqual(got.logits, want));
  // Every worker took part, replicas included (W = 11 > 8 experts).
  ASSERT_EQ(got.worker_tokens.size(), static_cast<size_t>(GetParam() + 1));
  for (int w = 1; w <= GetParam(); ++w) EXPECT_GT(got.worker_tokens[w], 0) << "rank " << w;
}

// W < E, W = E, W > E (replicas), with decode steps where most workers get no rows.
INSTANTIATE_TEST_SUITE_P(Workers, WorkerCountTest, ::testing::Values(1, 2, 3, 8, 11));

TEST(ExpertParallelTest, PlacementFileWithReplicasIsBitwiseIdentical) {
  const std::string path =
      (std::filesystem::path(::testing::TempDir()) / "epx_placement.json").string();
  std::ofstream(path) << R"({"experts": {"0": [1, 2, 3], "1": [2], "2": [3], "3": [1, 3],
                             "4": [1], "5": [2], "6": [3], "7": [1, 2]}})";
  ClusterResult got = RunCluster(3, path, kSteps);
  ASSERT_TRUE(got.coordinator.ok()) << got.coordinator;
  EXPECT_TRUE(BitwiseEqual(got.logits, SingleProcessLogits(kSteps)));
  std::filesystem::remove(path);
}

TEST(ExpertParallelTest, EachRankMapsOnlyItsRolesTensors) {
  ClusterResult got = RunCluster(3, "round-robin", 0);
  ASSERT_TRUE(got.coordinator.ok()) << got.coordinator;
  auto config = ModelConfig::FromDir(TinyModelDir());
  ASSERT_TRUE(config.ok());
  const uint64_t per_expert = 3ull * config->hidden_size * config->intermediate_size * 2 *
                              config->num_hidden_layers;  // bf16 w1, w2, w3 in every layer
  uint64_t total = 0;
  auto all = SafetensorsFile::Open(TinyModelDir() + "/model.safetensors");
  ASSERT_TRUE(all.ok());
  for (const auto& e : (*all)->entries()) total += e.end - e.begin;
  // Round-robin over 3 workers: 3, 3 and 2 of the 8 experts.
  EXPECT_EQ(got.bytes_mapped[1], 3 * per_expert);
  EXPECT_EQ(got.bytes_mapped[2], 3 * per_expert);
  EXPECT_EQ(got.bytes_mapped[3], 2 * per_expert);
  EXPECT_EQ(got.bytes_mapped[0], total - 8 * per_expert);
}

TEST(ExpertParallelTest, ConfigMismatchStopsEveryRankNamingIt) {
  const std::string other = (std::filesystem::path(::testing::TempDir()) / "epx_other").string();
  MakeModelOptions mm;
  mm.preset = "tiny";
  mm.num_layers = 2;
  mm.out_dir = other;
  std::ostringstream log;
  ASSERT_TRUE(RunMakeModel(mm, log).ok());
  ClusterResult got = RunCluster(2, "round-robin", 0, [&](int rank, RuntimeOptions& o) {
    if (rank == 2) o.model_dir = other;
  });
  for (size_t r = 0; r < got.ranks.size(); ++r) {
    EXPECT_EQ(got.ranks[r].code(), absl::StatusCode::kFailedPrecondition) << got.ranks[r];
    EXPECT_THAT(std::string(got.ranks[r].message()), HasSubstr("rank 2")) << got.ranks[r];
  }
  std::filesystem::remove_all(other);
}

TEST(ExpertParallelTest, AWorkerThatCannotLoadItsExpertsStopsEveryRankNamingIt) {
  // Same config (the handshake passes), but expert 1's w1 of layer 0 is missing: rank 2 of a
  // round-robin over 2 workers holds experts 1, 3, 5, 7.
  const std::string broken = (std::filesystem::path(::testing::TempDir()) / "epx_broken").string();
  std::filesystem::create_directories(broken);
  std::filesystem::copy_file(TinyModelDir() + "/config.json", broken + "/config.json",
                             std::filesystem::copy_options::overwrite_existing);
  auto full = SafetensorsFile::Open(TinyModelDir() + "/model.safetensors");
  ASSERT_TRUE(full.ok());
  const std::string missing = "model.layers.0.block_sparse_moe.experts.1.w1.weight";
  std::vector<std::pair<std::string, TensorView>> kept;
  for (const auto& e : (*full)->entries())
    if (e.name != missing) kept.emplace_back(e.name, *(*full)->Get(e.name));
  ASSERT_TRUE(WriteSafetensors(broken + "/model.safetensors", kept).ok());
  ClusterResult got = RunCluster(2, "round-robin", 0, [&](int rank, RuntimeOptions& o) {
    if (rank == 2) o.model_dir = broken;
  });
  for (size_t r = 0; r < got.ranks.size(); ++r) {
    EXPECT_EQ(got.ranks[r].code(), absl::StatusCode::kNotFound) << got.ranks[r];
    EXPECT_THAT(std::string(got.ranks[r].message()),
                HasSubstr("rank 2 failed at loading its weights"));
    EXPECT_THAT(std::string(got.ranks[r].message()), HasSubstr(missing));
  }
  std::filesystem::remove_all(broken);
}

TEST(ExpertParallelTest, RoleMismatchNamesTheRank) {
  ClusterResult got = RunCluster(2, "round-robin", 0, [](int rank, RuntimeOptions& o) {
    if (rank == 1) o.role = "coordinator";
  });
  EXPECT_THAT(std::string(got.ranks[0].message()), HasSubstr("rank 1 started as coordinator"));
}

TEST(ExpertParallelTest, BadPlacementFileIsRejectedEverywhere) {
  const std::string path =
      (std::filesystem::path(::testing::TempDir()) / "epx_bad_placement.json").string();
  std::ofstream(path) << R"({"experts": {"0": [1], "1": [4]}})";
  ClusterResult got = RunCluster(2, path, 0);
  for (const absl::Status& s : got.ranks) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(path));
  }
  std::filesystem::remove(path);
}

TEST(ExpertParallelTest, LostWorkerFailsTheStepNamingIt) {
  ClusterResult got = RunCluster(3, "round-robin", kSteps, nullptr, {}, absl::Seconds(30),
                                 [](comm::InProcGroup& group) { group.Kill(2); });
  EXPECT_FALSE(got.coordinator.ok());
  EXPECT_THAT(std::string(got.coordinator.message()), HasSubstr("rank 2"));
}

TEST(ExpertParallelTest, SilentWorkerTimesOutNamingIt) {
  const auto start = absl::Now();
  ClusterResult got = RunCluster(3, "round-robin", kSteps, nullptr, {3}, absl::Milliseconds(300));
  EXPECT_EQ(got.coordinator.code(), absl::StatusCode::kDeadlineExceeded) << got.coordinator;
  EXPECT_THAT(std::string(got.coordinator.message()), HasSubstr("rank(s) 3 did not answer"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}


// Rows from a GPU coordinator travel as BF16 (half the bytes of F32): the CPU workers widen them,
// compute in fp32 and round the outputs, so every slot equals the local executor given the same
// BF16 rows, bit for bit, whatever worker a row went to.
TEST(ExpertParallelTest, Bf16RowsOverTheWireEqualTheLocalExecutor) {
  auto config = ModelConfig::FromDir(TinyModelDir());
  ASSERT_TRUE(config.ok());
  auto weights = ModelWeights::Load(TinyModelDir(), *config, WeightSelection::All(*config));
  ASSERT_TRUE(weights.ok()) << weights.status();
  const int workers = 3, world = workers + 1;
  auto placement = Placement::RoundRobin(static_cast<int>(config->num_local_experts), workers);
  ASSERT_TRUE(placement.ok());
  const int64_t T = 7, K = config->num_experts_per_tok, H = config->hidden_size;
  const int64_t E = config->num_local_experts;
  Tensor x32 = Tensor::Empty(DType::kF32, {T, H});
  for (int64_t i = 0; i < T * H; ++i) x32.data<float>()[i] = std::sin(0.37f * i) * 2.f;
  auto x = FromF32(x32, DType::kBF16);
  ASSERT_TRUE(x.ok());
  Tensor ids = Tensor::Empty(DType::kI32, {T, K});
  for (int64_t i = 0; i < T * K; ++i) ids.data<int32_t>()[i] = static_cast<int32_t>((i * 3) % E);

  comm::InProcGroup group(world);
  std::vector<std::thread> threads;
  std::vector<absl::Status> served(world);
  for (int r = 1; r < world; ++r)
    threads.emplace_back([&, r] {
      std::unique_ptr<comm::Communicator> comm = group.Join(r);
      served[r] = RunExpertWorker(comm.get(), **weights, *placement, {});
    });
  std::unique_ptr<comm::Communicator> root = group.Join(0);
  DistributedExpertExecutor remote(*config, *placement, root.get(), absl::Seconds(30),
                                   DType::kBF16);
  std::unique_ptr<ExpertExecutor> local = NewLocalExpertExecutor(weights->get());
  ASSERT_TRUE(remote.BeginStep().ok());
  for (int layer = 0; layer < config->num_hidden_layers; ++layer) {
    auto got = remote.Run(layer, {.x = *x, .topk_ids = ids});
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->rows.dtype(), DType::kBF16);
    std::vector<uint8_t> remote_rows(static_cast<const uint8_t*>(got->rows.raw()),
                                     static_cast<const uint8_t*>(got->rows.raw()) + T * K * H * 2);
    EXPECT_NE(std::count(remote_rows.begin(), remote_rows.end(), 0), remote_rows.size());
    auto want = local->Run(layer, {.x = *x, .topk_ids = ids});
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_EQ(std::memcmp(remote_rows.data(), want->rows.raw(), remote_rows.size()), 0)
        << "layer " << layer;
  }
  // F32 rows are refused by an executor that carries BF16.
  EXPECT_EQ(remote.Run(0, {.x = x32, .topk_ids = ids}).status().code(),
            absl::StatusCode::kInternal);
  ASSERT_TRUE(remote.Shutdown().ok());
  for (auto& t : threads) t.join();
  for (int r = 1; r < world; ++r) EXPECT_TRUE(served[r].ok()) << "rank " << r << ": " << served[r];
}

// A data plane re-formed without worker 2: the coordinator rebinds to the survivors with the
// replicas they hold, each survivor keeps computing the experts it loaded (the new placement
// gives it those or fewer), and every slot still equals the local executor, bit for bit.
TEST(ExpertParallelTest, ReformedAmongTheSurvivorsEqualsTheLocalExecutor) {
  auto config = ModelConfig::FromDir(TinyModelDir());
  ASSERT_TRUE(config.ok());
  auto weights = ModelWeights::Load(TinyModelDir(), *config, WeightSelection::All(*config));
  ASSERT_TRUE(weights.ok()) << weights.status();
  const int E = static_cast<int>(config->num_local_experts);
  auto base = Placement::RoundRobin(E, 3, 2);
  ASSERT_TRUE(base.ok());
  auto survivors = Placement::Among(*base, {0, 1, 3});
  ASSERT_TRUE(survivors.ok());
  const int64_t T = 9, K = config->num_experts_per_tok, H = config->hidden_size;
  Tensor x = Tensor::Empty(DType::kF32, {T, H});
  for (int64_t i = 0; i < T * H; ++i) x.data<float>()[i] = std::cos(0.11f * i);
  Tensor ids = Tensor::Empty(DType::kI32, {T, K});
  for (int64_t i = 0; i < T * K; ++i) ids.data<int32_t>()[i] = static_cast<int32_t>((i * 5) % E);
  std::unique_ptr<ExpertExecutor> local = NewLocalExpertExecutor(weights->get());

  // Workers 1..3 load their experts once and serve the first data plane, then (1 and 3) the
  // second with fewer.
  std::vector<std::unique_ptr<ExpertWorker>> workers(4);
  for (int w = 1; w <= 3; ++w) {
    auto created = ExpertWorker::Create(**weights, base->experts_of(w), {});
    ASSERT_TRUE(created.ok()) << created.status();
    workers[w] = *std::move(created);
  }
  comm::InProcGroup first(4), second(3);
  std::vector<absl::StatusOr<WorkerLoopEnd>> ends(4, WorkerLoopEnd::kShutdown),
      second_ends(3, WorkerLoopEnd::kShutdown);
  std::vector<std::thread> threads;
  for (int w = 1; w <= 3; ++w)
    threads.emplace_back([&, w] {
      std::unique_ptr<comm::Communicator> comm = first.Join(w);
      ends[w] = workers[w]->Serve(comm.get(), base->experts_of(w));
      if (w == 2) return;  // lost
      const int rank = w == 1 ? 1 : 2;
      std::unique_ptr<comm::Communicator> next = second.Join(rank);
      second_ends[rank] = workers[w]->Serve(next.get(), survivors->experts_of(rank));
    });
  std::unique_ptr<comm::Communicator> root = first.Join(0);
  DistributedExpertExecutor remote(*config, *base, root.get(), absl::Seconds(30));
  auto run_all = [&](const std::string& when) {
    ASSERT_TRUE(remote.BeginStep().ok());
    for (int layer = 0; layer < config->num_hidden_layers; ++layer) {
      auto got = remote.Run(layer, {.x = x, .topk_ids = ids});
      ASSERT_TRUE(got.ok()) << when << ": " << got.status();
      auto want = local->Run(layer, {.x = x, .topk_ids = ids});
      ASSERT_TRUE(want.ok());
      EXPECT_EQ(std::memcmp(got->rows.raw(), want->rows.raw(), got->rows.nbytes()), 0)
          << when << ", layer " << layer;
    }
  };
  run_all("all three workers");
  ASSERT_TRUE(remote.Reform().ok());
  std::unique_ptr<comm::Communicator> next_root = second.Join(0);
  ASSERT_TRUE(remote.Rebind(next_root.get(), *survivors, {0, 1, 3}).ok());
  run_all("workers 1 and 3");
  ASSERT_TRUE(remote.Shutdown().ok());
  for (auto& t : threads) t.join();
  for (int w = 1; w <= 3; ++w) {
    ASSERT_TRUE(ends[w].ok()) << ends[w].status();
    EXPECT_EQ(*ends[w], WorkerLoopEnd::kReform);
  }
  for (int r = 1; r <= 2; ++r) {
    ASSERT_TRUE(second_ends[r].ok()) << second_ends[r].status();
    EXPECT_EQ(*second_ends[r], WorkerLoopEnd::kShutdown);
  }
  // Rows went only to live workers, counted by worker rank.
  EXPECT_GT(remote.stats().worker_tokens[3], 0);
  // A placement that gives a worker an expert it has not loaded is refused.
  comm::InProcGroup lone(2);
  std::thread refuse([&] {
    std::unique_ptr<comm::Communicator> c = lone.Join(1);
    EXPECT_EQ(workers[1]->Serve(c.get(), {2}).status().code(),
              absl::StatusCode::kFailedPrecondition);
  });
  refuse.join();
}

}  // namespace
}  // namespace epx
