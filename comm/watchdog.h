// Waiting on work a device runs on its own (NCCL kernels on a stream) without hanging on a peer
// that died: the waiter polls the work and the library's asynchronous error, and past the
// deadline aborts the communicator and reports whom it waited on. The state machine is kept
// apart from NCCL and CUDA (a Probe and a Clock) so that host tests drive it with fakes.
#ifndef EPX_COMM_WATCHDOG_H_
#define EPX_COMM_WATCHDOG_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace epx::comm {

// What a watchdog watches.
class WatchProbe {
 public:
  virtual ~WatchProbe() = default;
  // True once the work is done; an error once the communicator reported one (its asynchronous
  // error, or the stream's).
  virtual absl::StatusOr<bool> Poll() = 0;
  // Stops the communicator's pending work so that nothing waits on a dead peer; called at most
  // once per wait, after which the communicator is unusable.
  virtual void Abort() = 0;
};

class WatchClock {
 public:
  virtual ~WatchClock() = default;
  virtual absl::Time Now() = 0;
  // Between two polls: gives up the core for a moment (`polls` made so far, for a backoff).
  virtual void Pause(int64_t polls) = 0;
};
// The real clock: spins for the first polls, then yields, then sleeps up to 100 µs.
WatchClock& SystemWatchClock();

// Polls `probe` until it is done. On an error from Poll: Abort, then Unavailable carrying it.
// Past `timeout` (absl::InfiniteDuration(): never): Abort, then Unavailable "<what>: rank(s)
// <peers> did not answer within <timeout>". `peers`: the ranks the work waits on.
absl::Status WaitWithWatchdog(WatchProbe& probe, WatchClock& clock, absl::Duration timeout,
                              const std::vector<int>& peers, const std::string& what);

}  // namespace epx::comm

#endif  // EPX_COMM_WATCHDOG_H_
