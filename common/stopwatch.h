// Wall-clock intervals for per-layer statistics. Thread-safe (each Stopwatch is a value).
#ifndef EPX_COMMON_STOPWATCH_H_
#define EPX_COMMON_STOPWATCH_H_

#include <chrono>

namespace epx {

class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  void Restart() { start_ = std::chrono::steady_clock::now(); }
  double Micros() const {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start_)
        .count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

}  // namespace epx

#endif  // EPX_COMMON_STOPWATCH_H_
