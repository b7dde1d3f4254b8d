#include "comm/watchdog.h"

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace epx::comm {
namespace {

class SystemClock final : public WatchClock {
 public:
  absl::Time Now() override { return absl::Now(); }
  void Pause(int64_t polls) override {
    if (polls < 64) return;  // the exchange of a decode step is over within microseconds
    if (polls < 1024) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(polls < 4096 ? 10 : 100));
  }
};

std::string Ranks(const std::vector<int>& peers) {
  if (peers.empty()) return "no rank";
  return absl::StrCat(peers.size() == 1 ? "rank " : "ranks ", absl::StrJoin(peers, ", "));
}

}  // namespace

WatchClock& SystemWatchClock() {
  static SystemClock clock;
  return clock;
}

absl::Status WaitWithWatchdog(WatchProbe& probe, WatchClock& clock, absl::Duration timeout,
                              const std::vector<int>& peers, const std::string& what) {
  const absl::Time start = clock.Now();
  const absl::Time deadline =
      timeout == absl::InfiniteDuration() ? absl::InfiniteFuture() : start + timeout;
  for (int64_t polls = 0;; ++polls) {
    absl::StatusOr<bool> done = probe.Poll();
    if (!done.ok()) {
      probe.Abort();
      return absl::UnavailableError(absl::StrCat(what, ": waiting on ", Ranks(peers), ": ",
                                                 done.status().message(),
                                                 " (the communicator was aborted)"));
    }
    if (*done) return absl::OkStatus();
    if (clock.Now() >= deadline) {
      probe.Abort();
      return absl::UnavailableError(
          absl::StrCat(what, ": ", Ranks(peers), " did not answer within ",
                       absl::FormatDuration(timeout), " (the communicator was aborted)"));
    }
    clock.Pause(polls);
  }
}

}  // namespace epx::comm
