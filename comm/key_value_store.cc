#include "comm/key_value_store.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace epx::comm {

absl::Status MemoryKeyValueStore::Set(const std::string& key, const std::string& value) {
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = values_.emplace(key, value);
  if (!inserted && it->second != value)
    return absl::AlreadyExistsError(
        absl::StrCat("store key \"", key, "\" is already set to another value"));
  return absl::OkStatus();
}

absl::StatusOr<std::string> MemoryKeyValueStore::Get(const std::string& key,
                                                     absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto is_set = [this, &key]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return values_.count(key) > 0;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&is_set), timeout))
    return absl::DeadlineExceededError(absl::StrCat("store key \"", key, "\" was not set within ",
                                                    absl::FormatDuration(timeout)));
  return values_.at(key);
}

std::string FileKeyValueStore::Path(const std::string& key) const {
  std::string name = key;
  for (char& c : name)
    if (c == '/') c = '_';
  return dir_ + "/" + name;
}

absl::Status FileKeyValueStore::Set(const std::string& key, const std::string& value) {
  const std::string path = Path(key);
  {
    std::ofstream out(path + ".tmp", std::ios::binary);
    out << value;
    if (!out.good())
      return absl::UnavailableError(absl::StrCat("cannot write ", path, ".tmp"));
  }
  std::error_code error;
  std::filesystem::rename(path + ".tmp", path, error);
  if (error) return absl::UnavailableError(absl::StrCat("cannot rename to ", path, ": ",
                                                        error.message()));
  return absl::OkStatus();
}

absl::StatusOr<std::string> FileKeyValueStore::Get(const std::string& key,
                                                   absl::Duration timeout) {
  const std::string path = Path(key);
  const absl::Time end = absl::Now() + timeout;
  while (!std::filesystem::exists(path)) {
    if (absl::Now() > end)
      return absl::DeadlineExceededError(absl::StrCat("no key \"", key, "\" in ", dir_, " within ",
                                                      absl::FormatDuration(timeout)));
    absl::SleepFor(absl::Milliseconds(5));
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace epx::comm
