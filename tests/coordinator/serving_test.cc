// Serving logic without gRPC: the chat template, the membership view that drives readiness, and
// the scheduler on the tiny model (batch invariance of streamed tokens, stop strings held back,
// the engine's KV cache back to empty).
#include <atomic>
#include <thread>

#include "common/tokenizer.h"
#include "coordinator/chat_template.h"
#include "coordinator/membership.h"
#include "coordinator/scheduler.h"
#include "coordinator/services.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/runtime.h"
#include "tests/coordinator/test_util.h"
#include "worker/control_client.h"

namespace epx {
namespace {

std::unique_ptr<Tokenizer> TinyTokenizer() {
  auto t = Tokenizer::FromFile(testing::TinyModelDir() + "/tokenizer.model");
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(*t);
}

TEST(ChatTemplateTest, MixtralInstructFormat) {
  auto tokenizer = TinyTokenizer();
  auto ids = ApplyChatTemplate(*tokenizer, {{"user", "Hi"}, {"assistant", "Hello"},
                                            {"user", "Bye"}});
  ASSERT_TRUE(ids.ok()) << ids.status();
  std::vector<int32_t> want = {tokenizer->bos_id()};
  for (const char* part : {"[INST] Hi [/INST]", "Hello"}) {
    auto p = tokenizer->Encode(part, false);
    want.insert(want.end(), p->begin(), p->end());
  }
  want.push_back(tokenizer->eos_id());
  auto last = tokenizer->Encode("[INST] Bye [/INST]", false);
  want.insert(want.end(), last->begin(), last->end());
  EXPECT_EQ(*ids, want);
  // A system message goes before the first user message.
  auto with_system = ApplyChatTemplate(*tokenizer, {{"system", "Be brief."}, {"user", "Hi"}});
  auto joined = tokenizer->Encode("[INST] Be brief.\n\nHi [/INST]", false);
  ASSERT_TRUE(with_system.ok());
  EXPECT_EQ(std::vector<int32_t>(with_system->begin() + 1, with_system->end()), *joined);
  EXPECT_FALSE(ApplyChatTemplate(*tokenizer, {{"user", "a"}, {"assistant", "b"}}).ok());
  EXPECT_FALSE(ApplyChatTemplate(*tokenizer, {{"user", "a"}, {"system", "b"}}).ok());
}

TEST(MembershipTest, ReadyOnlyWithEveryWorkerRegisteredAndHeardFrom) {
  auto placement = Placement::RoundRobin(8, 2);
  ASSERT_TRUE(placement.ok());
  Membership m(&*placement, {"build-1", 42, "mpi"},
               {.heartbeat_interval = absl::Milliseconds(100),
                .heartbeat_timeout = absl::Seconds(1)});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_EQ(m.NotReadyReason(t0), "worker 1 has not registered");
  WorkerInfo w{.rank = 1, .host = "a", .device = "cpu", .pid = 1, .build_id = "build-1",
               .config_hash = 42, .experts = {0, 2, 4, 6}, .data_plane = "mpi"};
  ASSERT_EQ(m.Register(w, t0).value_or(-1), 1);
  WorkerInfo w2 = w;
  w2.rank = 2;
  w2.pid = 2;
  w2.experts = {1, 3, 5, 7};
  WorkerInfo bad = w2;
  bad.build_id = "build-2";
  EXPECT_EQ(m.Register(bad, t0).status().code(), absl::StatusCode::kFailedPrecondition);
  bad = w2;
  bad.config_hash = 7;
  EXPECT_EQ(m.Register(bad, t0).status().code(), absl::StatusCode::kFailedPrecondition);
  bad = w2;
  bad.experts = {1, 3};
  EXPECT_EQ(m.Register(bad, t0).status().code(), absl::StatusCode::kFailedPrecondition);
  bad.rank = 3;
  EXPECT_EQ(m.Register(bad, t0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.Heartbeat(2, "", t0).code(), absl::StatusCode::kNotFound);
  ASSERT_EQ(m.Register(w2, t0).value_or(-1), 2);
  EXPECT_EQ(m.NotReadyReason(t0 + absl::Milliseconds(500)), "");
  ASSERT_TRUE(m.Heartbeat(1, "", t0 + absl::Seconds(2)).ok());
  const std::string reason = m.NotReadyReason(t0 + absl::Seconds(2));
  EXPECT_NE(reason.find("worker 2 (a) silent for 2s"), std::string::npos) << reason;
  EXPECT_FALSE(m.Workers(t0 + absl::Seconds(2))[1].alive);
  ASSERT_TRUE(m.Heartbeat(2, "", t0 + absl::Seconds(2)).ok());
  EXPECT_EQ(m.NotReadyReason(t0 + absl::Seconds(2)), "");
  m.MarkFailed(absl::DeadlineExceededError("rank 2 did not answer"));
  EXPECT_NE(m.NotReadyReason(t0 + absl::Seconds(2)).find("data plane failed"), std::string::npos);
}

// Registration as the rendezvous of a launcher-free cluster: the coordinator assigns ranks,
// accepts a requested one once, refuses what does not match, and stops at W workers.
TEST(MembershipTest, AssignsRanksAndRefusesWhatDoesNotBelong) {
  auto placement = Placement::RoundRobin(8, 3);
  ASSERT_TRUE(placement.ok());
  Membership m(&*placement, {"build-1", 42, "gloo"}, {});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_FALSE(m.AwaitAllRegistered(absl::ZeroDuration()));
  auto worker = [](int pid, int rank) {
    return WorkerInfo{.rank = rank, .host = "h", .device = "cpu", .pid = pid,
                      .build_id = "build-1", .config_hash = 42, .data_plane = "gloo"};
  };
  // Asked-for rank 3 first; the others get the lowest free ones.
  EXPECT_EQ(m.Register(worker(10, 3), t0).value_or(-1), 3);
  EXPECT_EQ(m.Register(worker(11, 0), t0).value_or(-1), 1);
  // The same process again (a retried call) keeps its rank; it cannot take a second one.
  EXPECT_EQ(m.Register(worker(11, 0), t0).value_or(-1), 1);
  EXPECT_EQ(m.Register(worker(11, 2), t0).status().code(), absl::StatusCode::kAlreadyExists);
  // A duplicate rank from another process, naming the holder.
  absl::StatusOr<int> dup = m.Register(worker(12, 3), t0);
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_NE(dup.status().message().find("rank 3 is already held by worker 3 (h pid 10)"),
            std::string::npos)
      << dup.status();
  WorkerInfo other_plane = worker(13, 0);
  other_plane.data_plane = "nccl";
  absl::StatusOr<int> plane = m.Register(other_plane, t0);
  EXPECT_EQ(plane.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(plane.status().message().find("data plane \"nccl\" but the coordinator uses \"gloo\""),
            std::string::npos)
      << plane.status();
  EXPECT_EQ(m.Register(worker(14, 0), t0).value_or(-1), 2);
  EXPECT_TRUE(m.AwaitAllRegistered(absl::ZeroDuration()));
  // A fourth worker beyond W = 3.
  absl::StatusOr<int> extra = m.Register(worker(15, 0), t0);
  EXPECT_EQ(extra.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(extra.status().message().find("already has its 3 workers"), std::string::npos)
      << extra.status();
  // The experts a worker was given are the placement's.
  EXPECT_EQ(m.Workers(t0)[1].info.experts, placement->experts_of(2));
  EXPECT_EQ(m.NotReadyReason(t0), "");
}

// Containers repeat host names and pids: the instance id tells two processes apart, and the same
// instance registering again keeps its rank.
TEST(MembershipTest, InstanceIdTellsProcessesWithTheSameHostAndPidApart) {
  auto placement = Placement::RoundRobin(8, 2);
  ASSERT_TRUE(placement.ok());
  Membership m(&*placement, {"build-1", 42, "gloo"}, {});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  WorkerInfo a{.host = "pod", .pid = 1, .build_id = "build-1", .config_hash = 42,
               .data_plane = "gloo", .instance = "aaaa"};
  WorkerInfo b = a;
  b.instance = "bbbb";
  EXPECT_EQ(m.Register(a, t0).value_or(-1), 1);
  EXPECT_EQ(m.Register(b, t0).value_or(-1), 2);
  EXPECT_EQ(m.Register(a, t0).value_or(-1), 1);
  // Heartbeats carry the instance: another process cannot keep a rank alive.
  EXPECT_TRUE(m.Heartbeat(1, "aaaa", t0).ok());
  EXPECT_EQ(m.Heartbeat(1, "bbbb", t0).code(), absl::StatusCode::kNotFound);
}

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    RuntimeOptions options;
    options.model_dir = testing::TinyModelDir();
    options.engine.kv_blocks = 64;
    options.engine.kv_block_size = 8;
    auto rt = Runtime::Start(options);
    ASSERT_TRUE(rt.ok()) << rt.status();
    runtime_ = std::move(*rt);
    tokenizer_ = TinyTokenizer();
  }
  std::vector<GenerationEvent> Drain(RequestStream& stream) {
    std::vector<GenerationEvent> events;
    GenerationEvent e;
    while (events.empty() || !events.back().last()) {
      if (stream.Next(&e, absl::Seconds(30))) events.push_back(e);
      else break;
    }
    return events;
  }
  std::unique_ptr<Runtime> runtime_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(SchedulerTest, AdmissionByBlocksAndBlocksBackWhenDone) {
  SchedulerOptions options;
  options.max_running = 4;
  options.max_batch_tokens = 16;
  Scheduler scheduler(&runtime_->engine(), tokenizer_.get(), options);
  std::thread loop([&] { EXPECT_TRUE(scheduler.Run().ok()); });
  // 64 blocks of 8 tokens: 3 requests of 20 + 150 tokens need 22 blocks each, so only 2 run at
  // a time; all 3 finish, each with its full output.
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 3; ++i) {
    GenerationRequest r;
    r.prompt = std::vector<int32_t>(20, 5 + i);
    r.max_tokens = 150;
    r.ignore_eos = true;
    auto s = scheduler.Submit(r);
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(*s);
  }
  GenerationRequest too_big;
  too_big.prompt = {1};
  too_big.max_tokens = 64 * 8;
  EXPECT_EQ(scheduler.Submit(too_big).status().code(), absl::StatusCode::kInvalidArgument);
  for (auto& s : streams) {
    std::vector<GenerationEvent> events = Drain(*s);
    ASSERT_FALSE(events.empty());
    EXPECT_EQ(events.back().finish, FinishReason::kLength);
    EXPECT_EQ(events.back().completion_tokens, 150);
    EXPECT_EQ(events.size(), 150u);
  }
  SchedulerStats stats = scheduler.stats();
  EXPECT_EQ(stats.kv_blocks_used, 0);
  EXPECT_EQ(stats.finished, 3);
  EXPECT_EQ(stats.running, 0);
  scheduler.Stop();
  loop.join();
}

TEST_F(SchedulerTest, StopStringsAreHeldBackAndCut) {
  Scheduler scheduler(&runtime_->engine(), tokenizer_.get(), SchedulerOptions{});
  std::thread loop([&] { EXPECT_TRUE(scheduler.Run().ok()); });
  GenerationRequest r;
  r.prompt = *tokenizer_->Encode("Once upon a time", true);
  r.max_tokens = 30;
  r.ignore_eos = true;
  std::string full;
  for (const auto& e : Drain(**scheduler.Submit(r))) full += e.text;
  ASSERT_GE(full.size(), 8u);
  const std::string stop = full.substr(full.size() / 2, 2);
  r.stop = {stop, "\x01never"};
  std::string cut;
  std::vector<GenerationEvent> events = Drain(**scheduler.Submit(r));
  for (const auto& e : events) {
    cut += e.text;
    EXPECT_EQ(cut.find(stop), std::string::npos) << "a stop string never reaches the client";
  }
  EXPECT_EQ(cut, full.substr(0, full.find(stop)));
  EXPECT_EQ(events.back().finish, FinishReason::kStop);
  EXPECT_EQ(events.back().matched_stop, stop);
  scheduler.Stop();
  loop.join();
}

// The latency histograms on an injected clock that moves 10 ms at every reading. One request of
// N tokens reads it at submission (10 ms), admission (20), each token (30 .. 20 + 10 N) and
// retirement (30 + 10 N): queue time 10 ms, time to first token 20 ms, N - 1 inter-token gaps
// of 10 ms, end to end 20 + 10 N ms, each in its bucket.
TEST_F(SchedulerTest, LatencyHistogramsFollowTheInjectedClock) {
  std::atomic<int64_t> ticks{0};
  SchedulerOptions options;
  options.clock = [&ticks] { return absl::UnixEpoch() + absl::Milliseconds(10 * ++ticks); };
  Scheduler scheduler(&runtime_->engine(), tokenizer_.get(), options);
  std::thread loop([&] { EXPECT_TRUE(scheduler.Run().ok()); });
  constexpr int kTokens = 6;
  GenerationRequest r;
  r.prompt = {1, 50, 60};
  r.max_tokens = kTokens;
  r.ignore_eos = true;
  auto stream = scheduler.Submit(r);
  ASSERT_TRUE(stream.ok()) << stream.status();
  ASSERT_EQ(Drain(**stream).back().completion_tokens, kTokens);
  scheduler.Stop();
  loop.join();

  const ServingHistograms& h = scheduler.histograms();
  const auto expect = [](const Histogram& histogram, uint64_t count, double sum, double each,
                         const char* name) {
    SCOPED_TRACE(name);
    const Histogram::Snapshot s = histogram.snapshot();
    EXPECT_EQ(s.count, count);
    EXPECT_NEAR(s.sum, sum, 1e-9);
    ASSERT_EQ(s.cumulative.size(), s.bounds.size() + 1);
    EXPECT_EQ(s.cumulative.back(), count);
    for (size_t b = 0; b < s.bounds.size(); ++b)
      EXPECT_EQ(s.cumulative[b], s.bounds[b] + 1e-12 >= each ? count : 0u) << "le " << s.bounds[b];
  };
  expect(h.queue_time, 1, 0.010, 0.010, "queue_time");
  expect(h.time_to_first_token, 1, 0.020, 0.020, "time_to_first_token");
  expect(h.inter_token_latency, kTokens - 1, 0.010 * (kTokens - 1), 0.010, "inter_token_latency");
  expect(h.e2e_latency, 1, 0.020 + 0.010 * kTokens, 0.020 + 0.010 * kTokens, "e2e_latency");
}

}  // namespace
}  // namespace epx

namespace epx {
namespace {

using ::testing::ElementsAre;

// Epochs of a launcher-free cluster: members learn theirs, survivors of a failure are seen
// waiting for the next, a lost process is refused and its slot taken by a new one, a drained
// one is let go, and a formed cluster grows.
TEST(MembershipTest, EpochsLossesJoinsAndGrowth) {
  auto placement = Placement::RoundRobin(8, 3, 2);
  ASSERT_TRUE(placement.ok());
  Membership m(
      &*placement, {"build-1", 42, "gloo"},
      {.heartbeat_interval = absl::Milliseconds(100), .heartbeat_timeout = absl::Minutes(5)});
  auto worker = [](const std::string& instance) {
    return WorkerInfo{.host = "h",
                      .device = "cpu",
                      .pid = 1,
                      .build_id = "build-1",
                      .config_hash = 42,
                      .data_plane = "gloo",
                      .instance = instance};
  };
  const absl::Time now = absl::Now();
  for (const char* id : {"a", "b", "c"}) ASSERT_TRUE(m.Register(worker(id), now).ok());
  // No epoch yet: ask again.
  EXPECT_EQ(m.AwaitEpoch(1, "a", 0, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(m.AwaitEpoch(1, "b", 0, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kNotFound);
  ClusterEpoch first{.number = 1, .members = {0, 1, 2, 3}, .store_prefix = "gloo/epoch-1/"};
  m.PublishEpoch(first, now);
  auto got = m.AwaitEpoch(2, "b", 0, absl::ZeroDuration());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->number, 1);
  EXPECT_EQ(got->DataPlaneRank(2), 2);
  EXPECT_EQ(m.NotReadyReason(now), "");
  // In epoch 1, nobody waits for the next until it asks.
  EXPECT_TRUE(m.AwaitWaiting({1, 3}, absl::ZeroDuration()).empty());
  EXPECT_EQ(m.AwaitEpoch(1, "a", 1, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.AwaitWaiting({1, 3}, absl::ZeroDuration()), ElementsAre(1));

  // Worker 2 lost: its process is refused, its slot free for a new one, who waits to join.
  m.MarkLost(2, "layer 0 combine: lost rank 2", now);
  EXPECT_EQ(m.AwaitEpoch(2, "b", 1, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto again = m.Register(worker("b"), now);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(again.status().message().find("was removed from the cluster"), std::string::npos);
  EXPECT_THAT(m.Joiners(), ElementsAre());
  ASSERT_EQ(m.Register(worker("d"), now).value_or(-1), 2);
  EXPECT_THAT(m.Joiners(), ElementsAre(2));
  EXPECT_EQ(m.AwaitEpoch(2, "d", 0, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.AwaitWaiting({1, 2, 3}, absl::ZeroDuration()), ElementsAre(1, 2));
  m.PublishEpoch({.number = 2, .members = {0, 1, 2, 3}}, now);
  EXPECT_THAT(m.Joiners(), ElementsAre());
  EXPECT_EQ(m.AwaitEpoch(2, "d", 0, absl::ZeroDuration()).value_or(ClusterEpoch{}).number, 2);

  // Worker 3 drained: it is let go (Cancelled), and the formed cluster grows past 3 slots.
  m.Release(3, "drained", now);
  EXPECT_EQ(m.AwaitEpoch(3, "c", 2, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kCancelled);
  ASSERT_EQ(m.Register(worker("e"), now).value_or(-1), 3);
  EXPECT_EQ(m.Register(worker("f"), now).status().code(), absl::StatusCode::kResourceExhausted);
  m.AllowGrowth(4);
  EXPECT_EQ(m.Register(worker("f"), now).value_or(-1), 4);
  EXPECT_EQ(m.num_workers(), 4);
  std::vector<std::string> kinds;
  for (const ClusterEvent& e : m.events()) kinds.push_back(e.kind);
  EXPECT_THAT(kinds, ElementsAre("lost", "joined", "re-formed", "left"));

  // Targets: a worker's heartbeat reports what it loaded and learns what it should hold.
  m.SetTargets(7, {{}, {0, 1}, {2}, {3}, {4, 5, 6, 7}}, "by hand");
  auto target = m.Heartbeat(4, "f", {9}, now);
  ASSERT_TRUE(target.ok());
  EXPECT_EQ(target->version, 7);
  EXPECT_THAT(target->experts, ElementsAre(4, 5, 6, 7));
  EXPECT_THAT(m.Loaded(4).value_or(std::vector<int>{}), ElementsAre(9));
  EXPECT_FALSE(m.Loaded(1).has_value());
}

// The coordinator leaving an epoch's data plane after a failure reaches a worker through its
// heartbeats' answers (an NCCL worker's wait on that data plane ends by it), once per epoch.
TEST(ControlPlaneTest, HeartbeatsTellAWorkerTheEpochTheCoordinatorLeft) {
  auto placement = Placement::RoundRobin(8, 1, 1);
  ASSERT_TRUE(placement.ok());
  Membership m(
      &*placement, {"build-1", 42, "nccl"},
      {.heartbeat_interval = absl::Milliseconds(10), .heartbeat_timeout = absl::Minutes(5)});
  absl::StatusOr<std::unique_ptr<ApiServer>> server =
      ApiServer::Start({.listen = "127.0.0.1:0"}, {.membership = &m});
  ASSERT_TRUE(server.ok()) << server.status();
  absl::Mutex mu;  // outlives the client's heartbeat thread
  std::vector<int64_t> told;
  std::unique_ptr<ControlClient> client = ControlClient::Create((*server)->address(), "");
  WorkerInfo self{.host = "h",
                  .device = "cuda",
                  .pid = 1,
                  .build_id = "build-1",
                  .config_hash = 42,
                  .data_plane = "nccl",
                  .instance = "a"};
  absl::StatusOr<Assignment> assigned = client->Register(self, absl::Seconds(30));
  ASSERT_TRUE(assigned.ok()) << assigned.status();
  self.rank = assigned->rank;
  client->OnLeftEpoch([&](int64_t epoch) {
    absl::MutexLock lock(&mu);
    told.push_back(epoch);
  });
  client->StartHeartbeats(self, absl::Milliseconds(10));
  m.LeftEpoch(2);
  m.LeftEpoch(1);  // an older one changes nothing
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(
        +[](std::vector<int64_t>* t) { return !t->empty(); }, &told));
  }
  m.LeftEpoch(3);
  absl::MutexLock lock(&mu);
  mu.Await(absl::Condition(
      +[](std::vector<int64_t>* t) { return t->size() >= 2; }, &told));
  EXPECT_THAT(told, ElementsAre(2, 3));
  EXPECT_EQ(m.left_epoch(), 3);
}

}  // namespace
}  // namespace epx
