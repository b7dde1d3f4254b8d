// Helpers shared by the tests of common/: a per-test scratch directory and the fixture paths.
#ifndef EPX_TESTS_COMMON_TEST_UTIL_H_
#define EPX_TESTS_COMMON_TEST_UTIL_H_

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace epx::test {

// The fixtures folder: $EPX_TEST_DATA_DIR when set (test binaries run away from their source
// tree, e.g. from a bundle made with deploy/bundle.sh --gpu-check), else the source tree's.
inline std::string TestDataDir() {
  const char* dir = std::getenv("EPX_TEST_DATA_DIR");
  return dir != nullptr && *dir != '\0' ? dir : EPX_TEST_DATA_DIR;
}
inline std::string TinyModelDir() { return TestDataDir() + "/tiny-mixtral"; }

// A fresh directory per test (suite, name and pid in the path, so ctest -j never shares one),
// removed afterwards.
class ScratchDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::filesystem::path(::testing::TempDir()) /
           absl::StrCat("epx_", info->test_suite_name(), "_", info->name(), "_", ::getpid());
    std::filesystem::remove_all(dir_);
    ASSERT_TRUE(std::filesystem::create_directories(dir_)) << dir_;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string dir() const { return dir_.string(); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

 private:
  std::filesystem::path dir_;
};

}  // namespace epx::test

#endif  // EPX_TESTS_COMMON_TEST_UTIL_H_
