#include "coordinator/scheduler.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"

namespace epx {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone: return "none";
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kEos: return "eos";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "?";
}

bool RequestStream::Next(GenerationEvent* event, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !events_.empty(); };
  if (!mu_.AwaitWithTimeout(absl::Condition(&ready), timeout)) return false;
  *event = std::move(events_.front());
  events_.pop_front();
  return true;
}

void RequestStream::Push(GenerationEvent event) {
  std::function<void()> listener;
  {
    absl::MutexLock lock(&mu_);
    if (ended_) return;
    ended_ = event.last();
    events_.push_back(std::move(event));
    listener = listener_;
  }
  if (listener) listener();
}

void RequestStream::SetListener(std::function<void()> listener) {
  bool waiting = false;
  {
    absl::MutexLock lock(&mu_);
    listener_ = listener;
    waiting = !events_.empty();
  }
  if (listener && waiting) listener();
}

absl::Status SchedulerOptions::Validate() const {
  if (max_queue < 0 || max_running < 1 || max_batch_tokens < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("scheduler: max_queue must be >= 0 and max_running, max_batch_tokens >= 1 "
                     "(got ", max_queue, ", ", max_running, ", ", max_batch_tokens, ")"));
  if (max_batch_tokens < max_running)
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler: max_batch_tokens (", max_batch_tokens,
        ") must be at least max_running (", max_running, "): every running sequence decodes "
        "one token per step"));
  return absl::OkStatus();
}

// A request from admission to its last event.
struct Scheduler::Active {
  Active(GenerationRequest r, const Tokenizer* tokenizer)
      : req(std::move(r)),
        stream(std::make_shared<RequestStream>()),
        rng(req.seed),
        decoder(tokenizer, req.prompt) {
    if (req.repetition_penalty != 1.f) seen.insert(req.prompt.begin(), req.prompt.end());
  }

  GenerationRequest req;
  std::shared_ptr<RequestStream> stream;
  cpu::SamplingRng rng;
  StreamDecoder decoder;
  absl::flat_hash_set<int32_t> seen;  // prompt and output tokens, when a penalty applies
  int64_t seq_id = -1;
  int64_t blocks = 0;     // reserved for prompt + max_tokens
  int64_t prefilled = 0;  // prompt tokens through the engine
  std::vector<int32_t> output;
  std::string held;  // text not yet streamed: it may be the start of a stop string
  std::optional<GenerationEvent> last;  // set by Advance when the request ends
  absl::Time submitted, last_token;     // the scheduler's clock
};

Scheduler::Scheduler(Engine* engine, const Tokenizer* tokenizer, const SchedulerOptions& options,
                     const ExpertParallelStats* expert_parallel, StepRecovery* recovery)
    : engine_(engine),
      tokenizer_(tokenizer),
      options_(options),
      expert_parallel_(expert_parallel),
      recovery_(recovery) {
  EPX_CHECK(options.Validate().ok());
  stats_.kv_blocks_total = engine->kv_cache().num_blocks();
  stats_.kv_block_size = engine->kv_cache().block_size();
  stats_.engine = engine->stats();
}

Scheduler::~Scheduler() { Stop(); }

int64_t Scheduler::max_context() const { return engine_->config().max_position_embeddings; }

absl::Status Scheduler::Validate(const GenerationRequest& r) const {
  const ModelConfig& c = engine_->config();
  if (r.prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("prompt token id ", r.prompt[i],
                                                     " at index ", i,
                                                     " is outside the vocabulary [0, ",
                                                     c.vocab_size, ")"));
  }
  if (r.max_tokens < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be at least 1 (got ", r.max_tokens, ")"));
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
  if (total > max_context())
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt (", r.prompt.size(), " tokens) + max_tokens (", r.max_tokens, ") = ", total,
        " exceeds the context of ", max_context(), " tokens"));
  const KvCache& kv = engine_->kv_cache();
  if (kv.BlocksFor(total) > kv.num_blocks())
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt + max_tokens = ", total, " tokens need ", kv.BlocksFor(total),
        " KV cache blocks but the server has ", kv.num_blocks(), " in all"));
  if (!std::isfinite(r.sampling.temperature) || r.sampling.temperature < 0.f)
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be >= 0 (got ", r.sampling.temperature, ")"));
  if (r.sampling.top_k < -1)
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be -1, 0 (all tokens) or positive (got ", r.sampling.top_k,
                     ")"));
  if (!(r.sampling.top_p > 0.f && r.sampling.top_p <= 1.f))
    return absl::InvalidArgumentError(
        absl::StrCat("top_p must be in (0, 1] (got ", r.sampling.top_p, ")"));
  if (!(r.repetition_penalty > 0.f) || !std::isfinite(r.repetition_penalty))
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be > 0 (got ", r.repetition_penalty, ")"));
  if (static_cast<int64_t>(r.stop.size()) > options_.max_stop_strings)
    return absl::InvalidArgumentError(absl::StrCat("at most ", options_.max_stop_strings,
                                                   " stop strings (got ", r.stop.size(), ")"));
  for (size_t i = 0; i < r.stop.size(); ++i) {
    if (r.stop[i].empty())
      return absl::InvalidArgumentError(absl::StrCat("stop string ", i, " is empty"));
    if (static_cast<int64_t>(r.stop[i].size()) > options_.max_stop_string_bytes)
      return absl::InvalidArgumentError(
          absl::StrCat("stop string ", i, " is ", r.stop[i].size(), " bytes; at most ",
                       options_.max_stop_string_bytes));
  }
  for (int32_t id : r.stop_token_ids) {
    if (id < 0 || id >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat(
          "stop token id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
  }
  return r.sampling.Validate();
}

absl::StatusOr<std::shared_ptr<RequestStream>> Scheduler::Submit(GenerationRequest request) {
  absl::Status valid = Validate(request);
  absl::MutexLock lock(&mu_);
  if (!valid.ok()) {
    ++stats_.rejected;
    return valid;
  }
  if (!stats_.failure.ok()) {
    ++stats_.rejected;
    return absl::UnavailableError(
        absl::StrCat("the server cannot generate: ", stats_.failure.message()));
  }
  if (draining_ || stopping_) {
    ++stats_.rejected;
    return absl::UnavailableError(stopping_ ? "the server is shutting down"
                                            : "the server is draining; no new requests");
  }
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queue) {
    ++stats_.rejected;
    return absl::ResourceExhaustedError(absl::StrCat(
        "the wait queue is full (", options_.max_queue, " requests); retry later"));
  }
  auto active = std::make_unique<Active>(std::move(request), tokenizer_);
  active->submitted = Now();
  std::shared_ptr<RequestStream> stream = active->stream;
  queue_.push_back(std::move(active));
  ++stats_.accepted;
  stats_.queue_length = static_cast<int64_t>(queue_.size());
  return stream;
}

void Scheduler::Drain() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  stats_.draining = true;
}

bool Scheduler::Idle() const {
  absl::MutexLock lock(&mu_);
  return stats_.queue_length == 0 && stats_.running == 0;
}

void Scheduler::Stop() {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
}

SchedulerStats Scheduler::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

absl::Status Scheduler::failure() const {
  absl::MutexLock lock(&mu_);
  return stats_.failure;
}

bool Scheduler::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

namespace {

absl::Status Dropped(const RequestStream& stream, const GenerationRequest& r, absl::Time now) {
  if (stream.cancelled()) return absl::CancelledError("the client cancelled the request");
  if (now >= r.deadline) return absl::DeadlineExceededError("the request's deadline passed");
  return absl::OkStatus();
}

// Length of the longest suffix of `text` that is a proper prefix of one of `stops`.
size_t HeldBack(const std::string& text, const std::vector<std::string>& stops) {
  size_t held = 0;
  for (const std::string& s : stops) {
    for (size_t n = std::min(text.size(), s.size() - 1); n > held; --n) {
      if (text.compare(text.size() - n, n, s, 0, n) == 0) {
        held = n;
        break;
      }
    }
  }
  return held;
}

}  // namespace

void Scheduler::Admit(int64_t budget) {
  const KvCache& kv = engine_->kv_cache();
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  while (!queue_.empty()) {
    Active& next = *queue_.front();
    if (absl::Status dropped = Dropped(*next.stream, next.req, now); !dropped.ok()) {
      GenerationEvent last;
      last.error = dropped;
      next.stream->Push(std::move(last));
      ++stats_.cancelled;
      queue_.pop_front();
      continue;
    }
    const int64_t blocks =
        kv.BlocksFor(static_cast<int64_t>(next.req.prompt.size()) + next.req.max_tokens);
    if (budget <= 0 || static_cast<int64_t>(running_.size()) >= options_.max_running ||
        reserved_blocks_ + blocks > kv.num_blocks())
      break;  // first come, first served: nothing overtakes the head of the queue
    next.seq_id = next_seq_id_++;
    next.blocks = blocks;
    histograms_.queue_time.Observe(absl::ToDoubleSeconds(Now() - next.submitted));
    EPX_CHECK(engine_->AddSequence(next.seq_id).ok());
    reserved_blocks_ += blocks;
    budget -= std::min<int64_t>(budget, static_cast<int64_t>(next.req.prompt.size()));
    running_.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  stats_.queue_length = static_cast<int64_t>(queue_.size());
  stats_.running = static_cast<int64_t>(running_.size());
}

void Scheduler::Retire(std::list<std::unique_ptr<Active>>::iterator it, GenerationEvent last) {
  Active& a = **it;
  RequestRouting routing;
  if (last.error.ok()) routing.expert_tokens = engine_->SequenceRouting(a.seq_id);
  EPX_CHECK(engine_->RemoveSequence(a.seq_id).ok());
  reserved_blocks_ -= a.blocks;
  last.prompt_tokens = static_cast<int64_t>(a.req.prompt.size());
  last.completion_tokens = static_cast<int64_t>(a.output.size());
  routing.request_id = a.req.request_id;
  routing.prompt_tokens = last.prompt_tokens;
  routing.completion_tokens = last.completion_tokens;
  histograms_.e2e_latency.Observe(absl::ToDoubleSeconds(Now() - a.submitted));
  {
    absl::MutexLock lock(&mu_);
    ++stats_.finished_by_reason[last.error.ok() ? static_cast<size_t>(last.finish) : 0];
    if (last.error.ok()) stats_.last_request = std::move(routing);
    if (!last.error.ok()) {
      ++(absl::IsCancelled(last.error) || absl::IsDeadlineExceeded(last.error) ? stats_.cancelled
                                                                                : stats_.failed);
    } else {
      ++(last.finish == FinishReason::kCancelled ? stats_.cancelled : stats_.finished);
    }
    stats_.running = static_cast<int64_t>(running_.size()) - 1;
    stats_.kv_blocks_used = engine_->kv_cache().used_blocks();
  }
  a.stream->Push(std::move(last));
  running_.erase(it);
}

void Scheduler::Advance(Active& a, absl::Span<const float> logits) {
  std::vector<float> penalised;
  if (a.req.repetition_penalty != 1.f) {
    penalised.assign(logits.begin(), logits.end());
    const float p = a.req.repetition_penalty;
    for (int32_t id : a.seen) penalised[id] = penalised[id] > 0 ? penalised[id] / p : penalised[id] * p;
    logits = penalised;
  }
  GenerationEvent event;
  absl::StatusOr<int32_t> token = cpu::Sample(logits, a.req.sampling, a.rng);
  absl::StatusOr<std::string> text =
      token.ok() ? a.decoder.Push(*token) : absl::StatusOr<std::string>(token.status());
  if (!text.ok()) {
    event.error = absl::InternalError(absl::StrCat("sampling failed: ", text.status().message()));
    a.last = std::move(event);
    return;
  }
  a.output.push_back(*token);
  if (a.req.repetition_penalty != 1.f) a.seen.insert(*token);
  event.token_ids.push_back(*token);
  a.held += *text;

  const std::vector<std::string>& stops = a.req.stop;
  // The earliest stop string in the text: generation ends before it.
  size_t cut = std::string::npos;
  for (const std::string& s : stops) {
    const size_t at = a.held.find(s);
    if (at != std::string::npos && (cut == std::string::npos || at < cut)) {
      cut = at;
      event.matched_stop = s;
    }
  }
  if (cut != std::string::npos) {
    event.finish = FinishReason::kStop;
    event.text = a.held.substr(0, cut);
  } else {
    const bool eos = !a.req.ignore_eos && *token == tokenizer_->eos_id();
    const bool stop_token = std::find(a.req.stop_token_ids.begin(), a.req.stop_token_ids.end(),
                                      *token) != a.req.stop_token_ids.end();
    if (eos) {
      event.finish = FinishReason::kEos;
    } else if (stop_token) {
      event.finish = FinishReason::kStop;
      absl::StatusOr<std::string> piece = tokenizer_->Decode({*token});
      event.matched_stop = piece.ok() ? *piece : absl::StrCat(*token);
    } else if (static_cast<int64_t>(a.output.size()) >= a.req.max_tokens) {
      event.finish = FinishReason::kLength;
    }
    if (event.finish != FinishReason::kNone) {
      absl::StatusOr<std::string> rest = a.decoder.Flush();
      if (rest.ok()) a.held += *rest;
      event.text = std::move(a.held);
    } else {
      const size_t keep = HeldBack(a.held, stops);
      event.text = a.held.substr(0, a.held.size() - keep);
      a.held.erase(0, a.held.size() - keep);
    }
  }
  const absl::Time now = Now();
  if (a.output.size() == 1) {
    histograms_.time_to_first_token.Observe(absl::ToDoubleSeconds(now - a.submitted));
  } else {
    histograms_.inter_token_latency.Observe(absl::ToDoubleSeconds(now - a.last_token));
  }
  a.last_token = now;
  {
    absl::MutexLock lock(&mu_);
    ++stats_.generated_tokens;
  }
  if (event.finish == FinishReason::kNone) {
    a.stream->Push(std::move(event));
  } else {
    a.last = std::move(event);
  }
}

void Scheduler::FailAll(const absl::Status& status) {
  const absl::Status error =
      absl::UnavailableError(absl::StrCat("generation failed: ", status.message()));
  while (!running_.empty()) {
    GenerationEvent last;
    last.error = error;
    Retire(running_.begin(), std::move(last));
  }
  absl::MutexLock lock(&mu_);
  for (auto& q : queue_) {
    GenerationEvent last;
    last.error = error;
    q->stream->Push(std::move(last));
    ++stats_.failed;
  }
  queue_.clear();
  stats_.queue_length = 0;
}

absl::Status Scheduler::Run() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (running_.empty()) {
        auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stopping_ || !queue_.empty();
        };
        mu_.AwaitWithTimeout(absl::Condition(&wake), absl::Milliseconds(100));
      }
      if (stopping_) break;
    }

    // The cluster changes between two steps; while it cannot serve, what waits fails.
    if (recovery_ != nullptr) {
      absl::Status serving = recovery_->BeforeStep();
      {
        absl::MutexLock lock(&mu_);
        stats_.not_serving = serving;
      }
      if (!serving.ok()) {
        FailAll(serving);
        continue;
      }
    }

    // Cancelled and expired requests leave before the step, freeing their blocks now.
    const absl::Time now = absl::Now();
    for (auto it = running_.begin(); it != running_.end();) {
      auto next = std::next(it);
      if (absl::Status dropped = Dropped(*(*it)->stream, (*it)->req, now); !dropped.ok()) {
        GenerationEvent last;
        last.error = dropped;
        Retire(it, std::move(last));
      }
      it = next;
    }

    // One input per request: decode tokens first (one per running request past its prompt),
    // then prompt chunks in admission order, newly admitted requests last. `samples[i]`: the
    // input's last token yields the next token (a decode token, or the chunk that completes the
    // prompt).
    std::vector<SequenceInput> batch;
    std::vector<Active*> owner;
    std::vector<bool> samples;
    for (const auto& a : running_) {
      if (a->prefilled < static_cast<int64_t>(a->req.prompt.size())) continue;
      batch.push_back({a->seq_id, absl::MakeConstSpan(&a->output.back(), 1), false});
      owner.push_back(a.get());
      samples.push_back(true);
    }
    int64_t budget = options_.max_batch_tokens - static_cast<int64_t>(batch.size());
    Admit(budget);
    if (running_.empty()) continue;
    std::vector<int64_t> chunk(batch.size(), 0);
    for (const auto& a : running_) {
      const int64_t prompt = static_cast<int64_t>(a->req.prompt.size());
      if (a->prefilled >= prompt || budget <= 0) continue;
      const int64_t n = std::min(budget, prompt - a->prefilled);
      batch.push_back({a->seq_id, absl::MakeConstSpan(a->req.prompt).subspan(a->prefilled, n),
                       false});
      owner.push_back(a.get());
      samples.push_back(a->prefilled + n == prompt);
      chunk.push_back(n);
      budget -= n;
    }
    absl::StatusOr<Tensor> logits = engine_->Step(batch);
    const absl::StatusCode code = logits.status().code();
    if (!logits.ok() && recovery_ != nullptr &&
        (code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kDeadlineExceeded)) {
      // The engine committed nothing: once the expert tier re-formed, the same requests run the
      // same step again (a request's output never depends on the batch or the placement).
      EPX_LOG(Warning) << "engine step failed: " << logits.status();
      absl::Status recovered = recovery_->Recover(logits.status());
      {
        absl::MutexLock lock(&mu_);
        stats_.not_serving = recovered;
        if (recovered.ok()) ++stats_.recoveries;
      }
      if (recovered.ok()) continue;
      EPX_LOG(Error) << "not serving: " << recovered;
      FailAll(recovered);
      continue;
    }
    if (!logits.ok()) {
      EPX_LOG(Error) << "engine step failed: " << logits.status();
      FailAll(logits.status());
      absl::MutexLock lock(&mu_);
      stats_.failure = logits.status();
      stats_.engine = engine_->stats();
      return logits.status();
    }
    // One logits row per input, in batch order.
    const int64_t vocab = engine_->config().vocab_size;
    int64_t prompt_tokens = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      owner[i]->prefilled += chunk[i];
      prompt_tokens += chunk[i];
      if (samples[i])
        Advance(*owner[i], absl::MakeConstSpan(logits->data<const float>() + i * vocab, vocab));
    }
    for (auto it = running_.begin(); it != running_.end();) {
      auto next = std::next(it);
      if ((*it)->last.has_value()) {
        GenerationEvent last = std::move(*(*it)->last);
        Retire(it, std::move(last));
      }
      it = next;
    }
    absl::MutexLock lock(&mu_);
    stats_.prompt_tokens += prompt_tokens;
    stats_.engine = engine_->stats();
    if (expert_parallel_ != nullptr) stats_.expert_parallel = *expert_parallel_;
    stats_.kv_blocks_used = engine_->kv_cache().used_blocks();
  }

  // Stopped: whatever is left ends now.
  while (!running_.empty()) {
    GenerationEvent last;
    last.finish = FinishReason::kCancelled;
    Retire(running_.begin(), std::move(last));
  }
  absl::MutexLock lock(&mu_);
  for (auto& q : queue_) {
    GenerationEvent last;
    last.error = absl::UnavailableError("the server shut down before the request started");
    q->stream->Push(std::move(last));
  }
  queue_.clear();
  stats_.queue_length = 0;
  stats_.kv_blocks_used = engine_->kv_cache().used_blocks();
  return absl::OkStatus();
}

}  // namespace epx
