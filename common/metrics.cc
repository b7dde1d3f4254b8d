#include "common/metrics.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace epx {

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  const size_t bucket = std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin();
  absl::MutexLock lock(&mu_);
  ++counts_[bucket];
  sum_ += value;
  ++count_;
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.bounds = bounds_;
  absl::MutexLock lock(&mu_);
  uint64_t total = 0;
  for (uint64_t c : counts_) s.cumulative.push_back(total += c);
  s.sum = sum_;
  s.count = count_;
  return s;
}

std::vector<double> LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
          1.0,   2.5,    5.0,   7.5,  10,   20,   40,   80,   160, 320,  640};
}

namespace {

std::string Number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return absl::StrFormat("%.0f", v);
  return absl::StrFormat("%.15g", v);
}

// Label values escape backslash, double quote and newline.
std::string Escape(absl::string_view value) {
  std::string out;
  for (char c : value) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string Labels(const MetricLabels& labels) {
  if (labels.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < labels.size(); ++i)
    absl::StrAppend(&out, i ? "," : "", labels[i].first, "=\"", Escape(labels[i].second), "\"");
  return out + "}";
}

}  // namespace

void MetricsText::Family(absl::string_view name, absl::string_view type, absl::string_view help) {
  std::string h;
  for (char c : help) h += c == '\n' ? ' ' : c;
  absl::StrAppend(&text_, "# HELP ", name, " ", h, "\n# TYPE ", name, " ", type, "\n");
}

void MetricsText::Sample(absl::string_view name, const MetricLabels& labels, double value) {
  absl::StrAppend(&text_, name, Labels(labels), " ", Number(value), "\n");
}

void MetricsText::Histogram(absl::string_view name, const MetricLabels& labels,
                            const Histogram::Snapshot& h) {
  for (size_t i = 0; i <= h.bounds.size(); ++i) {
    MetricLabels with_le = labels;
    with_le.emplace_back("le", i < h.bounds.size() ? Number(h.bounds[i]) : "+Inf");
    Sample(absl::StrCat(name, "_bucket"), with_le, static_cast<double>(h.cumulative[i]));
  }
  Sample(absl::StrCat(name, "_sum"), labels, h.sum);
  Sample(absl::StrCat(name, "_count"), labels, static_cast<double>(h.count));
}

}  // namespace epx
