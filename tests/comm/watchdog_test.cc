// The watchdog of the NCCL data plane as a state machine: a fake probe (the stream and
// ncclCommGetAsyncError) and a fake clock that moves only when the watchdog pauses.
#include "comm/watchdog.h"

#include <gtest/gtest.h>

#include <string>

namespace epx::comm {
namespace {

class FakeProbe : public WatchProbe {
 public:
  // Done after `polls_until_done` polls (-1: never); an error at poll `error_at` (-1: none).
  FakeProbe(int polls_until_done, int error_at = -1)
      : until_done_(polls_until_done), error_at_(error_at) {}
  absl::StatusOr<bool> Poll() override {
    ++polls;
    if (error_at_ >= 0 && polls >= error_at_)
      return absl::InternalError(
          "NCCL error 6 (remote process exited or there was a network error)");
    return until_done_ >= 0 && polls >= until_done_;
  }
  void Abort() override { ++aborts; }
  int polls = 0, aborts = 0;

 private:
  int until_done_, error_at_;
};

// Every pause moves time on by `step`.
class FakeClock : public WatchClock {
 public:
  explicit FakeClock(absl::Duration step) : step_(step) {}
  absl::Time Now() override { return now_; }
  void Pause(int64_t) override {
    now_ += step_;
    ++pauses;
  }
  int pauses = 0;

 private:
  absl::Time now_ = absl::UnixEpoch();
  absl::Duration step_;
};

TEST(WatchdogTest, WorkThatFinishesReturnsOkWithoutAnAbort) {
  FakeProbe probe(5);
  FakeClock clock(absl::Milliseconds(1));
  EXPECT_TRUE(WaitWithWatchdog(probe, clock, absl::Seconds(1), {1}, "layer 0 combine").ok());
  EXPECT_EQ(probe.polls, 5);
  EXPECT_EQ(probe.aborts, 0);
}

TEST(WatchdogTest, PastTheDeadlineAbortsOnceAndNamesTheRanksAndTheExchange) {
  FakeProbe probe(-1);
  FakeClock clock(absl::Milliseconds(100));
  const absl::Status s =
      WaitWithWatchdog(probe, clock, absl::Seconds(2), {1, 3}, "layer 7 combine");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("layer 7 combine: ranks 1, 3 did not answer within 2s"),
            std::string::npos)
      << s;
  EXPECT_NE(s.message().find("aborted"), std::string::npos) << s;
  EXPECT_EQ(probe.aborts, 1);
  // Polled until the clock passed the deadline, and not after.
  EXPECT_EQ(clock.pauses, 20);
}

TEST(WatchdogTest, AnAsynchronousErrorAbortsAtOnceWithTheLibrarysMessage) {
  FakeProbe probe(-1, 3);
  FakeClock clock(absl::Milliseconds(1));
  const absl::Status s =
      WaitWithWatchdog(probe, clock, absl::InfiniteDuration(), {0}, "layer 2 counts");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("layer 2 counts: waiting on rank 0: NCCL error 6"), std::string::npos)
      << s;
  EXPECT_EQ(probe.aborts, 1);
  EXPECT_EQ(probe.polls, 3);
}

TEST(WatchdogTest, AnInfiniteTimeoutKeepsWaiting) {
  FakeProbe probe(10000);
  FakeClock clock(absl::Hours(1));
  EXPECT_TRUE(WaitWithWatchdog(probe, clock, absl::InfiniteDuration(), {0}, "next step").ok());
  EXPECT_EQ(probe.aborts, 0);
  EXPECT_EQ(clock.pauses, 9999);
}

TEST(WatchdogTest, AZeroTimeoutStillPollsOnce) {
  FakeProbe done(1);
  FakeClock clock(absl::Milliseconds(1));
  EXPECT_TRUE(WaitWithWatchdog(done, clock, absl::ZeroDuration(), {1}, "x").ok());
  FakeProbe never(-1);
  EXPECT_EQ(WaitWithWatchdog(never, clock, absl::ZeroDuration(), {1}, "x").code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(never.polls, 1);
}

}  // namespace
}  // namespace epx::comm
