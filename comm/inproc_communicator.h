// A Communicator whose ranks are threads of one process, for tests: the same protocol code runs
// as it would under MPI, and a test can make a rank disappear (Kill) to check failure handling.
//
// InProcGroup is thread-safe; each Communicator it hands out belongs to one thread.
#ifndef EPX_COMM_INPROC_COMMUNICATOR_H_
#define EPX_COMM_INPROC_COMMUNICATOR_H_

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>

#include "comm/communicator.h"

namespace epx::comm {

class InProcGroup {
 public:
  explicit InProcGroup(int world_size);

  // The communicator of `rank`; call once per rank. REQUIRES: 0 <= rank < world_size.
  std::unique_ptr<Communicator> Join(int rank);

  // Marks `rank` as gone: its pending and future messages are dropped, and peers waiting for it
  // get Unavailable.
  void Kill(int rank);
  // Whether Abort() was called, and its message.
  bool aborted() const;
  std::string abort_message() const;

 private:
  friend class InProcCommunicator;
  using Key = std::tuple<int, int, int>;  // src, dst, tag

  void Send(int src, int dst, Tag tag, const void* data, int64_t bytes);
  // Waits for the next message src -> dst with `tag` until `deadline`.
  absl::Status Recv(int src, int dst, Tag tag, absl::Time deadline, std::string* out);
  bool Ready(int src, int dst, Tag tag) const;
  void Abort(const std::string& message);

  const int world_size_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<Key, std::deque<std::string>> mailboxes_;
  std::set<int> dead_;
  bool aborted_ = false;
  std::string abort_message_;
};

}  // namespace epx::comm

#endif  // EPX_COMM_INPROC_COMMUNICATOR_H_
