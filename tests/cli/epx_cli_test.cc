// The `epx` binary end to end: eval against the golden file, make-model then generate, bench
// decode on the CPU, and the errors a user sees for bad input.
#include <sys/wait.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/coordinator/test_util.h"
#include "tests/test_process.h"

namespace epx {
namespace {

namespace fs = std::filesystem;
using testing::GoldenPath;
using testing::ReadVector;
using testing::TinyModelDir;

using Result = testing::CommandResult;

// `stderr_too`: capture stderr (errors, timings) along with stdout.
Result RunEpx(const std::string& args, bool stderr_too = true) {
  return testing::RunCommand(std::string(EPX_BINARY_DIR) + "/cli/epx " + args +
                             (stderr_too ? " 2>&1" : " 2>/dev/null"));
}

std::string TempPath(const std::string& name) {
  return (fs::path(::testing::TempDir()) / ("epx_cli_" + name)).string();
}

TEST(EpxCliTest, EvalMatchesGoldenAndSequentialIsBitwiseEqualToBatched) {
  const std::string batched = TempPath("eval_batched.safetensors");
  const std::string sequential = TempPath("eval_sequential.safetensors");
  Result r = RunEpx("eval --model " + TinyModelDir() + " --input " + GoldenPath() + " --output " +
                    batched);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = RunEpx("eval --sequential --model " + TinyModelDir() + " --input " + GoldenPath() +
             " --output " + sequential);
  ASSERT_EQ(r.exit_code, 0) << r.output;

  auto golden = SafetensorsFile::Open(GoldenPath());
  auto out = SafetensorsFile::Open(batched);
  auto seq = SafetensorsFile::Open(sequential);
  ASSERT_TRUE(golden.ok() && out.ok() && seq.ok());
  for (int i = 0; i < 3; ++i) {
    const std::string p = "prompt_" + std::to_string(i) + ".";
    SCOPED_TRACE(p);
    EXPECT_EQ(ReadVector<int32_t>(**out, p + "tokens"),
              ReadVector<int32_t>(**golden, p + "tokens"));
    EXPECT_EQ(ReadVector<int32_t>(**out, p + "greedy"),
              ReadVector<int32_t>(**golden, p + "greedy"));
    for (const char* name : {"logits", "greedy_logits"}) {
      const auto got = ReadVector<float>(**out, p + name);
      EXPECT_EQ((*out)->Find(p + name)->shape, (*golden)->Find(p + name)->shape);
      EXPECT_LT(
          (testing::MaxRelativeError<float, float>(got, ReadVector<float>(**golden, p + name))),
          1e-4);
      const auto alone = ReadVector<float>(**seq, p + name);
      ASSERT_EQ(got.size(), alone.size());
      EXPECT_EQ(0, std::memcmp(got.data(), alone.data(), got.size() * sizeof(float)));
    }
  }
  fs::remove(batched);
  fs::remove(sequential);
}

TEST(EpxCliTest, EvalCheckPassesOnTheGoldenModelAndFailsOnAnother) {
  const std::string out = TempPath("eval_check.safetensors");
  Result r = RunEpx("eval --check --model " + TinyModelDir() + " --input " + GoldenPath() +
                    " --output " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("check passed"), std::string::npos) << r.output;

  // Same layout, other weights: the check must fail and say which prompts differ.
  const std::string other = TempPath("other_tiny");
  ASSERT_EQ(RunEpx("make-model --preset tiny --seed 5 --out " + other).exit_code, 0);
  r = RunEpx("eval --check --model " + other + " --input " + GoldenPath() + " --output " + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("differ from the reference"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("prompt 0"), std::string::npos) << r.output;
  fs::remove_all(other);
  fs::remove(out);
}

TEST(EpxCliTest, MakeModelThenGenerate) {
  const std::string dir = TempPath("model_small");
  Result r = RunEpx(
      "make-model --preset tiny --num-layers 2 --vocab-size 1000 --shards 2 --seed 3 --out " + dir);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* f :
       {"config.json", "generation_config.json", "tokenizer.model", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"})
    EXPECT_TRUE(fs::exists(fs::path(dir) / f)) << f;

  r = RunEpx("generate --model " + dir + " --prompt \"Hello world\" --max-tokens 12");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("generated"), std::string::npos) << r.output;

  // Seeded sampling is reproducible (stdout only: stderr carries timings).
  const std::string sampled = "generate --model " + dir +
                              " --prompt \"Mixture of experts\" --max-tokens 16 "
                              "--temperature 0.9 --top-k 50 --top-p 0.95 --seed 11";
  Result a = RunEpx(sampled, false), b = RunEpx(sampled, false);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_EQ(a.output, b.output);
  fs::remove_all(dir);
}

TEST(EpxCliTest, BadInputsGiveClearErrors) {
  Result r = RunEpx("eval --model /no/such/dir --input x --output y");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("/no/such/dir"), std::string::npos) << r.output;

  r = RunEpx("generate --model " + TinyModelDir() + " --prompt hi --top-p 1.5");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("top_p"), std::string::npos) << r.output;

  r = RunEpx("generate --model " + TinyModelDir() + " --prompt hi --max-tokens 5000");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("context"), std::string::npos) << r.output;

  r = RunEpx("make-model --preset huge --out " + TempPath("never"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("unknown preset"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(TempPath("never") + "/config.json"));

  r = RunEpx("make-model --preset tiny --num-heads 3 --num-kv-heads 2 --out " + TempPath("never"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("multiple of num_key_value_heads"), std::string::npos) << r.output;

  r = RunEpx("generate --model " + TinyModelDir());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--prompt"), std::string::npos) << r.output;

  r = RunEpx("frobnicate");
  EXPECT_NE(r.exit_code, 0);
}

// `epx bench decode` on the CPU with the tiny checkpoint: a table row per batch size and the same
// rows in the JSON. Timings are not asserted (bench/ is where they are read); what is checked is
// that every batch size ran and was accounted: at batch 1 each layer's one token goes to exactly
// top-k (2) distinct experts, so the hit count is exact there.
TEST(EpxCliTest, BenchDecodePrintsARowPerBatchSize) {
  const std::string json = TempPath("bench_decode.json");
  Result r = RunEpx("bench decode --model " + TinyModelDir() +
                        " --batch-sizes 1,3 --context 8 --steps 2 --json " + json,
                    false);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("device        cpu"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("copy BW       -"), std::string::npos) << r.output;

  struct Row {
    double ms = 0, tokens_per_s = 0, experts_per_layer = 0;
    std::string fraction;
  };
  std::map<int64_t, Row> rows;
  bool in_table = false;
  std::istringstream lines(r.output);
  for (std::string line; std::getline(lines, line);) {
    if (line.find("batch") != std::string::npos && line.find("tok/s") != std::string::npos) {
      in_table = true;
      continue;
    }
    if (!in_table) continue;
    std::istringstream fields(line);
    int64_t batch = 0;
    Row row;
    double gb_per_step = 0, gbps = 0;
    if (fields >> batch >> row.ms >> row.tokens_per_s >> row.experts_per_layer >> gb_per_step >>
        gbps >> row.fraction)
      rows[batch] = row;
  }
  ASSERT_EQ(rows.size(), 2u) << r.output;
  for (int64_t batch : {1, 3}) {
    SCOPED_TRACE(batch);
    ASSERT_EQ(rows.count(batch), 1u) << r.output;
    EXPECT_GT(rows[batch].ms, 0);
    EXPECT_GT(rows[batch].tokens_per_s, 0);
    EXPECT_EQ(rows[batch].fraction, "-");  // no copy bandwidth on the CPU
  }
  EXPECT_DOUBLE_EQ(rows[1].experts_per_layer, 2.0) << r.output;
  EXPECT_GE(rows[3].experts_per_layer, 2.0) << r.output;
  EXPECT_LE(rows[3].experts_per_layer, 6.0) << r.output;

  std::ifstream file(json);
  const nlohmann::json report = nlohmann::json::parse(file, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(report.is_discarded()) << json;
  EXPECT_EQ(report.value("engine", ""), "epx");
  EXPECT_TRUE(report["copy_bandwidth_GBps"].is_null());
  ASSERT_TRUE(report["rows"].is_array());
  ASSERT_EQ(report["rows"].size(), 2u);
  EXPECT_EQ(report["rows"][0].value("batch", 0), 1);
  EXPECT_EQ(report["rows"][1].value("batch", 0), 3);
  EXPECT_GT(report["rows"][1].value("tokens_per_s", 0.0), 0);
  EXPECT_GT(report["rows"][1].value("GB_per_step", 0.0), 0);
  fs::remove(json);
}

TEST(EpxCliTest, BenchDecodeRefusesWhatItCannotRun) {
  // Dummy weights are made on the GPU. Without one (this machine, CI), or in a build without
  // CUDA, the command must say so and fail; where a GPU is visible it may run instead.
  Result r = RunEpx(
      "bench decode --device cuda --load-format dummy --preset tiny --batch-sizes 1 --context 4 "
      "--steps 1");
  if (!fs::exists("/dev/nvidia0") || r.exit_code != 0) {
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("CUDA"), std::string::npos) << r.output;
  }

  r = RunEpx("bench decode --load-format dummy --preset tiny");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("needs --device cuda"), std::string::npos) << r.output;

  r = RunEpx("bench decode --preset tiny");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--load-format dummy"), std::string::npos) << r.output;

  r = RunEpx("bench decode");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--model"), std::string::npos) << r.output;

  r = RunEpx("bench decode --model " + TinyModelDir() + " --num-layers 2");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--num-layers needs --load-format dummy"), std::string::npos) << r.output;

  // The tiny model has 4096 positions.
  r = RunEpx("bench decode --model " + TinyModelDir() + " --context 5000");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("max_position_embeddings"), std::string::npos) << r.output;

  // 1 MiB holds 42 blocks of 16 tokens of the tiny model's fp32 KV; 64 sequences need 64.
  r = RunEpx("bench decode --model " + TinyModelDir() +
             " --kv-cache-mib 1 --batch-sizes 64 --context 8 --steps 2");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("Raise --kv-cache-mib to at least 2"), std::string::npos) << r.output;
}

// A full-size preset as config and tokenizer only (what --load-format dummy needs), and what
// --device cuda says where it cannot run: this machine may have no GPU, or no CUDA build.
TEST(EpxCliTest, ConfigOnlyModelAndDeviceErrors) {
  const std::string dir = TempPath("config-only");
  Result r = RunEpx("make-model --preset mixtral-8x7b --config-only --out " + dir);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(std::filesystem::exists(dir + "/config.json"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/tokenizer.model"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/model.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/model.safetensors.index.json"));

  r = RunEpx("generate --model " + dir + " --prompt hi --load-format dummy");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, ::testing::HasSubstr("needs --device cuda"));
  // With a GPU this generates; without one it must say why.
  r = RunEpx("generate --model " + TinyModelDir() + " --prompt hi --max-tokens 4 --device cuda");
  if (r.exit_code != 0) {
    EXPECT_THAT(r.output, ::testing::AnyOf(::testing::HasSubstr("no CUDA device is visible"),
                                           ::testing::HasSubstr("built without CUDA")));
  }
  r = RunEpx("generate --model " + TinyModelDir() + " --prompt hi --device cuda --expert-dtype fp4");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, ::testing::HasSubstr("--expert-dtype"));
  r = RunEpx("generate --model " + TinyModelDir() + " --prompt hi --device tpu");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, ::testing::HasSubstr("--device"));
}


// The cluster flags refuse what cannot work here, at once and saying why.
TEST(EpxCliTest, ClusterFlagsThatCannotWorkAreRefused) {
  const std::string model = " --model " + TinyModelDir();
  const std::string io = " --input " + GoldenPath() + " --output " + TempPath("cluster.st");
  Result r = RunEpx("eval" + model + io + " --workers 2 --data-plane mpi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, ::testing::HasSubstr("--data-plane mpi needs an MPI launcher"));
  r = RunEpx("eval" + model + io + " --workers 2 --data-plane nccl");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, ::testing::HasSubstr("--data-plane nccl moves rows between GPUs"));
  r = RunEpx("worker" + model + " --coordinator 127.0.0.1:1 --data-plane nccl");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, ::testing::HasSubstr("add --device cuda"));
  r = RunEpx("eval" + model + io + " --data-plane tcp");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, ::testing::HasSubstr("--data-plane"));
  r = RunEpx("worker" + model);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, ::testing::HasSubstr("--coordinator is required"));
  r = RunEpx("eval" + model + io + " --workers 2 --cluster-token-file /nonexistent/token");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, ::testing::HasSubstr("/nonexistent/token"));
  r = RunEpx("generate --server 127.0.0.1:1 --prompt hi --workers 2");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, ::testing::HasSubstr("--workers is for generating here"));
}

// A worker whose coordinator never comes gives up after --register-timeout, naming the address.
TEST(EpxCliTest, WorkerWithoutACoordinatorGivesUpNamingIt) {
  Result r = RunEpx("worker --model " + TinyModelDir() +
                    " --coordinator 127.0.0.1:1 --register-timeout 1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, ::testing::HasSubstr("no coordinator answered at 127.0.0.1:1 within 1s"));
  EXPECT_THAT(r.output, ::testing::HasSubstr("waiting for the coordinator at 127.0.0.1:1"));
}

}  // namespace
}  // namespace epx
