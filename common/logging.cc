#include "common/logging.h"

#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace epx {
namespace {
std::atomic<int> g_rank{0};
std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
std::mutex g_mu;
}  // namespace

void SetLogRank(int rank) { g_rank = rank; }
void SetMinLogLevel(LogLevel level) { g_min_level = static_cast<int>(level); }
LogLevel MinLogLevel() { return static_cast<LogLevel>(g_min_level.load()); }

LogMessage::LogMessage(LogLevel level, const char* file, int line) : level_(level) {
  static constexpr char kTag[] = {'D', 'I', 'W', 'E'};
  const char* base = std::strrchr(file, '/');
  stream_ << '[' << kTag[static_cast<int>(level)] << " rank ";
  // A worker of a launcher-free cluster learns its rank at registration.
  if (const int rank = g_rank.load(); rank >= 0) {
    stream_ << rank;
  } else {
    stream_ << '?';
  }
  stream_ << ' ' << (base ? base + 1 : file) << ':' << line << "] ";
}

LogMessage::~LogMessage() {
  stream_ << '\n';
  const std::string s = stream_.str();
  std::lock_guard<std::mutex> lock(g_mu);
  std::fwrite(s.data(), 1, s.size(), stderr);
  if (level_ >= LogLevel::kWarning) std::fflush(stderr);
}

}  // namespace epx
