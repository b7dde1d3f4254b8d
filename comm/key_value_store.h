// The rendezvous store a data plane bootstraps through (gloo's peer addresses, later the NCCL
// unique id): the coordinator owns one in memory and serves it to the workers over the control
// plane (proto/epx/v1/cluster.proto, StoreSet/StoreGet), as vLLM and SGLang serve a TCP store
// from rank 0.
//
// Keys are write-once, so a data plane formed again (a new epoch) uses a new key prefix.
// Implementations are thread-safe.
#ifndef EPX_COMM_KEY_VALUE_STORE_H_
#define EPX_COMM_KEY_VALUE_STORE_H_

#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace epx::comm {

class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;
  // Sets `key` once. Setting it again with the same value is OK (a retried call); with another
  // value AlreadyExists. Does not block (beyond one call to the store's owner).
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // The value of `key`, waiting up to `timeout` for it to be set: DeadlineExceeded naming the
  // key when it is not; Unavailable when the store cannot be reached.
  virtual absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) = 0;
};

// The in-memory store (the coordinator's).
class MemoryKeyValueStore : public KeyValueStore {
 public:
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) override;

 private:
  absl::Mutex mu_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
};

// A store in files of one directory every rank sees (ranks on one host, or a shared file system):
// for processes that share no control plane, such as a benchmark's ranks started by mpirun or a
// test's. A value is written under another name and renamed, so a reader never sees half of it;
// Get polls for the file every 5 ms. Keys may contain '/' (stored as '_').
class FileKeyValueStore : public KeyValueStore {
 public:
  explicit FileKeyValueStore(std::string dir) : dir_(std::move(dir)) {}
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) override;

 private:
  std::string Path(const std::string& key) const;
  std::string dir_;
};

}  // namespace epx::comm

#endif  // EPX_COMM_KEY_VALUE_STORE_H_
