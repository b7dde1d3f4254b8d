// Minimal leveled logging to stderr with a rank prefix ("[I rank 0] ..."). The packaged abseil
// has no absl/log. Thread-safe: each message is written with one fwrite under a lock.
#ifndef EPX_COMMON_LOGGING_H_
#define EPX_COMMON_LOGGING_H_

#include <sstream>

namespace epx {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Process-wide settings; call before starting threads.
void SetLogRank(int rank);  // -1: not known yet ("rank ?")
void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

}  // namespace epx

#define EPX_LOG(level)                                    \
  if (::epx::LogLevel::k##level < ::epx::MinLogLevel()) { \
  } else                                                  \
    ::epx::LogMessage(::epx::LogLevel::k##level, __FILE__, __LINE__).stream()

#endif  // EPX_COMMON_LOGGING_H_
