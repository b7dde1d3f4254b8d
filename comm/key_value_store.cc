#include "comm/key_value_store.h"

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

}  // namespace epx::comm
