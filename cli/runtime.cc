#include "cli/runtime.h"

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstring>
#include <iomanip>

#include "absl/strings/str_cat.h"
#include "comm/mpi_communicator.h"
#include "comm/protocol.h"
#include "common/hash.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/expert_worker.h"

#ifndef EPX_BUILD_ID
#define EPX_BUILD_ID "unknown"
#endif

namespace epx {

std::string BuildId() { return EPX_BUILD_ID; }

namespace {
std::atomic<bool> g_stop{false};
extern "C" void OnStopSignal(int) { g_stop.store(true); }
}  // namespace

bool Runtime::stop_requested() { return g_stop.load(); }

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::Start(const RuntimeOptions& options) {
  auto rt = std::unique_ptr<Runtime>(new Runtime());
  rt->options_ = options;
  if (options.comm != nullptr) {
    rt->comm_ = options.comm;
  } else if (comm::LaunchedByMpi()) {
    EPX_ASSIGN_OR_RETURN(rt->owned_comm_, comm::CreateMpiCommunicator(nullptr, nullptr));
    rt->comm_ = rt->owned_comm_.get();
  }
  const int rank = rt->rank(), world = rt->world_size();
  SetLogRank(rank);
  if (rank == 0 && options.comm == nullptr) {
    // A signal ends the job between steps (with the workers told to stop), not in the middle.
    static_assert(std::atomic<bool>::is_always_lock_free);
    std::signal(SIGTERM, OnStopSignal);
    std::signal(SIGINT, OnStopSignal);
  }
  if (world == 1) {
    EPX_RETURN_IF_ERROR(rt->Configure());
    EPX_ASSIGN_OR_RETURN(rt->weights_, ModelWeights::Load(options.model_dir, rt->config_,
                                                          WeightSelection::All(rt->config_)));
    EPX_ASSIGN_OR_RETURN(rt->engine_, Engine::Create(rt->weights_.get()));
    return rt;
  }

  // Every rank reaches both exchanges, whatever failed locally, so that all stop together with
  // the same message naming the rank at fault.
  EPX_RETURN_IF_ERROR(rt->Handshake(rt->Configure()));
  absl::Status loaded = [&]() -> absl::Status {
    EPX_ASSIGN_OR_RETURN(rt->weights_,
                         ModelWeights::Load(options.model_dir, rt->config_,
                                            WeightSelection::ForRank(*rt->placement_, rank)));
    return absl::OkStatus();
  }();
  comm::StartupReport mine = comm::MakeReport(loaded);
  std::vector<comm::StartupReport> reports(world);
  EPX_RETURN_IF_ERROR(rt->comm_->AllGather(&mine, sizeof(mine), reports.data(),
                                           comm::Tag::kReady, options.comm_timeout,
                                           "start-up (weights loaded)"));
  EPX_RETURN_IF_ERROR(comm::VerifyReports(reports, "loading its weights"));
  EPX_LOG(Info) << (rank == 0 ? "coordinator" : "worker") << " mapped "
                << rt->weights_->bytes_mapped() << " bytes of weights";
  if (rank == 0) {
    rt->remote_experts_ = std::make_unique<DistributedExpertExecutor>(
        rt->config_, *rt->placement_, rt->comm_, options.comm_timeout);
    EPX_ASSIGN_OR_RETURN(rt->engine_,
                         Engine::Create(rt->weights_.get(), rt->remote_experts_.get()));
  }
  return rt;
}

absl::Status Runtime::Configure() {
  if (!options_.role.empty() && options_.role != "coordinator" && options_.role != "worker")
    return absl::InvalidArgumentError(
        absl::StrCat("--role must be coordinator or worker, got \"", options_.role, "\""));
  if (world_size() == 1 && options_.role == "worker")
    return absl::InvalidArgumentError(
        "--role worker needs a launcher with more ranks (mpirun -np 1+W ...)");
  EPX_ASSIGN_OR_RETURN(config_, ModelConfig::FromDir(options_.model_dir));
  if (world_size() == 1) return absl::OkStatus();
  const int experts = static_cast<int>(config_.num_local_experts);
  absl::StatusOr<Placement> placement =
      options_.placement == "round-robin"
          ? Placement::RoundRobin(experts, world_size() - 1)
          : Placement::FromFile(options_.placement, experts, world_size() - 1);
  if (!placement.ok()) return placement.status();
  placement_ = std::make_unique<Placement>(*std::move(placement));
  return absl::OkStatus();
}

absl::Status Runtime::Handshake(const absl::Status& configured) {
  comm::Hello hello;
  hello.setup = comm::MakeReport(configured);
  std::strncpy(hello.build, BuildId().c_str(), sizeof(hello.build) - 1);
  if (configured.ok()) {
    hello.config_hash = config_.Hash();
    hello.placement_hash = Fnv1a64(placement_->ToString());
  }
  hello.rank = rank();
  const bool wants_worker = options_.role.empty() ? rank() != 0 : options_.role == "worker";
  hello.role = wants_worker ? comm::Role::kWorker : comm::Role::kCoordinator;
  hello.world_size = world_size();
  std::vector<comm::Hello> all(world_size());
  EPX_RETURN_IF_ERROR(comm_->AllGather(&hello, sizeof(hello), all.data(), comm::Tag::kHandshake,
                                       options_.comm_timeout, "start-up handshake"));
  // The local error, if any, is in the verdict too (every rank reports the first failed rank).
  return comm::VerifyHellos(all);
}

absl::Status Runtime::ServeAsWorker() {
  if (!is_worker()) return absl::FailedPreconditionError("rank 0 is the coordinator");
  absl::Status status = RunExpertWorker(comm_, *weights_, *placement_, ExpertWorkerOptions());
  // The coordinator is waiting on this rank mid-step: only aborting the job reaches it, and the
  // message names this rank.
  if (!status.ok()) comm_->Abort(1, std::string(status.message()));
  return status;
}

absl::Status Runtime::Finish(absl::Status result) {
  if (finished_ || remote_experts_ == nullptr) return result;  // alone, a worker, or half-built
  finished_ = true;
  if (remote_experts_->in_step()) {
    const std::string message =
        absl::StrCat("a step failed with the workers in the middle of it: ", result.message());
    EPX_LOG(Error) << message;
    comm_->Abort(1, message);
    return result.ok() ? absl::InternalError(message) : result;
  }
  absl::Status shutdown = remote_experts_->Shutdown();
  if (!shutdown.ok()) {
    EPX_LOG(Error) << "shutting the workers down: " << shutdown;
    comm_->Abort(1, std::string(shutdown.message()));
  }
  return result.ok() ? shutdown : result;
}

Runtime::~Runtime() {
  if (!finished_) Finish(absl::OkStatus()).IgnoreError();
}

void Runtime::PrintStats(std::ostream& out) const {
  const EngineStats& es = engine_->stats();
  const int64_t layers = config_.num_hidden_layers;
  const double steps = static_cast<double>(std::max<int64_t>(es.steps, 1));
  out << "epx stats: " << es.steps << " steps, " << es.tokens << " tokens, " << world_size()
      << " rank(s); coordinator mapped " << weights_->bytes_mapped() / 1e6
      << " MB of weights\n";
  out << "per step, microseconds (expert compute: the slowest worker's):\n";
  out << "layer  attention_us  moe_us  dispatch_us  expert_us  combine_us  tokens_per_expert\n";
  for (int64_t l = 0; l < layers; ++l) {
    out << std::setw(5) << l << std::fixed << std::setprecision(1) << std::setw(14)
        << es.attention_us[l] / steps << std::setw(8) << es.moe_us[l] / steps;
    if (remote_experts_ != nullptr) {
      const ExpertParallelStats& ps = remote_experts_->stats();
      out << std::setw(13) << ps.dispatch_us[l] / steps << std::setw(11)
          << ps.expert_us[l] / steps << std::setw(12) << ps.combine_us[l] / steps;
    } else {
      out << std::setw(13) << "-" << std::setw(11) << "(in moe)" << std::setw(12) << "-";
    }
    out << "  ";
    for (int64_t n : es.expert_tokens[l]) out << ' ' << n;
    out << '\n';
  }
  if (remote_experts_ != nullptr) {
    out << "tokens per worker (rows received, all layers):";
    const auto& wt = remote_experts_->stats().worker_tokens;
    for (size_t w = 1; w < wt.size(); ++w) out << " rank" << w << "=" << wt[w];
    out << "\nplacement: " << placement_->ToString() << '\n';
  }
}

}  // namespace epx
