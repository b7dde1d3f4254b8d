// Continuous batching over the engine: requests wait in a bounded FIFO queue, are admitted when
// the KV cache has blocks for their whole prompt + max_tokens (so a running request never runs
// out of cache and is never preempted), and every step mixes the decode tokens of all running
// requests with chunks of prompts under a per-step token budget (chunked prefill). Tokens are
// sampled per request with the request's own seeded generator and penalties, so a request's
// output depends only on the request, never on what else is in the batch.
//
// Each request streams GenerationEvents (token ids, text increments with stop strings held
// back, then a finish reason and usage) through its RequestStream.
//
// Thread-safety: Submit, Drain, Stop, stats and the RequestStream methods may be called from
// any thread; Run is called from one thread (the step thread), which alone drives the engine.
#ifndef EPX_COORDINATOR_SCHEDULER_H_
#define EPX_COORDINATOR_SCHEDULER_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/tokenizer.h"
#include "coordinator/distributed_expert_executor.h"
#include "coordinator/engine.h"
#include "kernels/cpu/ops.h"

namespace epx {

enum class FinishReason { kNone, kLength, kStop, kEos, kCancelled };
const char* FinishReasonName(FinishReason reason);

// The defaults of a parameter a client leaves unset (those of the OpenAI completions API);
// BuildRequest (coordinator/generation_params.h) applies them.
inline constexpr int64_t kDefaultMaxTokens = 16;
inline constexpr float kDefaultTemperature = 1.f;
inline constexpr float kDefaultTopP = 1.f;
inline constexpr int32_t kDefaultTopK = 0;  // all tokens
inline constexpr float kDefaultRepetitionPenalty = 1.f;

// One request as the scheduler takes it: every field set (BuildRequest).
struct GenerationRequest {
  std::string request_id;
  std::vector<int32_t> prompt;  // token ids
  int64_t max_tokens = kDefaultMaxTokens;
  cpu::SamplingParams sampling;
  float repetition_penalty = 1.f;  // > 0; 1: none
  uint64_t seed = 0;
  std::vector<std::string> stop;         // stop strings (not part of the output text)
  std::vector<int32_t> stop_token_ids;   // stop tokens (part of the output)
  bool ignore_eos = false;
  absl::Time deadline = absl::InfiniteFuture();
};

// One update of a request. The last event of a request has `finish` set, or a non-OK `error`.
struct GenerationEvent {
  std::vector<int32_t> token_ids;
  std::string text;
  FinishReason finish = FinishReason::kNone;
  std::string matched_stop;  // the stop string or token (as text) that ended it
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  absl::Status error;

  bool last() const { return finish != FinishReason::kNone || !error.ok(); }
};

// The consumer's end of one request. Thread-safe.
class RequestStream {
 public:
  // Waits up to `timeout` for the next event. Returns false on timeout (or after the last event
  // was taken).
  bool Next(GenerationEvent* event, absl::Duration timeout);
  // Calls `listener` after every Push from now on (on the producer's thread, with no lock of the
  // stream held), and once at once when events are already waiting. It should only wake the
  // consumer (an asynchronous writer takes the events with Next(..., ZeroDuration())). It may run
  // once more, concurrently, after it was replaced: keep what it refers to alive through it
  // (e.g. a weak_ptr). Null: none.
  void SetListener(std::function<void()> listener);
  // Asks the scheduler to drop the request; its KV blocks are freed at the start of the next
  // step. The stream then ends with a Cancelled error event.
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

  // Producer side (the scheduler).
  void Push(GenerationEvent event);

 private:
  absl::Mutex mu_;
  std::deque<GenerationEvent> events_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void()> listener_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> cancelled_{false};
};

// A cluster that can re-form its expert tier between steps (runtime/runtime.h). The scheduler
// asks it before every step (and every 100 ms while idle) and after a step that failed.
// Called from the step thread only.
class StepRecovery {
 public:
  virtual ~StepRecovery() = default;
  // Applies what changed since the last step (a worker waiting to join). OK: steps may run;
  // else why not: the running and queued requests fail with it (UNAVAILABLE).
  virtual absl::Status BeforeStep() = 0;
  // After a step failed with `failure` (UNAVAILABLE or DEADLINE_EXCEEDED): OK once the expert
  // tier re-formed and the same step may run again (it gives the same bits); else the error
  // the running requests fail with. The scheduler keeps running either way.
  virtual absl::Status Recover(const absl::Status& failure) = 0;
};

struct SchedulerOptions {
  int64_t max_queue = 256;        // waiting requests; beyond: ResourceExhausted
  int64_t max_running = 64;       // sequences in one step
  int64_t max_batch_tokens = 512; // tokens in one step (decode tokens + prefill chunks)
  int64_t max_stop_strings = 16;
  int64_t max_stop_string_bytes = 256;
  // The clock of the latency histograms (null: absl::Now); tests inject one.
  std::function<absl::Time()> clock;

  absl::Status Validate() const;
};

// Latencies per request, in seconds, from Submit: waiting in the queue until admission, to the
// first token, between tokens, to the last event.
struct ServingHistograms {
  Histogram queue_time{LatencyBuckets()};
  Histogram time_to_first_token{LatencyBuckets()};
  Histogram inter_token_latency{LatencyBuckets()};
  Histogram e2e_latency{LatencyBuckets()};
};

// Where the tokens of one finished request went: [layer][expert] rows routed, over its prompt
// and every generated token fed back (the last one never is).
struct RequestRouting {
  std::string request_id;
  int64_t prompt_tokens = 0, completion_tokens = 0;
  std::vector<std::vector<int64_t>> expert_tokens;
};

struct SchedulerStats {
  int64_t queue_length = 0;
  int64_t running = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_block_size = 0;
  int64_t accepted = 0, finished = 0, failed = 0, rejected = 0, cancelled = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  // Requests that ended with each finish reason (FinishReason as index; kNone: failed).
  std::array<int64_t, 5> finished_by_reason{};
  bool draining = false;
  absl::Status failure;  // set once the engine failed; the scheduler then refuses everything
  int64_t recoveries = 0;    // steps run again after the expert tier re-formed
  absl::Status not_serving;  // the StepRecovery's last answer (OK: serving)
  EngineStats engine;    // as of the last step
  RequestRouting last_request;  // the request that finished last (without an error)
  std::optional<ExpertParallelStats> expert_parallel;  // multi-rank jobs, as of the last step
};

class Scheduler {
 public:
  // REQUIRES: options.Validate() is OK. `engine`, `tokenizer`, `expert_parallel` (the remote
  // executor's counters, or null) and `recovery` (null: a failed step ends Run) must outlive
  // the scheduler; only Run() touches the engine once the scheduler exists.
  Scheduler(Engine* engine, const Tokenizer* tokenizer, const SchedulerOptions& options,
            const ExpertParallelStats* expert_parallel = nullptr, StepRecovery* recovery = nullptr);
  ~Scheduler();

  // Queues a request. InvalidArgument with a precise message for a bad parameter (empty prompt,
  // an id outside the vocabulary, max_tokens < 1, prompt + max_tokens beyond the context or the
  // whole KV cache, sampling ranges, stop strings); ResourceExhausted when the queue is full;
  // Unavailable when draining, stopped or after an engine failure.
  absl::StatusOr<std::shared_ptr<RequestStream>> Submit(GenerationRequest request);

  // Refuses new requests from now on; queued and running ones complete.
  void Drain();
  // Nothing queued or running.
  bool Idle() const;
  // Ends Run(): running requests finish with kCancelled, queued ones get Unavailable.
  void Stop();

  // The step loop; returns after Stop() (OK) or an engine failure it cannot recover from (that
  // error, after failing every request with Unavailable). Call once, from one thread.
  absl::Status Run();

  SchedulerStats stats() const;
  // Cheap parts of stats(), for frequent polls (readiness).
  absl::Status failure() const;
  bool draining() const;
  const ServingHistograms& histograms() const { return histograms_; }
  const SchedulerOptions& options() const { return options_; }
  const Engine& engine() const { return *engine_; }
  // Tokens one request may span, prompt + max_tokens.
  int64_t max_context() const;

 private:
  struct Active;
  absl::Status Validate(const GenerationRequest& request) const;
  // Takes queued requests while blocks, sequence slots and the step budget allow.
  void Admit(int64_t budget);
  // Sampling, stop conditions and text for a request whose next token's logits are `logits`.
  void Advance(Active& a, absl::Span<const float> logits);
  // Removes a request from the engine and the running set, pushing its last event.
  void Retire(std::list<std::unique_ptr<Active>>::iterator it, GenerationEvent last);
  void FailAll(const absl::Status& status);

  Engine* const engine_;
  const Tokenizer* const tokenizer_;
  const SchedulerOptions options_;
  const ExpertParallelStats* const expert_parallel_;
  StepRecovery* const recovery_;
  ServingHistograms histograms_;
  absl::Time Now() const { return options_.clock ? options_.clock() : absl::Now(); }
  int64_t next_seq_id_ = 0;           // step thread
  int64_t reserved_blocks_ = 0;       // step thread: blocks promised to running requests
  std::list<std::unique_ptr<Active>> running_;  // step thread, in admission order

  mutable absl::Mutex mu_;
  std::deque<std::unique_ptr<Active>> queue_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  SchedulerStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace epx

#endif  // EPX_COORDINATOR_SCHEDULER_H_
