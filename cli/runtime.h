// What one `epx` process is in a job, set up from the command line: with no launcher, the whole
// model in this process; under mpirun (-np 1+W), rank 0 the coordinator (attention, routing,
// sampling; experts on the workers) and ranks 1..W expert workers. Loads the weights of the
// process's role only, checks that all ranks agree (build, config, placement), and shuts the
// workers down at the end.
//
// Not thread-safe; the command's thread owns it.
#ifndef EPX_CLI_RUNTIME_H_
#define EPX_CLI_RUNTIME_H_

#include <memory>
#include <optional>
#include <ostream>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "common/model_config.h"
#include "common/model_weights.h"
#include "common/placement.h"
#include "coordinator/cuda_forward.h"
#include "coordinator/distributed_expert_executor.h"
#include "coordinator/engine.h"

namespace epx {

struct RuntimeOptions {
  std::string model_dir;
  // Set: this configuration instead of model_dir/config.json (a preset for --load-format dummy,
  // which then needs no directory at all; or a config with overridden fields).
  std::optional<ModelConfig> config;
  std::string placement = "round-robin";  // or a placement file (common/placement.h)
  std::string role;                       // "", "coordinator" or "worker" (MPMD launches)
  absl::Duration comm_timeout = absl::Seconds(30);
  EngineOptions engine;  // KV cache size (coordinator)
  // Where the coordinator computes: "cpu", or "cuda" (kernels/cuda; experts too unless workers
  // hold them).
  std::string device = "cpu";
  CudaForwardOptions cuda;  // --cuda-device, --expert-dtype, --grouped-gemm
  // "auto": the checkpoint's safetensors; "dummy": synthetic weights at the config's shapes,
  // generated on the GPU (needs --device cuda; the directory needs only config.json).
  std::string load_format = "auto";
  // Use this communicator instead of MPI (tests: in-process ranks). Not owned.
  comm::Communicator* comm = nullptr;
};

// The build identity all ranks of a job must share.
std::string BuildId();

class Runtime {
 public:
  // Errors: bad options or files (InvalidArgument/NotFound naming them), ranks that disagree
  // (FailedPrecondition naming the rank), communication failures.
  static absl::StatusOr<std::unique_ptr<Runtime>> Start(const RuntimeOptions& options);
  // A coordinator that was not finished shuts its workers down (or aborts the job if a step was
  // cut short).
  ~Runtime();

  int rank() const { return comm_ == nullptr ? 0 : comm_->rank(); }
  int world_size() const { return comm_ == nullptr ? 1 : comm_->world_size(); }
  bool is_worker() const { return rank() != 0; }
  const ModelConfig& config() const { return config_; }
  // The host weights this rank loaded; nullptr with --load-format dummy.
  const ModelWeights* weights() const { return weights_.get(); }

  // Worker ranks: serves expert work until the coordinator shuts the job down. On an error the
  // job is aborted (the coordinator cannot be reached otherwise) and the error returned.
  absl::Status ServeAsWorker();
  // Serving: rank 0 hands `endpoint` (the control plane's address and the job's token) to every
  // worker, which receive it; all ranks call this once, right after Start(). An empty string
  // means the coordinator could not start serving. Blocks until every rank took part.
  absl::StatusOr<std::string> ShareControlEndpoint(const std::string& endpoint);
  // Where this rank computes: "cpu", or "cuda:N <device name>".
  std::string device() const;
  // This rank's placement (multi-rank jobs); nullptr in a single process.
  const Placement* placement() const { return placement_.get(); }
  // Coordinator: the engine (experts local or remote).
  Engine& engine() { return *engine_; }

  // Coordinator: ends the job with `result`. OK or an input error: the workers are told to stop
  // and `result` is returned. A failure in the middle of a step (a worker lost or silent): the
  // failure is reported and the whole job aborted, since the workers cannot be reached cleanly.
  absl::Status Finish(absl::Status result);

  // Coordinator: SIGTERM or SIGINT arrived; commands stop between steps and Finish() cleanly.
  static bool stop_requested();

  // Per-layer time in attention, dispatch, expert compute and combine; tokens per expert and
  // per worker; weight bytes this rank mapped.
  void PrintStats(std::ostream& out) const;
  // Coordinator of a multi-rank job: the executor's counters; nullptr otherwise.
  const ExpertParallelStats* expert_parallel_stats() const {
    return remote_experts_ ? &remote_experts_->stats() : nullptr;
  }

 private:
  Runtime() = default;
  // Role, config and placement from the options.
  absl::Status Configure();
  // The coordinator's engine on options_.device, over the loaded (or dummy) weights.
  absl::Status CreateEngine(ExpertExecutor* remote_experts);
  // Exchanges Hellos (carrying `configured`) and checks that all ranks agree.
  absl::Status Handshake(const absl::Status& configured);

  RuntimeOptions options_;
  ModelConfig config_;
  std::unique_ptr<comm::Communicator> owned_comm_;
  comm::Communicator* comm_ = nullptr;
  std::unique_ptr<Placement> placement_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<DistributedExpertExecutor> remote_experts_;
  std::unique_ptr<Engine> engine_;
  bool finished_ = false;
};

}  // namespace epx

#endif  // EPX_CLI_RUNTIME_H_
