#include "coordinator/services.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/logging.h"
#include "common/status.h"
#include "coordinator/chat_template.h"
#include "coordinator/generation_params.h"
#include "coordinator/http_server.h"
#include "coordinator/serving_metrics.h"
#include "epx/v1/admin.grpc.pb.h"
#include "epx/v1/cluster.grpc.pb.h"
#include "epx/v1/generation.grpc.pb.h"
#include "security/grpc_credentials.h"

namespace epx {
namespace {

constexpr char kGenerationService[] = "epx.v1.Generation";
// The longest one StoreGet waits (a rendezvous is bounded by --comm-timeout anyway).
constexpr absl::Duration kStoreGetLimit = absl::Minutes(10);

// absl and gRPC share the canonical status codes.
grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::Time FromGrpcDeadline(const grpc::ServerContextBase& context) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

// OK when the call's "authorization" metadata grants `access`; UNAUTHENTICATED otherwise,
// logged with the method and the peer (never the key).
grpc::Status Authorize(const ApiKeys& keys, const grpc::ServerContextBase& context, Access access,
                       absl::string_view method) {
  if (!keys.any()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  const absl::string_view value = it == metadata.end()
                                      ? absl::string_view()
                                      : absl::string_view(it->second.data(), it->second.size());
  absl::Status s = CheckBearer(keys, value, access);
  if (s.ok()) return grpc::Status::OK;
  EPX_LOG(Warning) << "refused " << method << " from " << context.peer() << ": " << s.message();
  return ToGrpc(s);
}

v1::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case FinishReason::kEos: return v1::FINISH_REASON_EOS;
    case FinishReason::kCancelled: return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kNone: break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

absl::StatusOr<std::vector<int32_t>> ChatIds(const Tokenizer& tokenizer, const v1::Chat& chat) {
  std::vector<ChatMessage> messages;
  for (const v1::ChatMessage& m : chat.messages()) messages.push_back({m.role(), m.content()});
  return ApplyChatTemplate(tokenizer, messages);
}

absl::Status CheckSize(const google::protobuf::Message& request, int64_t limit) {
  const int64_t size = static_cast<int64_t>(request.ByteSizeLong());
  if (size > limit)
    return absl::InvalidArgumentError(absl::StrCat("the request is ", size,
                                                   " bytes; the server accepts at most ", limit,
                                                   " (--max-request-bytes)"));
  return absl::OkStatus();
}

// What a Generate call asks for; BuildRequest applies the defaults of what it leaves unset.
GenerationParams ToParams(const v1::GenerateRequest& in) {
  GenerationParams p;
  switch (in.prompt_case()) {
    case v1::GenerateRequest::kText:
      p.text = in.text();
      p.add_bos = in.add_bos() || !in.has_add_bos();
      break;
    case v1::GenerateRequest::kTokenIds:
      p.token_ids.emplace(in.token_ids().ids().begin(), in.token_ids().ids().end());
      break;
    case v1::GenerateRequest::kChat:
      p.chat.emplace();
      for (const v1::ChatMessage& m : in.chat().messages())
        p.chat->push_back({m.role(), m.content()});
      break;
    case v1::GenerateRequest::PROMPT_NOT_SET:
      break;
  }
  if (in.has_max_tokens()) p.max_tokens = in.max_tokens();
  if (in.has_temperature()) p.temperature = in.temperature();
  if (in.has_top_k()) p.top_k = in.top_k();
  if (in.has_top_p()) p.top_p = in.top_p();
  if (in.has_repetition_penalty()) p.repetition_penalty = in.repetition_penalty();
  if (in.has_seed()) p.seed = in.seed();
  p.stop.assign(in.stop().begin(), in.stop().end());
  p.stop_token_ids.assign(in.stop_token_ids().begin(), in.stop_token_ids().end());
  p.ignore_eos = in.ignore_eos();
  return p;
}

// The scheduler once the cluster has formed (null before, and in a batch job's control plane),
// and why generation is not available yet.
struct LateScheduler {
  std::atomic<Scheduler*> scheduler{nullptr};
  std::function<std::string()> not_ready_reason;

  // The scheduler, or the UNAVAILABLE status a caller gets without one.
  Scheduler* Get(grpc::Status* unavailable) const {
    Scheduler* s = scheduler.load();
    if (s == nullptr) {
      std::string reason = not_ready_reason();
      if (reason.empty()) reason = "the model is loading";
      *unavailable = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                  absl::StrCat("not serving yet: ", reason));
    }
    return s;
  }
};

v1::GenerateResponse ToResponse(const std::string& id, GenerationEvent event) {
  v1::GenerateResponse out;
  out.set_request_id(id);
  out.mutable_token_ids()->Add(event.token_ids.begin(), event.token_ids.end());
  out.set_text(std::move(event.text));
  if (event.last()) {
    out.set_finish_reason(ToProto(event.finish));
    out.set_matched_stop(event.matched_stop);
    out.mutable_usage()->set_prompt_tokens(event.prompt_tokens);
    out.mutable_usage()->set_completion_tokens(event.completion_tokens);
  }
  return out;
}

// One Generate call on gRPC's callback API: no thread waits for a stream. The scheduler's Push
// wakes the reactor (RequestStream listener), which writes one event at a time; OnWriteDone takes
// the next. A client that goes away (cancel, deadline, broken stream) cancels the request, and
// the scheduler frees its blocks at its next step.
//
// Lifetime: the reactor owns itself (self_) until gRPC's OnDone; the stream's listener holds only
// a weak_ptr, so a Push racing with OnDone finds nothing to wake.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  // Starts the call: a refusal is finished at once, else the reactor follows `stream`.
  static GenerateReactor* Start(absl::StatusOr<std::shared_ptr<RequestStream>> stream,
                                std::string id) {
    auto reactor = std::shared_ptr<GenerateReactor>(new GenerateReactor());
    reactor->self_ = reactor;
    if (!stream.ok()) {
      reactor->Finish(ToGrpc(stream.status()));
      return reactor.get();
    }
    reactor->id_ = std::move(id);
    reactor->stream_ = *std::move(stream);
    std::weak_ptr<GenerateReactor> weak = reactor;
    reactor->stream_->SetListener([weak] {
      if (std::shared_ptr<GenerateReactor> r = weak.lock()) r->Pump();
    });
    return reactor.get();
  }

  void OnWriteDone(bool ok) override {
    bool finish = false;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      busy_ = false;
      if (!ok || wrote_last_) {
        finished_ = true;
        finish = true;
        status =
            ok ? grpc::Status::OK : grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke");
      }
    }
    if (!ok) stream_->Cancel();
    if (finish) {
      Finish(status);
    } else {
      Pump();
    }
  }

  void OnCancel() override {
    if (stream_ != nullptr) stream_->Cancel();
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
    }
    Pump();
  }

  void OnDone() override {
    if (stream_ != nullptr) stream_->SetListener(nullptr);
    self_.reset();  // the last owner may be a listener call still running
  }

 private:
  GenerateReactor() = default;

  // Starts the next write (or the finish) unless one is under way. gRPC is called with no lock
  // held: its callbacks may run on this thread before StartWrite returns.
  void Pump() {
    GenerationEvent event;
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      if (busy_ || finished_ || stream_ == nullptr) return;
      if (cancelled_) {
        finished_ = true;
        finish = grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled");
      } else {
        if (!stream_->Next(&event, absl::ZeroDuration())) return;
        if (!event.error.ok()) {
          finished_ = true;
          finish = ToGrpc(event.error);
        } else {
          busy_ = true;
          wrote_last_ = event.last();
          response_ = ToResponse(id_, std::move(event));
        }
      }
    }
    if (finish.has_value()) {
      Finish(*finish);
    } else {
      StartWrite(&response_);
    }
  }

  std::shared_ptr<GenerateReactor> self_;
  std::string id_;
  std::shared_ptr<RequestStream> stream_;
  absl::Mutex mu_;
  bool busy_ ABSL_GUARDED_BY(mu_) = false;        // a write is under way
  bool wrote_last_ ABSL_GUARDED_BY(mu_) = false;  // ... and it carries the last event
  bool finished_ ABSL_GUARDED_BY(mu_) = false;    // Finish was called
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  v1::GenerateResponse response_;  // the write under way
};

// Generate on the callback API (one reactor per stream, no thread per stream); the unary calls
// stay on the synchronous API.
class GenerationService final
    : public v1::Generation::WithCallbackMethod_Generate<v1::Generation::Service> {
 public:
  GenerationService(const ApiServerOptions& options, const ApiServerBackends& backends,
                    const LateScheduler* late)
      : options_(options), backends_(backends), late_(late) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* context,
                                                           const v1::GenerateRequest* in) override {
    if (grpc::Status auth = Authorize(options_.keys, *context, Access::kClient, "Generate");
        !auth.ok())
      return GenerateReactor::Start(FromGrpc(auth), "");
    grpc::Status unavailable;
    Scheduler* scheduler = late_->Get(&unavailable);
    if (scheduler == nullptr) return GenerateReactor::Start(FromGrpc(unavailable), "");
    if (absl::Status s = CheckSize(*in, options_.max_request_bytes); !s.ok())
      return GenerateReactor::Start(s, "");
    absl::StatusOr<GenerationRequest> request =
        BuildRequest(ToParams(*in), *backends_.tokenizer, scheduler->max_context());
    if (!request.ok()) return GenerateReactor::Start(request.status(), "");
    request->request_id =
        in->request_id().empty() ? absl::StrCat("req-", next_id_.fetch_add(1)) : in->request_id();
    request->deadline = FromGrpcDeadline(*context);
    std::string id = request->request_id;
    return GenerateReactor::Start(scheduler->Submit(std::move(*request)), std::move(id));
  }

  grpc::Status Tokenize(grpc::ServerContext* context, const v1::TokenizeRequest* in,
                        v1::TokenizeResponse* out) override {
    if (grpc::Status auth = Authorize(options_.keys, *context, Access::kClient, "Tokenize");
        !auth.ok())
      return auth;
    if (backends_.tokenizer == nullptr)
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "this coordinator runs a batch job and serves no generation API");
    if (absl::Status s = CheckSize(*in, options_.max_request_bytes); !s.ok()) return ToGrpc(s);
    const Tokenizer& tokenizer = *backends_.tokenizer;
    absl::StatusOr<std::vector<int32_t>> ids;
    switch (in->input_case()) {
      case v1::TokenizeRequest::kText: {
        const bool bos = in->add_bos() || !in->has_add_bos();
        ids = tokenizer.Encode(in->text(), bos);
        absl::StatusOr<std::vector<std::string>> pieces = tokenizer.EncodeAsPieces(in->text());
        if (!pieces.ok()) return ToGrpc(pieces.status());
        if (bos) out->add_pieces("<s>");
        for (std::string& p : *pieces) out->add_pieces(std::move(p));
        break;
      }
      case v1::TokenizeRequest::kChat:
        ids = ChatIds(tokenizer, in->chat());
        break;
      case v1::TokenizeRequest::INPUT_NOT_SET:
        return ToGrpc(absl::InvalidArgumentError("no input: set text or chat"));
    }
    if (!ids.ok()) return ToGrpc(ids.status());
    out->mutable_token_ids()->Add(ids->begin(), ids->end());
    return grpc::Status::OK;
  }

  grpc::Status ModelInfo(grpc::ServerContext* context, const v1::ModelInfoRequest* in,
                         v1::ModelInfoResponse* out) override {
    if (grpc::Status auth = Authorize(options_.keys, *context, Access::kClient, "ModelInfo");
        !auth.ok())
      return auth;
    grpc::Status unavailable;
    const Scheduler* ready = late_->Get(&unavailable);
    if (ready == nullptr) return unavailable;
    const Scheduler& scheduler = *ready;
    const ModelConfig& c = scheduler.engine().config();
    out->set_model(options_.model_name);
    out->set_build_id(options_.build_id);
    v1::ModelConfig* mc = out->mutable_config();
    mc->set_vocab_size(c.vocab_size);
    mc->set_hidden_size(c.hidden_size);
    mc->set_intermediate_size(c.intermediate_size);
    mc->set_num_hidden_layers(c.num_hidden_layers);
    mc->set_num_attention_heads(c.num_attention_heads);
    mc->set_num_key_value_heads(c.num_key_value_heads);
    mc->set_head_dim(c.head_dim);
    mc->set_num_local_experts(c.num_local_experts);
    mc->set_num_experts_per_tok(c.num_experts_per_tok);
    mc->set_max_position_embeddings(c.max_position_embeddings);
    mc->set_sliding_window(c.sliding_window.value_or(0));
    mc->set_rope_theta(c.rope_theta);
    mc->set_rms_norm_eps(c.rms_norm_eps);
    mc->set_bos_token_id(backends_.tokenizer->bos_id());
    mc->set_eos_token_id(backends_.tokenizer->eos_id());
    mc->set_torch_dtype(std::string(DTypeName(c.torch_dtype)));
    mc->set_config_hash(c.Hash());
    out->set_world_size(options_.world_size);
    out->set_placement(options_.placement_name);
    if (backends_.membership->epoch().number > 0) {
      // A launcher-free cluster: the placement in use, which may change while serving.
      for (const WorkerState& ws : backends_.membership->Workers(absl::Now())) {
        if (!ws.member) continue;
        v1::WorkerExperts* w = out->add_workers();
        w->set_rank(ws.info.rank);
        w->mutable_experts()->Add(ws.info.experts.begin(), ws.info.experts.end());
      }
    } else if (const Placement* p = backends_.placement; p != nullptr) {
      for (int rank = 1; rank <= p->num_workers(); ++rank) {
        v1::WorkerExperts* w = out->add_workers();
        w->set_rank(rank);
        w->mutable_experts()->Add(p->experts_of(rank).begin(), p->experts_of(rank).end());
      }
    }
    const SchedulerOptions& so = scheduler.options();
    const KvCache& kv = scheduler.engine().kv_cache();
    v1::Limits* l = out->mutable_limits();
    l->set_max_context(scheduler.max_context());
    l->set_max_queue(so.max_queue);
    l->set_max_running(so.max_running);
    l->set_max_batch_tokens(so.max_batch_tokens);
    l->set_kv_block_size(kv.block_size());
    l->set_kv_blocks(kv.num_blocks());
    l->set_max_request_bytes(options_.max_request_bytes);
    l->set_max_stop_strings(so.max_stop_strings);
    l->set_max_stop_string_bytes(so.max_stop_string_bytes);
    return grpc::Status::OK;
  }

 private:
  const ApiServerOptions options_;
  const ApiServerBackends backends_;
  const LateScheduler* const late_;
  std::atomic<int64_t> next_id_{0};
};

class AdminService final : public v1::Admin::Service {
 public:
  AdminService(const ApiServerOptions& options, const ApiServerBackends& backends,
               const LateScheduler* late)
      : keys_(options.keys), backends_(backends), late_(late) {}

  grpc::Status Stats(grpc::ServerContext* context, const v1::StatsRequest* in,
                     v1::StatsResponse* out) override {
    if (grpc::Status auth = Authorize(keys_, *context, Access::kClient, "Stats"); !auth.ok())
      return auth;
    Fill(out);
    return grpc::Status::OK;
  }

  grpc::Status Drain(grpc::ServerContext* context, const v1::DrainRequest* in,
                     v1::DrainResponse* out) override {
    if (grpc::Status auth = Authorize(keys_, *context, Access::kAdmin, "Drain"); !auth.ok())
      return auth;
    grpc::Status unavailable;
    Scheduler* scheduler = late_->Get(&unavailable);
    if (scheduler == nullptr) return unavailable;
    scheduler->Drain();
    EPX_LOG(Info) << "draining: no new requests";
    if (in->wait()) WaitIdle(*scheduler, *context);
    const SchedulerStats s = scheduler->stats();
    out->set_running_requests(s.running);
    out->set_queue_length(s.queue_length);
    return grpc::Status::OK;
  }

  grpc::Status Shutdown(grpc::ServerContext* context, const v1::ShutdownRequest* in,
                        v1::ShutdownResponse* out) override {
    if (grpc::Status auth = Authorize(keys_, *context, Access::kAdmin, "Shutdown"); !auth.ok())
      return auth;
    if (Scheduler* scheduler = late_->scheduler.load(); in->drain() && scheduler != nullptr) {
      scheduler->Drain();
      WaitIdle(*scheduler, *context);
    }
    EPX_LOG(Info) << "shutdown requested by " << context->peer();
    if (!shutdown_called_.exchange(true) && backends_.on_shutdown) backends_.on_shutdown();
    return grpc::Status::OK;
  }

  grpc::Status GetPlacement(grpc::ServerContext* context, const v1::GetPlacementRequest* in,
                            v1::PlacementResponse* out) override {
    if (grpc::Status auth = Authorize(keys_, *context, Access::kAdmin, "GetPlacement"); !auth.ok())
      return auth;
    FillPlacement(out);
    return grpc::Status::OK;
  }

  grpc::Status SetPlacement(grpc::ServerContext* context, const v1::SetPlacementRequest* in,
                            v1::PlacementResponse* out) override {
    if (grpc::Status auth = Authorize(keys_, *context, Access::kAdmin, "SetPlacement"); !auth.ok())
      return auth;
    if (!backends_.set_placement)
      return ToGrpc(absl::FailedPreconditionError("this server's placement is fixed"));
    if (absl::Status s = backends_.set_placement(in->placement_json()); !s.ok()) return ToGrpc(s);
    EPX_LOG(Info) << "placement requested by " << context->peer();
    if (in->wait()) {
      // Until the coordinator took the request up, then until it moved.
      const int64_t before = backends_.membership->target().first;
      WaitFor(*context, [&] {
        const auto [version, text] = backends_.membership->target();
        return version > before && text == backends_.membership->epoch().placement_text;
      });
    }
    FillPlacement(out);
    return grpc::Status::OK;
  }

  grpc::Status DrainWorker(grpc::ServerContext* context, const v1::DrainWorkerRequest* in,
                           v1::PlacementResponse* out) override {
    if (grpc::Status auth = Authorize(keys_, *context, Access::kAdmin, "DrainWorker"); !auth.ok())
      return auth;
    if (!backends_.drain_worker)
      return ToGrpc(absl::FailedPreconditionError("this server's workers are fixed"));
    if (absl::Status s = backends_.drain_worker(in->rank()); !s.ok()) return ToGrpc(s);
    EPX_LOG(Info) << "drain of worker " << in->rank() << " requested by " << context->peer();
    if (in->wait()) {
      WaitFor(*context, [&] {
        for (const WorkerState& w : backends_.membership->Workers(absl::Now()))
          if (w.info.rank == in->rank()) return !w.registered;
        return true;
      });
    }
    FillPlacement(out);
    return grpc::Status::OK;
  }

  // Admin/Stats' answer, also the HTTP stats endpoint's.
  void Fill(v1::StatsResponse* out) const {
    const std::string reason = late_->not_ready_reason();
    out->set_uptime_s(absl::ToDoubleSeconds(absl::Now() - start_));
    out->set_ready(reason.empty());
    out->set_not_ready_reason(reason);
    const Scheduler* scheduler = late_->scheduler.load();
    // While the cluster forms there are only the workers to report.
    const SchedulerStats s = scheduler != nullptr ? scheduler->stats() : SchedulerStats{};
    out->set_draining(s.draining);
    out->set_queue_length(s.queue_length);
    out->set_running_requests(s.running);
    out->set_kv_blocks_used(s.kv_blocks_used);
    out->set_kv_blocks_free(s.kv_blocks_total - s.kv_blocks_used);
    out->set_kv_blocks_total(s.kv_blocks_total);
    out->set_kv_block_size(s.kv_block_size);
    out->set_steps(s.engine.steps);
    out->set_tokens_computed(s.engine.tokens);
    out->set_requests_accepted(s.accepted);
    out->set_requests_finished(s.finished);
    out->set_requests_failed(s.failed);
    out->set_requests_rejected(s.rejected);
    out->set_requests_cancelled(s.cancelled);
    out->set_prompt_tokens(s.prompt_tokens);
    out->set_generated_tokens(s.generated_tokens);
    const size_t layers = s.engine.attention_us.size();
    std::vector<uint64_t> expert_total;
    for (size_t l = 0; l < layers; ++l) {
      v1::LayerStats* ls = out->add_layers();
      ls->set_layer(l);
      ls->set_attention_us(s.engine.attention_us[l]);
      ls->set_moe_us(s.engine.moe_us[l]);
      if (s.expert_parallel.has_value()) {
        ls->set_dispatch_us(s.expert_parallel->dispatch_us[l]);
        ls->set_expert_us(s.expert_parallel->expert_us[l]);
        ls->set_combine_us(s.expert_parallel->combine_us[l]);
      }
      const std::vector<int64_t>& tokens = s.engine.expert_tokens[l];
      expert_total.resize(tokens.size());
      for (size_t e = 0; e < tokens.size(); ++e) {
        ls->add_expert_tokens(tokens[e]);
        expert_total[e] += tokens[e];
      }
      if (l < s.engine.recent_expert_tokens.size())
        ls->mutable_recent_expert_tokens()->Add(s.engine.recent_expert_tokens[l].begin(),
                                                s.engine.recent_expert_tokens[l].end());
    }
    out->mutable_expert_tokens()->Add(expert_total.begin(), expert_total.end());
    for (const WorkerState& w : backends_.membership->Workers(absl::Now())) {
      v1::WorkerStatus* ws = out->add_workers();
      ws->set_rank(w.info.rank);
      ws->set_host(w.info.host);
      ws->set_device(w.info.device);
      ws->set_registered(w.registered);
      ws->set_alive(w.alive);
      ws->set_last_heartbeat_age_s(w.registered ? absl::ToDoubleSeconds(w.heartbeat_age) : -1);
      ws->mutable_experts()->Add(w.info.experts.begin(), w.info.experts.end());
      ws->set_member(w.member);
      if (s.expert_parallel.has_value() &&
          w.info.rank < static_cast<int>(s.expert_parallel->worker_tokens.size()))
        ws->set_rows_received(s.expert_parallel->worker_tokens[w.info.rank]);
    }
    const ClusterEpoch epoch = backends_.membership->epoch();
    out->set_epoch(epoch.number);
    out->set_placement(epoch.placement_text);
    out->set_window_steps(static_cast<uint32_t>(s.engine.window_steps));
    v1::RequestRouting* last = out->mutable_last_request();
    last->set_request_id(s.last_request.request_id);
    last->set_prompt_tokens(static_cast<uint32_t>(s.last_request.prompt_tokens));
    last->set_completion_tokens(static_cast<uint32_t>(s.last_request.completion_tokens));
    for (const std::vector<int64_t>& layer : s.last_request.expert_tokens)
      last->add_layers()->mutable_expert_tokens()->Add(layer.begin(), layer.end());
    for (const ClusterEvent& e : backends_.membership->events()) {
      v1::ClusterEvent* ce = out->add_events();
      ce->set_time_unix_s(absl::ToUnixMicros(e.time) / 1e6);
      ce->set_kind(e.kind);
      ce->set_rank(e.rank);
      ce->set_message(e.message);
    }
  }

 private:
  void FillPlacement(v1::PlacementResponse* out) const {
    const ClusterEpoch epoch = backends_.membership->epoch();
    const auto [version, text] = backends_.membership->target();
    out->set_epoch(epoch.number);
    out->set_placement(epoch.placement_text);
    out->set_target(text);
    out->set_target_version(version);
    out->mutable_workers()->Add(epoch.members.begin() + std::min<size_t>(1, epoch.members.size()),
                                epoch.members.end());
  }
  template <typename Done>
  static void WaitFor(const grpc::ServerContext& context, Done done) {
    while (!done() && !context.IsCancelled() &&
           std::chrono::system_clock::now() < context.deadline())
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  static void WaitIdle(const Scheduler& scheduler, const grpc::ServerContext& context) {
    while (!scheduler.Idle() && !context.IsCancelled())
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  const ApiKeys keys_;
  const ApiServerBackends backends_;
  const LateScheduler* const late_;
  const absl::Time start_ = absl::Now();
  std::atomic<bool> shutdown_called_{false};
};

class ClusterService final : public v1::Cluster::Service {
 public:
  ClusterService(const ApiServerOptions& options, const ApiServerBackends& backends)
      : options_(options), backends_(backends) {}

  grpc::Status Register(grpc::ServerContext* context, const v1::RegisterRequest* in,
                        v1::RegisterResponse* out) override {
    if (!Member(in->cluster_token())) return Denied(*context);
    WorkerInfo info;
    info.rank = in->rank();
    info.host = in->host();
    info.device = in->device();
    info.pid = in->pid();
    info.build_id = in->build_id();
    info.config_hash = in->config_hash();
    info.experts.assign(in->experts().begin(), in->experts().end());
    info.data_plane = in->data_plane();
    info.instance = in->instance();
    Membership& membership = *backends_.membership;
    absl::StatusOr<int> rank = membership.Register(info, absl::Now());
    if (!rank.ok()) {
      EPX_LOG(Error) << "refused a worker: " << rank.status().message();
      return ToGrpc(rank.status());
    }
    EPX_LOG(Info) << "worker " << *rank << " registered from " << info.host << " (pid "
                  << info.pid << ", " << info.device << "): " << membership.num_registered()
                  << " of " << membership.num_workers();
    out->set_heartbeat_interval_ms(
        absl::ToInt64Milliseconds(membership.options().heartbeat_interval));
    out->set_rank(*rank);
    out->set_world_size(membership.num_workers() + 1);
    if (backends_.placement != nullptr) out->set_placement_json(backends_.placement->ToJson());
    out->set_data_plane(membership.identity().data_plane);
    out->set_store_prefix(membership.epoch().store_prefix);
    out->set_comm_timeout_ms(static_cast<uint32_t>(std::clamp<int64_t>(
        absl::ToInt64Milliseconds(options_.comm_timeout), 1, std::numeric_limits<uint32_t>::max())));
    return grpc::Status::OK;
  }

  grpc::Status AwaitEpoch(grpc::ServerContext* context, const v1::AwaitEpochRequest* in,
                          v1::EpochResponse* out) override {
    if (!Member(in->cluster_token())) return Denied(*context);
    // In slices, like StoreGet, so that a caller who goes away frees the handler thread.
    const absl::Time deadline =
        absl::Now() + std::min({absl::Milliseconds(in->timeout_ms()), kStoreGetLimit,
                                FromGrpcDeadline(*context) - absl::Now()});
    const int64_t after = static_cast<int64_t>(
        std::min<uint64_t>(in->after_epoch(), std::numeric_limits<int64_t>::max()));
    while (true) {
      const absl::Duration slice = std::min(deadline - absl::Now(), absl::Milliseconds(200));
      absl::StatusOr<ClusterEpoch> epoch = backends_.membership->AwaitEpoch(
          in->rank(), in->instance(), after, std::max(slice, absl::ZeroDuration()));
      if (epoch.ok()) {
        out->set_epoch(epoch->number);
        out->set_data_plane_rank(epoch->DataPlaneRank(in->rank()));
        out->set_world_size(static_cast<int32_t>(epoch->members.size()));
        out->set_placement_json(epoch->placement_json);
        out->set_store_prefix(epoch->store_prefix);
        out->mutable_members()->Add(epoch->members.begin(), epoch->members.end());
        return grpc::Status::OK;
      }
      if (epoch.status().code() != absl::StatusCode::kUnavailable || absl::Now() >= deadline)
        return ToGrpc(epoch.status());
      if (context->IsCancelled())
        return grpc::Status(grpc::StatusCode::CANCELLED, "the caller went away");
    }
  }

  grpc::Status Heartbeat(grpc::ServerContext* context, const v1::HeartbeatRequest* in,
                         v1::HeartbeatResponse* out) override {
    if (!Member(in->cluster_token())) return Denied(*context);
    Membership& membership = *backends_.membership;
    if (!in->reports_loaded()) {
      if (absl::Status beat = membership.Heartbeat(in->rank(), in->instance(), absl::Now());
          !beat.ok())
        return ToGrpc(beat);
    } else {
      absl::StatusOr<ExpertTarget> target = membership.Heartbeat(
          in->rank(), in->instance(),
          std::vector<int>(in->loaded_experts().begin(), in->loaded_experts().end()), absl::Now());
      if (!target.ok()) return ToGrpc(target.status());
      out->set_target_version(static_cast<uint64_t>(target->version));
      out->mutable_target_experts()->Add(target->experts.begin(), target->experts.end());
    }
    out->set_left_epoch(static_cast<uint64_t>(membership.left_epoch()));
    return grpc::Status::OK;
  }

  grpc::Status StoreSet(grpc::ServerContext* context, const v1::StoreSetRequest* in,
                        v1::StoreSetResponse* out) override {
    if (!Member(in->cluster_token())) return Denied(*context);
    if (backends_.store == nullptr) return NoStore();
    return ToGrpc(backends_.store->Set(in->key(), in->value()));
  }

  grpc::Status StoreGet(grpc::ServerContext* context, const v1::StoreGetRequest* in,
                        v1::StoreGetResponse* out) override {
    if (!Member(in->cluster_token())) return Denied(*context);
    if (backends_.store == nullptr) return NoStore();
    // Never past the caller's deadline nor kStoreGetLimit, and in slices, so that a caller who
    // goes away or a server shutting down frees the handler thread.
    const absl::Duration timeout = std::min(
        {absl::Milliseconds(in->timeout_ms()), kStoreGetLimit, FromGrpcDeadline(*context) - absl::Now()});
    const absl::Time deadline = absl::Now() + timeout;
    while (true) {
      const absl::Duration slice = std::min(deadline - absl::Now(), absl::Milliseconds(200));
      absl::StatusOr<std::string> value =
          backends_.store->Get(in->key(), std::max(slice, absl::ZeroDuration()));
      if (value.ok()) {
        out->set_value(*std::move(value));
        return grpc::Status::OK;
      }
      if (value.status().code() != absl::StatusCode::kDeadlineExceeded) return ToGrpc(value.status());
      if (absl::Now() >= deadline)
        return ToGrpc(absl::DeadlineExceededError(absl::StrCat(
            "store key \"", in->key(), "\" was not set within ", absl::FormatDuration(timeout))));
      if (context->IsCancelled())
        return grpc::Status(grpc::StatusCode::CANCELLED, "the caller went away");
    }
  }

 private:
  // An empty token is a cluster without one (launcher-free, no --cluster-token-file).
  bool Member(const std::string& token) const { return token == options_.cluster_token; }
  grpc::Status Denied(const grpc::ServerContext& context) const {
    EPX_LOG(Warning) << "control-plane call without this job's token from " << context.peer();
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "not a member of this job: the cluster token does not match");
  }
  static grpc::Status NoStore() {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this cluster's data plane needs no store (it was formed by mpirun)");
  }

  const ApiServerOptions options_;
  const ApiServerBackends backends_;
};

}  // namespace

class ApiServer::Impl {
 public:
  Impl(const ApiServerOptions& options, const ApiServerBackends& backends)
      : options_(options),
        backends_(backends),
        generation_(options, backends, &late_),
        admin_(options, backends, &late_),
        cluster_(options, backends) {
    late_.scheduler.store(backends.scheduler);
    late_.not_ready_reason = [this] { return NotReadyReason(); };
  }

  absl::Status Start() {
    EPX_ASSIGN_OR_RETURN(const ServerTls tls, LoadServerTls(options_.tls));
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder builder;
    builder.AddListeningPort(options_.listen, GrpcServerCredentials(tls), &port_);
    // Requests up to 4x the limit reach the handlers, which answer INVALID_ARGUMENT with the
    // size; larger ones are refused by gRPC itself (RESOURCE_EXHAUSTED).
    builder.SetMaxReceiveMessageSize(
        static_cast<int>(std::min<int64_t>(4 * options_.max_request_bytes, INT32_MAX)));
    builder.RegisterService(&generation_);
    builder.RegisterService(&admin_);
    builder.RegisterService(&cluster_);
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || port_ == 0)
      return absl::UnavailableError(absl::StrCat("cannot listen on ", options_.listen,
                                                 " (address in use or not valid)"));
    if (!options_.http_listen.empty()) {
      HttpServerOptions http;
      http.listen = options_.http_listen;
      http.threads = options_.http_threads;
      http.max_request_bytes = options_.max_request_bytes;
      http.model_name = options_.model_name;
      http.tls = options_.tls;
      http.keys = options_.keys;
      HttpBackends backends;
      backends.scheduler = [this](std::string* why_not) {
        Scheduler* s = late_.scheduler.load();
        if (s == nullptr) *why_not = NotReadyReason();
        return backends_.tokenizer == nullptr ? nullptr : s;
      };
      backends.not_ready_reason = [this] { return NotReadyReason(); };
      backends.metrics_text = [this] {
        return ServingMetricsText(late_.scheduler.load(), *backends_.membership,
                                  options_.model_name);
      };
      backends.stats_json = [this]() -> absl::StatusOr<std::string> {
        v1::StatsResponse stats;
        admin_.Fill(&stats);
        return MessageJson(stats);
      };
      backends.tokenizer = backends_.tokenizer;
      absl::StatusOr<std::unique_ptr<HttpServer>> started = HttpServer::Start(http, backends);
      if (!started.ok()) {
        server_->Shutdown();
        return started.status();
      }
      http_ = *std::move(started);
    }
    UpdateHealth();
    monitor_ = std::thread([this] {
      while (!stop_.WaitForNotificationWithTimeout(absl::Milliseconds(100))) UpdateHealth();
    });
    return absl::OkStatus();
  }

  std::string NotReadyReason() const {
    if (shutting_down_.load()) return "shutting down";
    const Scheduler* scheduler = late_.scheduler.load();
    if (scheduler != nullptr) {
      if (absl::Status failure = scheduler->failure(); !failure.ok())
        return absl::StrCat("data plane failed: ", failure.message());
    }
    std::string reason = backends_.membership->NotReadyReason(absl::Now());
    if (reason.empty() && scheduler == nullptr)
      reason = backends_.tokenizer == nullptr ? "a batch job (no generation API)"
                                              : "the cluster is forming";
    if (reason.empty() && scheduler->draining()) reason = "draining";
    return reason;
  }

  void UpdateHealth() {
    const std::string reason = NotReadyReason();
    if (reason == last_reason_ && health_set_) return;
    health_set_ = true;
    last_reason_ = reason;
    server_->GetHealthCheckService()->SetServingStatus(kGenerationService, reason.empty());
    if (reason.empty()) {
      EPX_LOG(Info) << "ready: " << kGenerationService << " SERVING";
    } else {
      EPX_LOG(Info) << "not ready: " << kGenerationService << " NOT_SERVING (" << reason << ")";
    }
  }

  void Shutdown(absl::Duration grace) {
    if (shutting_down_.exchange(true)) return;
    if (!stop_.HasBeenNotified()) stop_.Notify();
    if (monitor_.joinable()) monitor_.join();
    server_->GetHealthCheckService()->SetServingStatus(kGenerationService, false);
    if (http_ != nullptr) http_->Shutdown();
    server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
    server_->Wait();
  }

  const ApiServerOptions options_;
  const ApiServerBackends backends_;
  LateScheduler late_;
  GenerationService generation_;
  AdminService admin_;
  ClusterService cluster_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<HttpServer> http_;
  int port_ = 0;
  std::thread monitor_;
  absl::Notification stop_;
  std::atomic<bool> shutting_down_{false};
  std::string last_reason_;  // monitor thread
  bool health_set_ = false;  // monitor thread
};

absl::StatusOr<std::string> MessageJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string json;
  auto status = google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!status.ok())
    return absl::InternalError(
        absl::StrCat("cannot print ", message.GetTypeName(), " as JSON: ", status.ToString()));
  return json;
}

absl::StatusOr<std::unique_ptr<ApiServer>> ApiServer::Start(const ApiServerOptions& options,
                                                            const ApiServerBackends& backends) {
  if (backends.membership == nullptr)
    return absl::InvalidArgumentError("ApiServer needs a membership");
  if (options.listen.empty() || options.listen.find(':') == std::string::npos)
    return absl::InvalidArgumentError(
        absl::StrCat("listen address \"", options.listen, "\" is not HOST:PORT"));
  auto impl = std::make_unique<Impl>(options, backends);
  EPX_RETURN_IF_ERROR(impl->Start());
  return std::unique_ptr<ApiServer>(new ApiServer(std::move(impl)));
}

ApiServer::ApiServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ApiServer::~ApiServer() { Shutdown(absl::Seconds(1)); }

int ApiServer::port() const { return impl_->port_; }

int ApiServer::http_port() const { return impl_->http_ != nullptr ? impl_->http_->port() : 0; }

std::string ApiServer::address() const {
  const std::string& listen = impl_->options_.listen;
  return absl::StrCat(listen.substr(0, listen.rfind(':')), ":", impl_->port_);
}

void ApiServer::Shutdown(absl::Duration grace) { impl_->Shutdown(grace); }

void ApiServer::SetScheduler(Scheduler* scheduler) { impl_->late_.scheduler.store(scheduler); }

}  // namespace epx
