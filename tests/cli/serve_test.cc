// `epx serve` end to end over gRPC on a loopback port: outputs equal `epx eval` and the golden
// file, batch invariance under 32 concurrent streams, reproducible seeded sampling, every
// validation error, cancellation freeing KV blocks, overload, stop conditions, draining.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <iostream>
#include <latch>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "tests/coordinator/test_util.h"
#include "tests/serve_util.h"

namespace epx {
namespace {

using testing::Completion;
using testing::Generate;
using testing::ServerProcess;

// One server for the tests that leave it as they found it.
class ServeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess("epx_serve_shared", "",
                                "--model " + testing::TinyModelDir() +
                                    " --max-running 16 --max-batch-tokens 128");
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override { ASSERT_TRUE(server_->ok()) << server_->log(); }

  static v1::GenerateRequest Greedy(const std::vector<int32_t>& prompt, int max_tokens) {
    return testing::Greedy(prompt, max_tokens);
  }
  static v1::StatsResponse Stats() {
    grpc::ClientContext context;
    v1::StatsResponse stats;
    EXPECT_TRUE(server_->admin()->Stats(&context, {}, &stats).ok());
    return stats;
  }

  // Stats once nothing runs and `blocks` KV blocks are in use, or after 5 s.
  static v1::StatsResponse WaitForBlocks(uint32_t blocks) {
    v1::StatsResponse s;
    for (int i = 0; i < 100; ++i) {
      s = Stats();
      if (s.running_requests() == 0 && s.kv_blocks_used() == blocks) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return s;
  }

  static ServerProcess* server_;
};
ServerProcess* ServeTest::server_ = nullptr;

std::vector<std::vector<int32_t>> GoldenPrompts(std::vector<std::vector<int32_t>>* greedy) {
  auto file = SafetensorsFile::Open(testing::GoldenPath());
  EXPECT_TRUE(file.ok());
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; file.ok() && (*file)->Find("prompt_" + std::to_string(i) + ".tokens"); ++i) {
    const std::string p = "prompt_" + std::to_string(i);
    prompts.push_back(testing::ReadVector<int32_t>(**file, p + ".tokens"));
    if (greedy != nullptr) greedy->push_back(testing::ReadVector<int32_t>(**file, p + ".greedy"));
  }
  return prompts;
}

TEST_F(ServeTest, GreedyOverGrpcEqualsGoldenAndEval) {
  std::vector<std::vector<int32_t>> greedy;
  const auto prompts = GoldenPrompts(&greedy);
  ASSERT_FALSE(prompts.empty());
  auto stub = server_->generation();
  for (size_t i = 0; i < prompts.size(); ++i) {
    Completion c = Generate(*stub, Greedy(prompts[i], static_cast<int>(greedy[i].size())));
    ASSERT_TRUE(c.status.ok()) << c.status.error_message();
    EXPECT_EQ(c.tokens, greedy[i]) << "prompt " << i;
    EXPECT_EQ(c.last.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(c.last.usage().prompt_tokens(), prompts[i].size());
    EXPECT_EQ(c.last.usage().completion_tokens(), greedy[i].size());
    EXPECT_EQ(c.messages, static_cast<int>(greedy[i].size())) << "one message per token";
  }
}

TEST_F(ServeTest, ThirtyTwoConcurrentGreedyStreamsEqualTheirSingleRequestOutput) {
  auto prompts = GoldenPrompts(nullptr);
  std::mt19937 rng(11);
  while (prompts.size() < 32) {
    std::vector<int32_t> p(3 + rng() % 60);
    for (int32_t& t : p) t = 3 + static_cast<int32_t>(rng() % 500);
    prompts.push_back(p);
  }
  auto stub = server_->generation();
  std::vector<std::vector<int32_t>> alone(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    Completion c = Generate(*stub, Greedy(prompts[i], 10));
    ASSERT_TRUE(c.status.ok()) << c.status.error_message();
    alone[i] = c.tokens;
  }
  std::vector<Completion> together(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i)
    threads.emplace_back([&, i] { together[i] = Generate(*stub, Greedy(prompts[i], 10)); });
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(together[i].status.ok()) << together[i].status.error_message();
    EXPECT_EQ(together[i].tokens, alone[i]) << "stream " << i;
  }
}

TEST_F(ServeTest, SeededSamplingIsReproducible) {
  auto stub = server_->generation();
  v1::GenerateRequest r;
  r.set_text("The experts of a mixture");
  r.set_max_tokens(24);
  r.set_temperature(0.9f);
  r.set_top_k(50);
  r.set_top_p(0.95f);
  r.set_repetition_penalty(1.1f);
  r.set_ignore_eos(true);
  r.set_seed(7);
  Completion a = Generate(*stub, r), b = Generate(*stub, r);
  ASSERT_TRUE(a.status.ok() && b.status.ok()) << a.status.error_message();
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.text, b.text);
  r.set_seed(8);
  Completion c = Generate(*stub, r);
  ASSERT_TRUE(c.status.ok());
  EXPECT_NE(a.tokens, c.tokens) << "another seed, another draw";
}

TEST_F(ServeTest, EveryBadParameterIsInvalidArgumentWithAPreciseMessage) {
  auto base = [] {
    v1::GenerateRequest r;
    r.set_text("hello");
    r.set_max_tokens(4);
    return r;
  };
  struct Case {
    std::string name;
    std::function<void(v1::GenerateRequest&)> mutate;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"no prompt", [](auto& r) { r.clear_prompt(); }, "no prompt"},
      {"empty text", [](auto& r) { r.set_text(""); }, "prompt text is empty"},
      {"empty token ids", [](auto& r) { r.mutable_token_ids(); }, "token_ids is empty"},
      {"unknown token id",
       [](auto& r) {
         r.mutable_token_ids()->add_ids(1);
         r.mutable_token_ids()->add_ids(512);
       },
       "prompt token id 512 at index 1 is outside the vocabulary [0, 512)"},
      {"negative token id", [](auto& r) { r.mutable_token_ids()->add_ids(-1); },
       "prompt token id -1"},
      {"max_tokens 0", [](auto& r) { r.set_max_tokens(0); }, "max_tokens must be at least 1"},
      {"beyond the context", [](auto& r) { r.set_max_tokens(5000); },
       "exceeds the context of 4096 tokens"},
      {"negative temperature", [](auto& r) { r.set_temperature(-0.5f); },
       "temperature must be >= 0"},
      {"NaN temperature", [](auto& r) { r.set_temperature(std::nanf("")); },
       "temperature must be >= 0"},
      {"top_p 0", [](auto& r) { r.set_top_p(0.f); }, "top_p must be in (0, 1]"},
      {"top_p above 1", [](auto& r) { r.set_top_p(1.5f); }, "top_p must be in (0, 1]"},
      {"top_k -2", [](auto& r) { r.set_top_k(-2); }, "top_k must be"},
      {"repetition penalty 0", [](auto& r) { r.set_repetition_penalty(0.f); },
       "repetition_penalty must be > 0"},
      {"empty stop string", [](auto& r) { r.add_stop(""); }, "stop string 0 is empty"},
      {"too many stop strings",
       [](auto& r) {
         for (int i = 0; i < 17; ++i) r.add_stop(absl::StrCat("x", i));
       },
       "at most 16 stop strings"},
      {"long stop string", [](auto& r) { r.add_stop(std::string(300, 'a')); },
       "stop string 0 is 300 bytes"},
      {"stop token id", [](auto& r) { r.add_stop_token_ids(9999); },
       "stop token id 9999 is outside the vocabulary"},
      {"oversize request", [](auto& r) { r.set_text(std::string(2 << 20, 'a')); },
       "the server accepts at most"},
      {"chat without messages", [](auto& r) { r.mutable_chat(); }, "chat has no messages"},
      {"chat with a bad role",
       [](auto& r) {
         auto* m = r.mutable_chat()->add_messages();
         m->set_role("robot");
         m->set_content("hi");
       },
       "has role \"robot\""},
      {"chat not alternating",
       [](auto& r) {
         for (int i = 0; i < 2; ++i) {
           auto* m = r.mutable_chat()->add_messages();
           m->set_role("user");
           m->set_content("hi");
         }
       },
       "roles alternate"},
  };
  auto stub = server_->generation();
  const v1::StatsResponse before = Stats();
  for (const Case& c : cases) {
    v1::GenerateRequest r = base();
    c.mutate(r);
    Completion out = Generate(*stub, r);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_NE(out.status.error_message().find(c.message), std::string::npos)
        << c.name << ": " << out.status.error_message();
    EXPECT_EQ(out.messages, 0) << c.name;
  }
  EXPECT_EQ(Stats().requests_accepted(), before.requests_accepted()) << "none was queued";
}

TEST_F(ServeTest, CancelledRequestReturnsItsKvBlocks) {
  const v1::StatsResponse baseline = Stats();
  ASSERT_EQ(baseline.running_requests(), 0u);
  auto stub = server_->generation();
  grpc::ClientContext context;
  v1::GenerateRequest r = Greedy({1, 20, 30, 40}, 3000);
  auto reader = stub->Generate(&context, r);
  v1::GenerateResponse response;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(reader->Read(&response));
  EXPECT_GT(Stats().kv_blocks_used(), baseline.kv_blocks_used());
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  const v1::StatsResponse after = WaitForBlocks(baseline.kv_blocks_used());
  EXPECT_EQ(after.kv_blocks_used(), baseline.kv_blocks_used());
  EXPECT_EQ(after.running_requests(), 0u);
  EXPECT_EQ(after.requests_cancelled(), baseline.requests_cancelled() + 1);
}

TEST_F(ServeTest, DeadlineEndsTheRequestAndFreesItsBlocks) {
  const v1::StatsResponse baseline = Stats();
  auto stub = server_->generation();
  Completion c = Generate(*stub, Greedy({1, 5, 6}, 4000), /*timeout_s=*/0.3);
  EXPECT_EQ(c.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  const v1::StatsResponse after = WaitForBlocks(baseline.kv_blocks_used());
  EXPECT_EQ(after.kv_blocks_used(), baseline.kv_blocks_used());
}

TEST_F(ServeTest, StopStringsAndStopTokens) {
  auto stub = server_->generation();
  v1::GenerateRequest r;
  r.set_text("Once upon a time");
  r.set_max_tokens(40);
  r.set_temperature(0);
  r.set_ignore_eos(true);
  Completion full = Generate(*stub, r);
  ASSERT_TRUE(full.status.ok());
  ASSERT_GE(full.text.size(), 12u) << full.text;
  // A stop string from the middle of the output: the text ends right before its first match.
  const std::string stop = full.text.substr(full.text.size() / 2, 3);
  r.add_stop(stop);
  Completion cut = Generate(*stub, r);
  ASSERT_TRUE(cut.status.ok());
  EXPECT_EQ(cut.text, full.text.substr(0, full.text.find(stop)));
  EXPECT_EQ(cut.last.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(cut.last.matched_stop(), stop);
  // A stop token: the output ends with its first occurrence.
  r.clear_stop();
  const int32_t token = full.tokens[5];
  r.add_stop_token_ids(token);
  Completion by_token = Generate(*stub, r);
  ASSERT_TRUE(by_token.status.ok());
  const size_t first = std::find(full.tokens.begin(), full.tokens.end(), token) - full.tokens.begin();
  EXPECT_EQ(by_token.tokens, std::vector<int32_t>(full.tokens.begin(),
                                                  full.tokens.begin() + first + 1));
  EXPECT_EQ(by_token.last.finish_reason(), v1::FINISH_REASON_STOP);
}

TEST_F(ServeTest, TokenizeChatAndModelInfo) {
  auto stub = server_->generation();
  grpc::ClientContext c1;
  v1::TokenizeRequest t;
  t.set_text("Hello world");
  v1::TokenizeResponse tr;
  ASSERT_TRUE(stub->Tokenize(&c1, t, &tr).ok());
  ASSERT_GE(tr.token_ids_size(), 2);
  EXPECT_EQ(tr.token_ids(0), 1) << "BOS first";
  EXPECT_EQ(tr.pieces_size(), tr.token_ids_size());

  grpc::ClientContext c2;
  v1::TokenizeRequest chat;
  auto* m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("Hello world");
  v1::TokenizeResponse cr;
  ASSERT_TRUE(stub->Tokenize(&c2, chat, &cr).ok());
  EXPECT_EQ(cr.token_ids(0), 1);
  EXPECT_GT(cr.token_ids_size(), tr.token_ids_size()) << "[INST] ... [/INST] around the text";

  v1::GenerateRequest g;
  *g.mutable_chat() = chat.chat();
  g.set_max_tokens(3);
  Completion out = Generate(*stub, g);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.last.usage().prompt_tokens(), static_cast<uint32_t>(cr.token_ids_size()));

  grpc::ClientContext c3;
  v1::ModelInfoResponse info;
  ASSERT_TRUE(stub->ModelInfo(&c3, {}, &info).ok());
  EXPECT_EQ(info.config().vocab_size(), 512u);
  EXPECT_EQ(info.config().num_hidden_layers(), 3u);
  EXPECT_EQ(info.config().num_local_experts(), 8u);
  EXPECT_EQ(info.limits().max_context(), 4096u);
  EXPECT_EQ(info.limits().max_running(), 16u);
  EXPECT_EQ(info.world_size(), 1);
  EXPECT_EQ(info.placement(), "local");
}

TEST_F(ServeTest, StatsCountExpertLoad) {
  auto stub = server_->generation();
  ASSERT_TRUE(Generate(*stub, Greedy({1, 2, 3, 4, 5}, 4)).status.ok());
  const v1::StatsResponse s = Stats();
  ASSERT_EQ(s.layers_size(), 3);
  ASSERT_EQ(s.expert_tokens_size(), 8);
  uint64_t routed = 0;
  for (uint64_t n : s.expert_tokens()) routed += n;
  EXPECT_EQ(routed, s.tokens_computed() * 2 * 3) << "top-2 in each of 3 layers";
  EXPECT_TRUE(s.ready());
  EXPECT_GT(s.layers(0).attention_us(), 0);
}

TEST(ServeOverloadTest, FullQueueIsResourceExhaustedAndNoAcceptedRequestIsLost) {
  ServerProcess server("epx_serve_overload", "",
                       "--model " + testing::TinyModelDir() +
                           " --max-queue 2 --max-running 1 --max-batch-tokens 16");
  ASSERT_TRUE(server.ok()) << server.log();
  auto stub = server.generation();
  constexpr int kRequests = 16, kTokens = 24;
  std::vector<Completion> out(kRequests);
  std::vector<std::thread> threads;
  // All requests leave together: started one by one on a loaded machine, they could arrive
  // spread over the time the first ones take, and then never find the queue full.
  std::latch start(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      v1::GenerateRequest r;
      r.set_request_id("r" + std::to_string(i));
      r.mutable_token_ids()->add_ids(1);
      r.mutable_token_ids()->add_ids(100 + i);
      r.set_max_tokens(kTokens);
      r.set_temperature(0);
      r.set_ignore_eos(true);
      out[i] = Generate(*stub, r);
    });
  }
  for (auto& t : threads) t.join();
  int ok = 0, exhausted = 0;
  for (int i = 0; i < kRequests; ++i) {
    if (out[i].status.ok()) {
      ++ok;
      EXPECT_EQ(out[i].tokens.size(), static_cast<size_t>(kTokens)) << i;
      EXPECT_EQ(out[i].messages, kTokens) << "no message lost or repeated";
      EXPECT_EQ(out[i].last.request_id(), "r" + std::to_string(i));
      EXPECT_EQ(out[i].last.finish_reason(), v1::FINISH_REASON_LENGTH);
    } else {
      EXPECT_EQ(out[i].status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << out[i].status.error_message();
      EXPECT_EQ(out[i].messages, 0);
      ++exhausted;
    }
  }
  EXPECT_GT(exhausted, 0);
  // The queue's two at least. More only if the scheduler took one to running before the burst
  // was over, which the machine's speed decides.
  EXPECT_GE(ok, 2) << "the two the queue holds at least";
  grpc::ClientContext context;
  v1::StatsResponse s;
  ASSERT_TRUE(server.admin()->Stats(&context, {}, &s).ok());
  EXPECT_EQ(s.requests_accepted(), static_cast<uint64_t>(ok));
  EXPECT_EQ(s.requests_finished(), static_cast<uint64_t>(ok));
  EXPECT_EQ(s.requests_rejected(), static_cast<uint64_t>(exhausted));
}

// The server's threads (from /proc), or -1.
int ThreadsOf(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  return -1;
}

// One Generate stream on the client's callback API: counts what it reads; `done` counts down
// when the call ends.
class CountingStream final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  CountingStream(v1::Generation::Stub& stub, const v1::GenerateRequest& request, std::latch& done)
      : done_(done) {
    stub.async()->Generate(&context_, &request, this);
    StartRead(&response_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    tokens_ += response_.token_ids_size();
    if (response_.finish_reason() != v1::FINISH_REASON_UNSPECIFIED)
      finish_ = response_.finish_reason();
    StartRead(&response_);
  }
  void OnDone(const grpc::Status& status) override {
    status_ = status;
    done_.count_down();
  }
  void Cancel() { context_.TryCancel(); }

  int tokens_ = 0;
  v1::FinishReason finish_ = v1::FINISH_REASON_UNSPECIFIED;
  grpc::Status status_;

 private:
  grpc::ClientContext context_;
  v1::GenerateResponse response_;
  std::latch& done_;
};

// Many streams at once over a few connections (each channel its own).
class ManyStreams {
 public:
  ManyStreams(const ServerProcess& server, int channels) {
    for (int c = 0; c < channels; ++c) {
      grpc::ChannelArguments args;
      args.SetInt("epx.test.channel", c);
      stubs_.push_back(v1::Generation::NewStub(
          grpc::CreateCustomChannel(server.address(), grpc::InsecureChannelCredentials(), args)));
    }
  }
  // `count` greedy streams of `max_tokens` each; `done` must count `count`.
  std::vector<std::unique_ptr<CountingStream>> Open(int count, int max_tokens, std::latch& done) {
    std::vector<std::unique_ptr<CountingStream>> streams;
    for (int i = 0; i < count; ++i) {
      v1::GenerateRequest r;
      r.mutable_token_ids()->add_ids(1);
      r.mutable_token_ids()->add_ids(3 + i % 509);  // every id of the tiny vocabulary but 0..2
      r.set_max_tokens(max_tokens);
      r.set_temperature(0);
      r.set_ignore_eos(true);
      streams.push_back(std::make_unique<CountingStream>(*stubs_[i % stubs_.size()], r, done));
    }
    return streams;
  }

 private:
  std::vector<std::unique_ptr<v1::Generation::Stub>> stubs_;
};

// 3,000 streams at once on the callback API: every one completes with its tokens; then 3,000
// long ones held open (64 run, the rest wait) leave the server's thread count bounded where the
// synchronous API held a thread per open stream, and all of them end cleanly when cancelled.
TEST(ServeManyStreamsTest, ThreeThousandStreamsCompleteAndHoldABoundedNumberOfThreads) {
  ServerProcess server("epx_serve_many", "",
                       "--model " + testing::TinyModelDir() + " --max-queue 4000 --max-running 64");
  ASSERT_TRUE(server.ok()) << server.log();
  const int threads_before = ThreadsOf(server.pid());
  ASSERT_GT(threads_before, 0);
  constexpr int kStreams = 3000;
  ManyStreams many(server, 8);
  const auto stats = [&] {
    grpc::ClientContext context;
    v1::StatsResponse s;
    EXPECT_TRUE(server.admin()->Stats(&context, {}, &s).ok());
    return s;
  };

  {
    std::latch done(kStreams);
    auto streams = many.Open(kStreams, 4, done);
    done.wait();
    int ok = 0;
    for (const auto& s : streams) {
      if (!s->status_.ok()) {
        ADD_FAILURE() << s->status_.error_message();
        continue;
      }
      EXPECT_EQ(s->tokens_, 4);
      EXPECT_EQ(s->finish_, v1::FINISH_REASON_LENGTH);
      ++ok;
    }
    EXPECT_EQ(ok, kStreams);
  }

  // Long enough (4,000 tokens) that they are all open while the server is counted.
  std::latch done(kStreams);
  auto streams = many.Open(kStreams, 4000, done);
  v1::StatsResponse s = stats();
  while (s.requests_accepted() < 2 * kStreams) {  // every stream has reached the scheduler
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a poll of the condition
    s = stats();
  }
  const int threads_open = ThreadsOf(server.pid());
  std::cout << "server threads: " << threads_before << " idle, " << threads_open << " with "
            << kStreams << " streams open\n";
  EXPECT_LT(threads_open, threads_before + 64) << "threads before: " << threads_before;
  for (const auto& stream : streams) stream->Cancel();
  done.wait();
  for (const auto& stream : streams) {
    // Cancelled, or (on a very slow machine) finished before the cancel.
    if (stream->status_.ok()) {
      EXPECT_EQ(stream->finish_, v1::FINISH_REASON_LENGTH);
    } else {
      EXPECT_EQ(stream->status_.error_code(), grpc::StatusCode::CANCELLED)
          << stream->status_.error_message();
    }
  }
  // The server lets go of every one: nothing runs or waits.
  s = stats();
  while (s.running_requests() > 0 ||
         s.requests_finished() + s.requests_cancelled() < s.requests_accepted()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    s = stats();
  }
  EXPECT_EQ(s.requests_accepted(), static_cast<uint64_t>(2 * kStreams));
  EXPECT_GE(s.requests_cancelled(), 1u);
}

TEST(ServeDrainTest, DrainFinishesRunningWorkRefusesNewAndShutdownExitsCleanly) {
  ServerProcess server("epx_serve_drain", "", "--model " + testing::TinyModelDir());
  ASSERT_TRUE(server.ok()) << server.log();
  auto stub = server.generation();
  v1::GenerateRequest r;
  r.mutable_token_ids()->add_ids(1);
  r.set_max_tokens(200);
  r.set_temperature(0);
  r.set_ignore_eos(true);
  Completion running;
  std::thread t([&] { running = Generate(*stub, r); });
  // Wait until it runs, then drain.
  for (int i = 0; i < 200; ++i) {
    grpc::ClientContext context;
    v1::StatsResponse s;
    ASSERT_TRUE(server.admin()->Stats(&context, {}, &s).ok());
    if (s.running_requests() == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  {
    grpc::ClientContext context;
    v1::DrainRequest drain;
    v1::DrainResponse reply;
    ASSERT_TRUE(server.admin()->Drain(&context, drain, &reply).ok());
  }
  Completion refused = Generate(*stub, r);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(refused.status.error_message().find("draining"), std::string::npos);
  t.join();
  ASSERT_TRUE(running.status.ok()) << running.status.error_message();
  EXPECT_EQ(running.tokens.size(), 200u);
  {
    grpc::ClientContext context;
    v1::ShutdownResponse reply;
    ASSERT_TRUE(server.admin()->Shutdown(&context, {}, &reply).ok());
  }
  EXPECT_EQ(server.Wait(20), 0) << server.log();
}

}  // namespace
}  // namespace epx
