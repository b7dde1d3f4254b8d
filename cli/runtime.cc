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
  if (!options.role.empty() && options.role != "coordinator" && options.role != "worker")
    return absl::InvalidArgumentError(
        absl::StrCat("--role must be coordinator or worker, got \"", options.role, "\""));
  if (world == 1 && options.role == "worker")
    return absl::InvalidArgumentError(
        "--role worker needs a launcher with more ranks (mpirun -np 1+W ...)");

  EPX_ASSIGN_OR_RETURN(rt->config_, ModelConfig::FromDir(options.model_dir));
  if (world == 1) {
    EPX_ASSIGN_OR_RETURN(rt->weights_, ModelWeights::Load(options.model_dir, rt->config_,
                                                          WeightSelection::All(rt->config_)));
    EPX_ASSIGN_OR_RETURN(rt->engine_, Engine::Create(rt->weights_.get()));
    return rt;
  }

  const int experts = static_cast<int>(rt->config_.num_local_experts);
  absl::StatusOr<Placement> placement =
      options.placement == "round-robin"
          ? Placement::RoundRobin(experts, world - 1)
          : Placement::FromFile(options.placement, experts, world - 1);
  if (!placement.ok()) return placement.status();
  rt->placement_ = std::make_unique<Placement>(*std::move(placement));
  // Every rank checks the others before loading anything large.
  EPX_RETURN_IF_ERROR(rt->Handshake(*rt->placement_));
  EPX_ASSIGN_OR_RETURN(rt->weights_,
                       ModelWeights::Load(options.model_dir, rt->config_,
                                          WeightSelection::ForRank(*rt->placement_, rank)));
  EPX_LOG(Info) << (rank == 0 ? "coordinator" : "worker") << " mapped "
                << rt->weights_->bytes_mapped() << " bytes of weights";
  if (rank == 0) {
    // A signal ends the job between steps, with the workers told to stop.
    std::signal(SIGTERM, OnStopSignal);
    std::signal(SIGINT, OnStopSignal);
    rt->remote_experts_ = std::make_unique<DistributedExpertExecutor>(
        rt->config_, *rt->placement_, rt->comm_, options.comm_timeout);
    EPX_ASSIGN_OR_RETURN(rt->engine_,
                         Engine::Create(rt->weights_.get(), rt->remote_experts_.get()));
  }
  return rt;
}

absl::Status Runtime::Handshake(const Placement& placement) {
  comm::Hello hello;
  std::strncpy(hello.build, BuildId().c_str(), sizeof(hello.build) - 1);
  hello.config_hash = config_.Hash();
  hello.placement_hash = Fnv1a64(placement.ToString());
  hello.rank = rank();
  const bool wants_worker = options_.role.empty() ? rank() != 0 : options_.role == "worker";
  hello.role = wants_worker ? comm::Role::kWorker : comm::Role::kCoordinator;
  hello.world_size = world_size();
  std::vector<comm::Hello> all(world_size());
  EPX_RETURN_IF_ERROR(comm_->AllGather(&hello, sizeof(hello), all.data(), comm::Tag::kHandshake,
                                       options_.comm_timeout, "start-up handshake"));
  return comm::VerifyHellos(all);
}

absl::Status Runtime::ServeAsWorker() {
  if (!is_worker()) return absl::FailedPreconditionError("rank 0 is the coordinator");
  ExpertWorkerOptions worker_options;
  worker_options.timeout = options_.comm_timeout;
  return RunExpertWorker(comm_, *weights_, *placement_, worker_options);
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
