#include "common/logging.h"

#include <cstdio>
#include <string>

#include "gtest/gtest.h"

namespace epx {
namespace {

TEST(LoggingTest, PrefixesLevelRankAndLocation) {
  ::testing::internal::CaptureStderr();
  SetLogRank(3);
  EPX_LOG(Warning) << "expert " << 5 << " is hot";
  SetLogRank(0);
  const std::string out = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(out.rfind("[W rank 3 logging_test.cc:", 0), 0u) << out;
  EXPECT_NE(out.find("] expert 5 is hot\n"), std::string::npos) << out;
}

TEST(LoggingTest, MessagesBelowTheMinimumLevelAreDropped) {
  ::testing::internal::CaptureStderr();
  SetMinLogLevel(LogLevel::kWarning);
  EPX_LOG(Info) << "quiet";
  SetMinLogLevel(LogLevel::kInfo);
  EPX_LOG(Info) << "loud";
  const std::string out = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(out.find("quiet"), std::string::npos);
  EXPECT_NE(out.find("loud"), std::string::npos);
}

}  // namespace
}  // namespace epx
