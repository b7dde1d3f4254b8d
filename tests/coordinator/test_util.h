// Helpers shared by the coordinator and CLI tests: reading golden files and comparing logits.
#ifndef EPX_TESTS_COORDINATOR_TEST_UTIL_H_
#define EPX_TESTS_COORDINATOR_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace epx::testing {

using ::epx::test::TinyModelDir;
inline std::string GoldenPath() { return TinyModelDir() + "/golden.safetensors"; }

template <typename T>
std::vector<T> ReadVector(SafetensorsFile& file, const std::string& name) {
  auto view = file.Get(name);
  EXPECT_TRUE(view.ok()) << view.status();
  if (!view.ok()) return {};
  return std::vector<T>(view->data<const T>(), view->data<const T>() + view->numel());
}

// One prompt of the golden file (its README): the prompt, the reference logits at every prompt
// position, the greedy continuation and the logits that produced it.
struct GoldenPrompt {
  std::vector<int32_t> tokens;
  std::vector<float> logits;         // [T * vocab]
  std::vector<int32_t> greedy;       // [N]
  std::vector<float> greedy_logits;  // [N * vocab]
};

// The golden file's prompts, in order (expects the file to open; the caller checks the count).
inline std::vector<GoldenPrompt> ReadGoldenPrompts(int count = 3) {
  std::vector<GoldenPrompt> prompts;
  auto golden = SafetensorsFile::Open(GoldenPath());
  EXPECT_TRUE(golden.ok()) << golden.status();
  if (!golden.ok()) return prompts;
  for (int i = 0; i < count; ++i) {
    const std::string p = "prompt_" + std::to_string(i) + ".";
    prompts.push_back({ReadVector<int32_t>(**golden, p + "tokens"),
                       ReadVector<float>(**golden, p + "logits"),
                       ReadVector<int32_t>(**golden, p + "greedy"),
                       ReadVector<float>(**golden, p + "greedy_logits")});
  }
  return prompts;
}

// max |a - b| / max |b|: the golden README's measure.
template <typename A, typename B>
double MaxRelativeError(absl::Span<const A> a, absl::Span<const B> b) {
  EXPECT_EQ(a.size(), b.size());
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(b[i])));
  }
  return max_ref == 0 ? max_diff : max_diff / max_ref;
}

}  // namespace epx::testing

#endif  // EPX_TESTS_COORDINATOR_TEST_UTIL_H_
