// Runs a shell command from a test and captures its output and exit code.
#ifndef EPX_TESTS_TEST_PROCESS_H_
#define EPX_TESTS_TEST_PROCESS_H_

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "gtest/gtest.h"

extern char** environ;

namespace epx::testing {

struct CommandResult {
  int exit_code = -1;  // -1 if the command did not exit normally
  std::string output;
  double seconds = 0;
};

// `command` runs under /bin/sh; redirect stderr inside it to capture that too.
inline CommandResult RunCommand(const std::string& command) {
  CommandResult r;
  const auto start = std::chrono::steady_clock::now();
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

// A port free right now on 127.0.0.1 (for a coordinator the workers must know before it
// starts).
inline int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return 0;
  }
  close(fd);
  return ntohs(addr.sin_port);
}

// A directory for one test's files, under the test temp dir, with the pid in its name (ctest
// runs the tests of one binary in parallel processes).
inline std::string TestDir(const std::string& name) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) /
                                    (name + "_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  return dir.string();
}

// A child process started from a shell command with its output in `log_file`; killed (SIGKILL)
// and reaped when the object goes away if it is still running.
class ChildProcess {
 public:
  ChildProcess(const std::string& command, const std::string& log_file) : log_file_(log_file) {
    const std::string line = "exec " + command + " > " + log_file + " 2>&1";
    const char* argv[] = {"/bin/sh", "-c", line.c_str(), nullptr};
    if (posix_spawn(&pid_, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ) != 0)
      pid_ = -1;
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() {
    if (running()) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status_, 0);
    }
  }

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0 && !exited_; }
  void Signal(int sig) const {
    if (running()) kill(pid_, sig);
  }
  // Waits up to `seconds` for the process to end: its exit code, 128 + the signal that killed
  // it, or -1 if it is still running.
  int Wait(double seconds) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (running()) {
      if (waitpid(pid_, &status_, WNOHANG) == pid_) {
        exited_ = true;
        break;
      }
      if (std::chrono::steady_clock::now() >= end) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (!exited_) return -1;
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : 128 + WTERMSIG(status_);
  }
  std::string log() const {
    std::ifstream in(log_file_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  pid_t pid_ = -1;
  int status_ = 0;
  bool exited_ = false;
  std::string log_file_;
};

}  // namespace epx::testing

#endif  // EPX_TESTS_TEST_PROCESS_H_
