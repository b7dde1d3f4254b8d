// `epx serve` under mpirun (label mpi): workers register over the control plane, generation
// over gRPC equals the golden output with the experts on 2 worker processes, and a lost worker
// turns readiness NOT_SERVING, fails the request in flight with UNAVAILABLE and ends the job
// non-zero.
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <thread>

#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "tests/coordinator/test_util.h"
#include "tests/mpi/mpirun.h"
#include "tests/serve_util.h"
#include "tests/test_process.h"

namespace epx {
namespace {

using testing::Completion;
using testing::ServerProcess;

using epx::testing::Mpirun;

v1::StatsResponse Stats(const ServerProcess& server) {
  grpc::ClientContext context;
  v1::StatsResponse stats;
  EXPECT_TRUE(server.admin()->Stats(&context, {}, &stats).ok());
  return stats;
}

TEST(ServeMpiTest, WorkersRegisterServeAndALostWorkerTurnsReadinessOff) {
  ServerProcess server("epx_serve_mpi", Mpirun(3),
                       "--model " + testing::TinyModelDir() +
                           " --heartbeat-ms 200 --heartbeat-timeout-ms 1500 --comm-timeout 3"
                           " --failure-grace-s 3");
  ASSERT_TRUE(server.ok()) << server.log();
  v1::StatsResponse s;
  for (int i = 0; i < 300 && !(s = Stats(server)).ready(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(s.ready()) << s.not_ready_reason() << "\n" << server.log();
  testing::CommandResult health = testing::Health(server, /*wait_s=*/10);
  EXPECT_EQ(health.exit_code, 0) << health.output;
  EXPECT_NE(health.output.find("SERVING"), std::string::npos) << health.output;
  ASSERT_EQ(s.workers_size(), 2);
  EXPECT_EQ(std::vector<int>(s.workers(0).experts().begin(), s.workers(0).experts().end()),
            (std::vector<int>{0, 2, 4, 6}));
  EXPECT_EQ(std::vector<int>(s.workers(1).experts().begin(), s.workers(1).experts().end()),
            (std::vector<int>{1, 3, 5, 7}));
  for (const auto& w : s.workers()) EXPECT_TRUE(w.registered() && w.alive()) << w.rank();

  // The golden greedy output, with the experts on the workers.
  auto golden = SafetensorsFile::Open(testing::GoldenPath());
  ASSERT_TRUE(golden.ok());
  const std::vector<int32_t> prompt = testing::ReadVector<int32_t>(**golden, "prompt_0.tokens");
  const std::vector<int32_t> greedy = testing::ReadVector<int32_t>(**golden, "prompt_0.greedy");
  const v1::GenerateRequest r = testing::Greedy(prompt, static_cast<int>(greedy.size()));
  auto stub = server.generation();
  Completion c = testing::Generate(*stub, r);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  EXPECT_EQ(c.tokens, greedy);
  s = Stats(server);
  EXPECT_GT(s.workers(0).rows_received() + s.workers(1).rows_received(), 0u);

  // Stop worker 2: its heartbeats stop and readiness goes NOT_SERVING.
  std::smatch m;
  const std::string log = server.log();
  ASSERT_TRUE(std::regex_search(log, m, std::regex("worker 2 registered from .* \\(pid (\\d+)")))
      << log;
  const pid_t worker = std::stoi(m[1]);
  ASSERT_EQ(kill(worker, SIGSTOP), 0);
  bool not_serving = false;
  for (int i = 0; i < 100 && !not_serving; ++i) {
    health = testing::Health(server);
    not_serving = health.exit_code != 0 && health.output.find("NOT_SERVING") != std::string::npos;
    if (!not_serving) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(not_serving) << health.output;
  s = Stats(server);
  EXPECT_FALSE(s.ready());
  EXPECT_NE(s.not_ready_reason().find("worker 2"), std::string::npos) << s.not_ready_reason();
  EXPECT_FALSE(s.workers(1).alive());

  // A request now needs the silent worker: it fails with UNAVAILABLE after the data-plane
  // timeout, and the job ends non-zero after the grace period.
  c = testing::Generate(*stub, r, 60);
  EXPECT_EQ(c.status.error_code(), grpc::StatusCode::UNAVAILABLE) << c.status.error_message();
  EXPECT_NE(c.status.error_message().find("rank"), std::string::npos)
      << c.status.error_message();
  const int code = server.Wait(60);
  kill(worker, SIGCONT);
  EXPECT_GT(code, 0) << server.log();
}

// A CA and, signed by it, a certificate for 127.0.0.1 usable by servers and clients, made with
// openssl in `dir`: ca.pem, cert.pem, cert.key. Empty on success, else openssl's output.
std::string MakeCertificates(const std::string& dir) {
  const std::string quiet = " > " + dir + "/openssl.log 2>&1";
  std::ofstream(dir + "/ext.cnf") << "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                     "extendedKeyUsage=serverAuth,clientAuth\n";
  const std::string commands[] = {
      "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN=epx test CA' -keyout " + dir +
          "/ca.key -out " + dir + "/ca.pem",
      "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout " + dir + "/cert.key -out " +
          dir + "/cert.csr",
      "openssl x509 -req -in " + dir + "/cert.csr -CA " + dir + "/ca.pem -CAkey " + dir +
          "/ca.key -CAcreateserial -days 2 -extfile " + dir + "/ext.cnf -out " + dir + "/cert.pem",
  };
  for (const std::string& c : commands) {
    testing::CommandResult r = testing::RunCommand(c + quiet);
    if (r.exit_code != 0)
      return c + ": " + testing::RunCommand("cat " + dir + "/openssl.log").output;
  }
  return "";
}

TEST(ServeMpiTest, UnderMutualTlsTheWorkersCheckRankZeroWithTheCaAndPresentItsCertificate) {
  const std::string dir = ::testing::TempDir() + "/epx_mpi_tls_" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  ASSERT_EQ(MakeCertificates(dir), "");
  const std::string tls = " --tls-cert " + dir + "/cert.pem --tls-key " + dir + "/cert.key";
  const std::string client = tls + " --tls-ca " + dir + "/ca.pem --api-key k3y";
  ServerProcess server("epx_serve_mpi_tls", Mpirun(3),
                       "--model " + testing::TinyModelDir() + tls + " --tls-client-ca " + dir +
                           "/ca.pem --tls-ca " + dir + "/ca.pem --api-key k3y");
  ASSERT_TRUE(server.ok()) << server.log();
  // Ready means both workers registered over TLS with their certificate.
  testing::CommandResult health =
      testing::RunCommand(testing::EpxBinary() + " health --server " + server.address() +
                          " --service epx.v1.Generation --wait --timeout 60" + client + " 2>&1");
  ASSERT_EQ(health.exit_code, 0) << health.output << server.log();
  const std::string request = " --prompt 'The router' --max-tokens 8 --ignore-eos";
  testing::CommandResult remote = testing::RunCommand(testing::EpxBinary() + " generate --server " +
                                                      server.address() + client + request);
  ASSERT_EQ(remote.exit_code, 0) << remote.output;
  testing::CommandResult here = testing::RunCommand(testing::EpxBinary() + " generate --model " +
                                                    testing::TinyModelDir() + request);
  ASSERT_EQ(here.exit_code, 0) << here.output;
  EXPECT_EQ(remote.output, here.output);
  // Without the key: refused.
  testing::CommandResult refused =
      testing::RunCommand(testing::EpxBinary() + " generate --server " + server.address() + tls +
                          " --tls-ca " + dir + "/ca.pem" + request + " 2>&1");
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  server.Stop();
  EXPECT_EQ(server.log().find("k3y"), std::string::npos) << server.log();

  // Without --tls-ca the workers could not check rank 0: every rank refuses to start.
  ServerProcess missing("epx_serve_mpi_tls_no_ca", Mpirun(2),
                        "--model " + testing::TinyModelDir() + tls);
  EXPECT_FALSE(missing.ok());
  EXPECT_NE(missing.log().find("--tls-cert under mpirun needs --tls-ca"), std::string::npos)
      << missing.log();
}

}  // namespace
}  // namespace epx
