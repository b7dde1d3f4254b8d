#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/cpu/ops.h"

namespace epx::cpu {

absl::Status SamplingParams::Validate() const {
  if (!(temperature >= 0.f) || !std::isfinite(temperature))
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", temperature));
  if (top_k < -1)
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be -1 or 0 (disabled) or positive, got ", top_k));
  if (!(top_p > 0.f && top_p <= 1.f))
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  return absl::OkStatus();
}

int32_t ArgMax(absl::Span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

absl::StatusOr<int32_t> Sample(absl::Span<const float> logits, const SamplingParams& params,
                               SamplingRng& rng) {
  EPX_RETURN_IF_ERROR(params.Validate());
  if (logits.empty()) return absl::InvalidArgumentError("Sample: no logits");
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i]))
      return absl::InvalidArgumentError(absl::StrCat("Sample: logit of token ", i, " is NaN"));
  }
  if (params.temperature == 0.f) return ArgMax(logits);
  const int64_t vocab = static_cast<int64_t>(logits.size());
  // Candidates by descending logit, ties by ascending id: a total order, so the draw is
  // reproducible.
  std::vector<int32_t> ids(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  auto before = [&](int32_t a, int32_t b) {
    return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
  };
  int64_t keep = params.top_k > 0 ? std::min<int64_t>(params.top_k, vocab) : vocab;
  std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), before);
  const double inv_t = 1.0 / params.temperature;
  const double max_logit = logits[ids[0]];
  std::vector<double> probs(keep);
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((logits[ids[i]] - max_logit) * inv_t);
    sum += probs[i];
  }
  if (params.top_p < 1.f) {
    double cumulative = 0;
    int64_t n = 0;
    while (n < keep) {
      cumulative += probs[n] / sum;
      ++n;
      if (cumulative >= params.top_p) break;
    }
    keep = n;
    sum = 0;
    for (int64_t i = 0; i < keep; ++i) sum += probs[i];
  }
  const double u = rng.Uniform() * sum;
  double cumulative = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cumulative += probs[i];
    if (u < cumulative) return ids[i];
  }
  return ids[keep - 1];
}

}  // namespace epx::cpu
