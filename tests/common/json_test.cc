// Deeply nested JSON in untrusted files is refused with an error, never a stack overflow.
#include "common/json.h"

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include "common/model_config.h"
#include "common/placement.h"
#include "common/safetensors.h"
#include "gtest/gtest.h"

namespace epx {
namespace {

std::string Nested(int depth, const std::string& leaf = "1") {
  return std::string(depth, '[') + leaf + std::string(depth, ']');
}

TEST(JsonTest, ShallowParsesDeepIsRefused) {
  EXPECT_TRUE(ParseJson(Nested(kMaxJsonDepth - 1), "x").ok());
  auto deep = ParseJson(Nested(1'000'000), "deep.json");
  EXPECT_EQ(deep.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(deep.status().message().find("deep.json"), std::string::npos);
  EXPECT_NE(deep.status().message().find("nested deeper"), std::string::npos);
  EXPECT_FALSE(ParseJson("{\"a\": ", "broken.json").ok());
}

TEST(JsonTest, DeepSafetensorsHeaderIsAnErrorNotACrash) {
  const std::string header =
      R"({"t":{"dtype":"F32","shape":)" + Nested(1'000'000) + R"(,"data_offsets":[0,0]}})";
  const std::string path =
      (std::filesystem::path(::testing::TempDir()) / "epx_deep.safetensors").string();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(header.size() >> (8 * i));
  std::fwrite(len, 1, 8, f);
  std::fwrite(header.data(), 1, header.size(), f);
  std::fclose(f);
  auto file = SafetensorsFile::Open(path);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(file.status().message().find(path), std::string::npos) << file.status();
  std::filesystem::remove(path);
}

TEST(JsonTest, DeepConfigAndPlacementAreErrors) {
  EXPECT_FALSE(ModelConfig::FromJson("{\"vocab_size\": " + Nested(1'000'000) + "}").ok());
  EXPECT_FALSE(
      Placement::FromJson("{\"experts\": {\"0\": " + Nested(500'000) + "}}", 1, 1, "p.json").ok());
}

}  // namespace
}  // namespace epx
