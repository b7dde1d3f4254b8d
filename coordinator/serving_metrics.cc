#include "coordinator/serving_metrics.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/metrics.h"

namespace epx {

std::string ServingMetricsText(const Scheduler* scheduler, const Membership& membership,
                               const std::string& model_name) {
  MetricsText m;
  const MetricLabels model = {{"model_name", model_name}};
  auto with = [&model](std::string key, std::string value) {
    MetricLabels l = model;
    l.emplace_back(std::move(key), std::move(value));
    return l;
  };
  if (scheduler != nullptr) {
    const SchedulerStats s = scheduler->stats();
    m.Family("epx:num_requests_running", "gauge", "Requests in the running batch.");
    m.Sample("epx:num_requests_running", model, static_cast<double>(s.running));
    m.Family("epx:num_requests_waiting", "gauge", "Requests waiting in the queue.");
    m.Sample("epx:num_requests_waiting", model, static_cast<double>(s.queue_length));
    m.Family("epx:kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (0 to 1).");
    m.Sample("epx:kv_cache_usage_perc", model,
             s.kv_blocks_total > 0 ? static_cast<double>(s.kv_blocks_used) / s.kv_blocks_total : 0);
    m.Family("epx:prompt_tokens", "counter", "Prompt tokens of accepted requests.");
    m.Sample("epx:prompt_tokens_total", model, static_cast<double>(s.prompt_tokens));
    m.Family("epx:generation_tokens", "counter", "Tokens generated.");
    m.Sample("epx:generation_tokens_total", model, static_cast<double>(s.generated_tokens));
    m.Family("epx:request_success", "counter",
             "Requests that completed, by finish reason (stop: a stop string or token).");
    const std::pair<FinishReason, const char*> reasons[] = {{FinishReason::kLength, "length"},
                                                            {FinishReason::kStop, "stop"},
                                                            {FinishReason::kEos, "eos"}};
    for (const auto& [reason, name] : reasons)
      m.Sample("epx:request_success_total", with("finished_reason", name),
               static_cast<double>(s.finished_by_reason[static_cast<size_t>(reason)]));
    m.Family("epx:requests", "counter",
             "Requests by outcome: accepted into the queue, finished, failed, rejected (queue "
             "full), cancelled (by the client, a deadline or shutdown).");
    const std::pair<const char*, int64_t> outcomes[] = {{"accepted", s.accepted},
                                                        {"finished", s.finished},
                                                        {"failed", s.failed},
                                                        {"rejected", s.rejected},
                                                        {"cancelled", s.cancelled}};
    for (const auto& [name, value] : outcomes)
      m.Sample("epx:requests_total", with("outcome", name), static_cast<double>(value));
    m.Family("epx:steps", "counter", "Engine steps run.");
    m.Sample("epx:steps_total", model, static_cast<double>(s.engine.steps));
    m.Family("epx:recoveries", "counter", "Steps run again after the expert tier re-formed.");
    m.Sample("epx:recoveries_total", model, static_cast<double>(s.recoveries));

    const ServingHistograms& h = scheduler->histograms();
    const std::tuple<const char*, const Histogram*, const char*> histograms[] = {
        {"epx:time_to_first_token_seconds", &h.time_to_first_token,
         "From arrival to the first generated token."},
        {"epx:inter_token_latency_seconds", &h.inter_token_latency,
         "Between two generated tokens of a request."},
        {"epx:e2e_request_latency_seconds", &h.e2e_latency, "From arrival to the last event."},
        {"epx:request_queue_time_seconds", &h.queue_time, "From arrival to admission."}};
    for (const auto& [name, histogram, help] : histograms) {
      m.Family(name, "histogram", help);
      m.Histogram(name, model, histogram->snapshot());
    }

    m.Family("epx:expert_tokens", "counter", "Tokens routed to each expert of each layer.");
    for (size_t l = 0; l < s.engine.expert_tokens.size(); ++l)
      for (size_t e = 0; e < s.engine.expert_tokens[l].size(); ++e)
        m.Sample("epx:expert_tokens_total",
                 {{"layer", absl::StrCat(l)}, {"expert", absl::StrCat(e)}},
                 static_cast<double>(s.engine.expert_tokens[l][e]));
    m.Family("epx:layer_time_seconds", "counter",
             "Time spent per layer and phase (attention, moe; with workers also dispatch, "
             "expert, combine).");
    for (size_t l = 0; l < s.engine.attention_us.size(); ++l) {
      const std::string layer = absl::StrCat(l);
      auto phase = [&](const char* name, double us) {
        m.Sample("epx:layer_time_seconds_total", {{"layer", layer}, {"phase", name}}, us / 1e6);
      };
      phase("attention", static_cast<double>(s.engine.attention_us[l]));
      phase("moe", static_cast<double>(s.engine.moe_us[l]));
      if (s.expert_parallel.has_value() && l < s.expert_parallel->dispatch_us.size()) {
        phase("dispatch", static_cast<double>(s.expert_parallel->dispatch_us[l]));
        phase("expert", static_cast<double>(s.expert_parallel->expert_us[l]));
        phase("combine", static_cast<double>(s.expert_parallel->combine_us[l]));
      }
    }
  }
  const std::vector<WorkerState> workers = membership.Workers(absl::Now());
  int alive = 0;
  for (const WorkerState& w : workers) alive += w.alive;
  m.Family("epx:workers", "gauge", "Expert workers this coordinator expects.");
  m.Sample("epx:workers", static_cast<double>(workers.size()));
  m.Family("epx:workers_alive", "gauge", "Workers registered and heard from in time.");
  m.Sample("epx:workers_alive", static_cast<double>(alive));
  m.Family("epx:worker_heartbeat_age_seconds", "gauge",
           "Time since each registered worker's last heartbeat.");
  for (const WorkerState& w : workers)
    if (w.registered)
      m.Sample("epx:worker_heartbeat_age_seconds", {{"rank", absl::StrCat(w.info.rank)}},
               absl::ToDoubleSeconds(w.heartbeat_age));
  return m.text();
}

}  // namespace epx
