// epx under mpirun (label mpi): rank 0 coordinator, ranks 1..W expert workers over Open MPI.
// The golden eval must be bitwise identical to the single-process run for any W and placement;
// bad placements and lost, silent or signalled ranks must end the job with a message naming the
// rank, never a hang.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/mpi/mpirun.h"
#include "tests/test_process.h"

namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::string kEpx = std::string(EPX_BINARY_DIR) + "/cli/epx";
const std::string kModel = std::string(EPX_TEST_DATA_DIR) + "/tiny-mixtral";
const std::string kGolden = kModel + "/golden.safetensors";

using Result = epx::testing::CommandResult;

// Under bash (the signal tests use job control), stderr captured too.
Result Shell(const std::string& command) {
  return epx::testing::RunCommand("bash -c '" + command + "' 2>&1");
}

using epx::testing::Mpirun;

std::string Temp(const std::string& name) {
  return (fs::path(::testing::TempDir()) / ("epx_mpi_" + name)).string();
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The single-process output everything is compared with.
const std::string& Reference() {
  static const std::string* bytes = [] {
    const std::string out = Temp("reference.safetensors");
    Result r = Shell(kEpx + " eval --model " + kModel + " --input " + kGolden + " --output " + out);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return new std::string(ReadFile(out));
  }();
  return *bytes;
}

class MpiWorkersTest : public ::testing::TestWithParam<int> {};

TEST_P(MpiWorkersTest, GoldenEvalIsBitwiseIdenticalToOneProcess) {
  const int workers = GetParam();
  const std::string out = Temp("eval_w" + std::to_string(workers) + ".safetensors");
  Result r = Shell(Mpirun(1 + workers) + kEpx + " eval --stats --model " + kModel + " --input " +
                   kGolden + " --output " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(ReadFile(out), Reference()) << "W=" << workers;
  EXPECT_THAT(r.output, HasSubstr("tokens per worker"));
  EXPECT_THAT(r.output, HasSubstr("rank" + std::to_string(workers) + "="));
}

INSTANTIATE_TEST_SUITE_P(Workers, MpiWorkersTest, ::testing::Values(1, 2, 3, 8));

TEST(MpiTest, MoreWorkersThanExpertsWithAPlacementFile) {
  const std::string placement = Temp("placement9.json");
  // 9 workers for 8 experts: experts 0 and 5 have two replicas, the others one.
  std::ofstream(placement) << R"({"experts": {"0": [1, 9], "1": [2], "2": [3], "3": [4],
                                 "4": [5], "5": [6, 9], "6": [7], "7": [8]}})";
  const std::string out = Temp("eval_w9.safetensors");
  Result r = Shell(Mpirun(10) + kEpx + " eval --placement " + placement + " --model " + kModel +
                   " --input " + kGolden + " --output " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(ReadFile(out), Reference());
}

TEST(MpiTest, MpmdFormWithRoles) {
  const std::string out = Temp("eval_mpmd.safetensors");
  const std::string args = " eval --model " + kModel + " --input " + kGolden + " --output " + out;
  std::string cmd =
      Mpirun(1) + kEpx + args + " --role coordinator : -np 2 " + kEpx + args + " --role worker";
  Result r = Shell(cmd);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(ReadFile(out), Reference());
}

TEST(MpiTest, BadPlacementFileIsReported) {
  const std::string placement = Temp("bad_placement.json");
  std::ofstream(placement) << R"({"experts": {"0": [1], "1": [2], "2": [1]}})";
  Result r = Shell(Mpirun(3) + kEpx + " eval --placement " + placement + " --model " + kModel +
                   " --input " + kGolden + " --output " + Temp("never.safetensors"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr(placement));
  EXPECT_THAT(r.output, HasSubstr("expert 3 is not placed"));
}

TEST(MpiTest, PlacementForMoreRanksThanTheJobHasIsReported) {
  const std::string placement = Temp("ranks_placement.json");
  std::ofstream(placement) << R"({"experts": {"0": [1], "1": [2], "2": [3], "3": [1],
                                 "4": [2], "5": [3], "6": [1], "7": [2]}})";
  Result r = Shell(Mpirun(3) + kEpx + " eval --placement " + placement + " --model " + kModel +
                   " --input " + kGolden + " --output " + Temp("never.safetensors"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("rank 3"));
  EXPECT_THAT(r.output, HasSubstr("workers are ranks 1..2"));
}

// Starts a long generation under mpirun on a model of its own (its directory marks the job's
// processes), sends `signal` to `rank` after it has run a while, and waits for the job to end.
Result GenerateAndSignal(int np, const std::string& signal, int rank, const std::string& extra,
                         const std::string& resume_after = "") {
  const std::string model = Temp("long_model_" + signal);
  Result made = Shell(kEpx + " make-model --preset tiny --num-layers 2 " +
                      "--max-position-embeddings 300000 --out " + model);
  EXPECT_EQ(made.exit_code, 0) << made.output;
  const std::string log = Temp("signal_" + signal + ".log");
  const std::string cmd = Mpirun(np) + kEpx + " generate --model " + model +
                          " --prompt hello --max-tokens 200000 " + extra + " > " + log +
                          " 2>&1 & job=$!; " + std::string(EPX_TEST_SOURCE_DIR) +
                          "/mpi/signal_rank.sh " + signal + " " + std::to_string(rank) + " " +
                          model + " 1.5 " + resume_after + " || kill $job; wait $job; code=$?; cat " + log + "; exit $code";
  Result r = Shell(cmd);
  fs::remove_all(model);
  return r;
}

TEST(MpiTest, KilledWorkerEndsTheJobNamingTheRank) {
  Result r = GenerateAndSignal(4, "KILL", 2, "");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("sent SIGKILL to rank 2"));
  // Open MPI's launcher ends the job as soon as a rank dies, and names it.
  EXPECT_THAT(r.output, HasSubstr("process rank 2"));
  EXPECT_LT(r.seconds, 60) << r.output;
}

TEST(MpiTest, SilentWorkerIsReportedByTheCoordinatorWithinTheTimeout) {
  // Resumed 8 s later, after the coordinator reported it, so that mpirun can finish ending it.
  Result r = GenerateAndSignal(4, "STOP", 3, "--comm-timeout 3", "8");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("rank(s) 3 did not answer rank 0 within 3s"));
  EXPECT_LT(r.seconds, 60) << r.output;
}

TEST(MpiTest, SigtermAtTheCoordinatorShutsTheJobDownCleanly) {
  Result r = GenerateAndSignal(3, "TERM", 0, "");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("sent SIGTERM to rank 0"));
  EXPECT_THAT(r.output, HasSubstr("generated"));  // the coordinator finished its report
  EXPECT_LT(r.seconds, 60) << r.output;
}

}  // namespace
