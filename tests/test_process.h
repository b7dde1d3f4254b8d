// Runs a shell command from a test and captures its output and exit code.
#ifndef EPX_TESTS_TEST_PROCESS_H_
#define EPX_TESTS_TEST_PROCESS_H_

#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <string>

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

}  // namespace epx::testing

#endif  // EPX_TESTS_TEST_PROCESS_H_
