// Starts `epx serve` (alone or under mpirun) as a child process on a free loopback port for
// end-to-end tests, and gives gRPC stubs to it. The server is sent SIGTERM and reaped when the
// object goes away.
#ifndef EPX_TESTS_SERVE_UTIL_H_
#define EPX_TESTS_SERVE_UTIL_H_

#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

#include "epx/v1/admin.grpc.pb.h"
#include "epx/v1/generation.grpc.pb.h"
#include "tests/test_process.h"

extern char** environ;

namespace epx::testing {

// The epx binary: $EPX_BINARY when set (test binaries run from a bundle), else the build's.
inline std::string EpxBinary() {
  const char* bin = std::getenv("EPX_BINARY");
  return bin != nullptr && *bin != '\0' ? bin : std::string(EPX_BINARY_DIR) + "/cli/epx";
}

class ServerProcess {
 public:
  // `launcher`: prefix such as an mpirun command line ("" for one process). `args`: flags after
  // `epx serve`. Waits (up to 60 s) for the port file; ok() says whether it appeared.
  ServerProcess(const std::string& name, const std::string& launcher, const std::string& args) {
    // Per test process: ctest runs tests of one binary in parallel processes.
    const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) /
                                      (name + "_" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    port_file_ = (dir / "port").string();
    log_file_ = (dir / "server.log").string();
    std::filesystem::remove(port_file_);
    const std::string command = "exec " + launcher + " " + EpxBinary() +
                                " serve --listen 127.0.0.1:0 --port-file " + port_file_ + " " +
                                args + " > " + log_file_ + " 2>&1";
    const char* argv[] = {"/bin/sh", "-c", command.c_str(), nullptr};
    if (posix_spawn(&pid_, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ) != 0)
      pid_ = -1;
    for (int i = 0; i < 600 && pid_ > 0 && port_ == 0; ++i) {
      std::ifstream in(port_file_);
      if (!(in >> port_)) port_ = 0;
      if (port_ == 0) {
        if (waitpid(pid_, &status_, WNOHANG) == pid_) {
          pid_ = -1;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    channel_ = grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
  }
  ~ServerProcess() { Stop(); }

  bool ok() const { return port_ != 0; }
  pid_t pid() const { return pid_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  std::unique_ptr<v1::Generation::Stub> generation() const {
    return v1::Generation::NewStub(channel_);
  }
  std::unique_ptr<v1::Admin::Stub> admin() const { return v1::Admin::NewStub(channel_); }
  std::string log() const {
    std::ifstream in(log_file_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  // Waits up to `seconds` for the process to exit; its exit code, or -1 (still running or
  // killed by a signal).
  int Wait(double seconds) {
    for (int i = 0; i < seconds * 20 && pid_ > 0; ++i) {
      if (waitpid(pid_, &status_, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return pid_ < 0 && WIFEXITED(status_) ? WEXITSTATUS(status_) : -1;
  }
  void Stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    if (Wait(20) == -1 && pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status_, 0);
      pid_ = -1;
    }
  }

 private:
  pid_t pid_ = -1;
  int status_ = 0;
  int port_ = 0;
  std::string port_file_, log_file_;
  std::shared_ptr<grpc::Channel> channel_;
};

// `epx health` against the server's generation service: its exit code and output. wait_s > 0:
// until SERVING, for at most that long (the health service follows readiness within its 100 ms
// update period).
inline CommandResult Health(const ServerProcess& server, double wait_s = 0) {
  return RunCommand(EpxBinary() + " health --server " + server.address() +
                    " --service epx.v1.Generation" +
                    (wait_s > 0 ? " --wait --timeout " + std::to_string(wait_s) : "") + " 2>&1");
}

// Waits up to `seconds` for readiness to read `serving` (SERVING or NOT_SERVING); the health
// service follows it within its 100 ms update period.
inline CommandResult AwaitHealth(const ServerProcess& server, const std::string& serving,
                                 double seconds) {
  CommandResult health;
  for (int i = 0; i < seconds * 10; ++i) {
    health = Health(server);
    const bool not_serving = health.output.find("NOT_SERVING") != std::string::npos;
    if ((serving == "NOT_SERVING") == not_serving &&
        health.output.find("SERVING") != std::string::npos)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return health;
}

// A greedy request for `max_tokens` tokens of `prompt`, past any EOS.
inline v1::GenerateRequest Greedy(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
  r.set_max_tokens(max_tokens);
  r.set_temperature(0);
  r.set_ignore_eos(true);
  return r;
}

// The messages of one Generate call.
struct Completion {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  int messages = 0;
  v1::GenerateResponse last;
};

inline Completion Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
                           double timeout_s = 120) {
  Completion c;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  auto reader = stub.Generate(&context, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    ++c.messages;
    c.tokens.insert(c.tokens.end(), response.token_ids().begin(), response.token_ids().end());
    c.text += response.text();
    c.last = response;
  }
  c.status = reader->Finish();
  return c;
}

}  // namespace epx::testing

#endif  // EPX_TESTS_SERVE_UTIL_H_
