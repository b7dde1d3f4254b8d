// The gloo data plane with every rank a thread of this process, over loopback TCP: the exchanges
// carry the right bytes (zero-byte pairs included), and a silent or vanished peer becomes a
// Status naming it instead of a hang. Also the rendezvous store and the data-plane factory.
#include <cstring>
#include <future>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "comm/data_plane.h"
#include "comm/gloo_communicator.h"
#include "comm/key_value_store.h"
#include "gtest/gtest.h"

namespace epx::comm {
namespace {

// Forms a gloo group of `world` ranks (each created on its own thread, as separate processes
// would) through one in-memory store.
std::vector<std::unique_ptr<Communicator>> FormGroup(int world, KeyValueStore* store,
                                                     const std::string& prefix) {
  std::vector<std::future<absl::StatusOr<std::unique_ptr<Communicator>>>> joining;
  for (int r = 0; r < world; ++r) {
    joining.push_back(std::async(std::launch::async, [=] {
      return CreateGlooCommunicator({.rank = r,
                                     .world_size = world,
                                     .store = store,
                                     .store_prefix = prefix,
                                     .host = "127.0.0.1",
                                     .connect_timeout = absl::Seconds(30)});
    }));
  }
  std::vector<std::unique_ptr<Communicator>> group;
  for (auto& j : joining) {
    absl::StatusOr<std::unique_ptr<Communicator>> c = j.get();
    EXPECT_TRUE(c.ok()) << c.status();
    group.push_back(c.ok() ? *std::move(c) : nullptr);
  }
  return group;
}

TEST(MemoryKeyValueStoreTest, WriteOnceAndBlockingGet) {
  MemoryKeyValueStore store;
  EXPECT_EQ(store.Get("k", absl::ZeroDuration()).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  absl::Notification waiting;
  auto later = std::async(std::launch::async, [&] {
    waiting.Notify();
    return store.Get("k", absl::InfiniteDuration());
  });
  waiting.WaitForNotification();
  ASSERT_TRUE(store.Set("k", "v").ok());
  EXPECT_EQ(later.get().value_or(""), "v");
  EXPECT_TRUE(store.Set("k", "v").ok());  // a retried call
  EXPECT_EQ(store.Set("k", "w").code(), absl::StatusCode::kAlreadyExists);
}

// Rank r sends (r + 1) * (p + 1) % 3 int32s to each rank p (some pairs send nothing), valued
// by (r, p, index); every rank checks what it got.
TEST(GlooCommunicatorTest, AllToAllVBroadcastAllGatherCarryTheBytes) {
  constexpr int kWorld = 4;
  MemoryKeyValueStore store;
  auto group = FormGroup(kWorld, &store, "test/1/");
  ASSERT_EQ(group.size(), kWorld);
  for (auto& c : group) ASSERT_NE(c, nullptr);
  auto count = [](int from, int to) { return (from + 1) * (to + 1) % 3; };
  auto value = [](int from, int to, int i) { return from * 10000 + to * 100 + i; };
  std::vector<std::thread> threads;
  std::vector<std::string> failures(kWorld);
  for (int r = 0; r < kWorld; ++r) {
    threads.emplace_back([&, r] {
      Communicator& c = *group[r];
      std::vector<int32_t> send, recv;
      std::vector<int64_t> send_bytes(kWorld), recv_bytes(kWorld);
      int64_t recv_total = 0;
      for (int p = 0; p < kWorld; ++p) {
        for (int i = 0; i < count(r, p); ++i) send.push_back(value(r, p, i));
        send_bytes[p] = count(r, p) * 4;
        recv_bytes[p] = count(p, r) * 4;
        recv_total += count(p, r);
      }
      recv.assign(recv_total, -1);
      absl::Status s = c.AllToAllV(send.data(), send_bytes, recv.data(), recv_bytes,
                                   Tag::kDispatch, absl::Seconds(30), "test exchange");
      if (!s.ok()) return void(failures[r] = s.ToString());
      size_t at = 0;
      for (int p = 0; p < kWorld; ++p)
        for (int i = 0; i < count(p, r); ++i)
          if (recv[at++] != value(p, r, i)) failures[r] += "wrong row; ";
      int64_t header = r == 2 ? 77 : 0;
      s = c.Broadcast(&header, sizeof(header), 2, Tag::kStepHeader, absl::Seconds(30), "header");
      if (!s.ok() || header != 77) failures[r] += "broadcast; " + s.ToString();
      const int32_t mine = r * 3;
      std::vector<int32_t> all(kWorld, -1);
      s = c.AllGather(&mine, sizeof(mine), all.data(), Tag::kHandshake, absl::Seconds(30),
                      "gather");
      for (int p = 0; p < kWorld; ++p)
        if (!s.ok() || all[p] != p * 3) failures[r] += "allgather; " + s.ToString();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kWorld; ++r) EXPECT_EQ(failures[r], "") << "rank " << r;
}

TEST(GlooCommunicatorTest, SilentPeerIsDeadlineExceededNamingIt) {
  MemoryKeyValueStore store;
  auto group = FormGroup(3, &store, "test/2/");
  ASSERT_EQ(group.size(), 3u);
  for (auto& c : group) ASSERT_NE(c, nullptr);
  // Rank 0 expects 8 bytes from each worker; rank 2 answers, rank 1 never does.
  std::vector<int64_t> none(3, 0), sizes = {0, 8, 8};
  auto answer = std::async(std::launch::async, [&] {
    int64_t v = 5;
    std::vector<int64_t> to_root = {8, 0, 0};
    return group[2]->AllToAllV(&v, to_root, nullptr, none, Tag::kCombine, absl::Seconds(30),
                               "answer");
  });
  std::vector<int64_t> recv(3);
  const absl::Status s = group[0]->AllToAllV(nullptr, none, recv.data(), sizes, Tag::kCombine,
                                             absl::Milliseconds(300), "layer 4 combine");
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_NE(s.message().find("layer 4 combine"), std::string::npos) << s;
  EXPECT_NE(s.message().find("rank(s) 1 did not answer rank 0"), std::string::npos) << s;
  // The communicator is unusable after a failure and says so.
  EXPECT_FALSE(group[0]->Broadcast(recv.data(), 8, 0, Tag::kStepHeader, absl::Seconds(1), "x").ok());
  answer.wait();
}

TEST(GlooCommunicatorTest, VanishedPeerIsUnavailableNamingIt) {
  MemoryKeyValueStore store;
  auto group = FormGroup(2, &store, "test/3/");
  ASSERT_EQ(group.size(), 2u);
  for (auto& c : group) ASSERT_NE(c, nullptr);
  // Rank 1 goes away (its sockets close, as when its process dies) while rank 0 waits for it
  // with no deadline at all: the wait must end anyway.
  std::vector<int64_t> none(2, 0), sizes = {0, 16};
  std::vector<int64_t> recv(2);
  auto waiting = std::async(std::launch::async, [&] {
    return group[0]->AllToAllV(nullptr, none, recv.data(), sizes, Tag::kCombine,
                               absl::InfiniteDuration(), "layer 0 combine");
  });
  group[1].reset();
  const absl::Status s = waiting.get();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("lost rank 1"), std::string::npos) << s;
}

// A peer gone before the call: whether its pair fails while posting or while waiting, the error
// names that peer, not another.
TEST(GlooCommunicatorTest, PeerGoneBeforeTheCallIsNamed) {
  MemoryKeyValueStore store;
  auto group = FormGroup(3, &store, "test/5/");
  ASSERT_EQ(group.size(), 3u);
  for (auto& c : group) ASSERT_NE(c, nullptr);
  group[2].reset();
  std::vector<int64_t> none(3, 0), sizes = {0, 8, 8};
  auto other = std::async(std::launch::async, [&] {
    int64_t v = 1;
    std::vector<int64_t> to_root = {8, 0, 0};
    return group[1]->AllToAllV(&v, to_root, nullptr, none, Tag::kCombine, absl::Seconds(2), "x");
  });
  std::vector<int64_t> recv(3);
  const absl::Status s = group[0]->AllToAllV(nullptr, none, recv.data(), sizes, Tag::kCombine,
                                             absl::Seconds(30), "layer 1 combine");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("lost rank 2"), std::string::npos) << s;
  other.wait();
}

TEST(GlooCommunicatorTest, RendezvousNamesTheRankThatNeverJoined) {
  MemoryKeyValueStore store;
  absl::StatusOr<std::unique_ptr<Communicator>> c =
      CreateGlooCommunicator({.rank = 0,
                              .world_size = 2,
                              .store = &store,
                              .store_prefix = "test/4/",
                              .host = "127.0.0.1",
                              .connect_timeout = absl::Milliseconds(200)});
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDeadlineExceeded) << c.status();
  EXPECT_NE(c.status().message().find("rank 1 did not join"), std::string::npos) << c.status();
  EXPECT_EQ(CreateGlooCommunicator({.rank = 2, .world_size = 2, .store = &store}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace epx::comm
