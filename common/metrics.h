// Prometheus metrics without a client library: cumulative histograms and the text exposition
// format (version 0.0.4: # HELP, # TYPE, name{label="value"} number). Thread-safe.
#ifndef EPX_COMMON_METRICS_H_
#define EPX_COMMON_METRICS_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace epx {

// Observations counted in buckets of upper bounds `bounds` (ascending; +Inf is implicit).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double value);

  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> cumulative;  // per bound, then +Inf (= count)
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot snapshot() const;

 private:
  const std::vector<double> bounds_;
  mutable absl::Mutex mu_;
  std::vector<uint64_t> counts_ ABSL_GUARDED_BY(mu_);  // per bucket, then +Inf
  double sum_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t count_ ABSL_GUARDED_BY(mu_) = 0;
};

// Latency buckets in seconds, from 1 ms to 10 min (those vLLM charts use, and finer below 10 ms).
std::vector<double> LatencyBuckets();

using MetricLabels = std::vector<std::pair<std::string, std::string>>;

// Builds one exposition. Every family is declared once (Family) before its samples.
class MetricsText {
 public:
  // type: "counter", "gauge" or "histogram".
  void Family(absl::string_view name, absl::string_view type, absl::string_view help);
  void Sample(absl::string_view name, const MetricLabels& labels, double value);
  void Sample(absl::string_view name, double value) { Sample(name, {}, value); }
  void Histogram(absl::string_view name, const MetricLabels& labels, const Histogram::Snapshot& h);
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

}  // namespace epx

#endif  // EPX_COMMON_METRICS_H_
