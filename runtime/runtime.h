// What one `epx` process is in a job, set up from the command line:
//   - alone: the whole model in this process;
//   - under mpirun (-np 1+W): rank 0 the coordinator (attention, routing, sampling; experts on
//     the workers), ranks 1..W expert workers, over the MPI data plane;
//   - a launcher-free cluster: a coordinator started with `workers` = W listens on its control
//     plane, and workers started on their own with `coordinator` = HOST:PORT register there, in
//     any order; registration gives each its rank and placement, and the data plane (gloo or NCCL)
//     is bootstrapped through the coordinator's store once all W have registered.
// Then every multi-rank job runs the same start-up agreement over the data plane (build,
// config, placement; weights loaded), loads the weights of the process's role only, and the
// coordinator shuts the workers down at the end. docs/ARCHITECTURE.md, "Start-up".
//
// A launcher-free cluster (gloo or NCCL) survives a lost worker and takes new ones in (the
// coordinator is a StepRecovery for its scheduler): a step that fails on the data plane is run
// again on a data plane re-formed among the workers that are left, with the replicas they hold;
// a worker registering into a free slot joins between two steps. docs/ARCHITECTURE.md, "Losing and
// gaining workers".
//
// Not thread-safe; the command's thread owns it.
#ifndef EPX_RUNTIME_RUNTIME_H_
#define EPX_RUNTIME_RUNTIME_H_

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "comm/key_value_store.h"
#include "common/model_config.h"
#include "common/model_weights.h"
#include "common/placement.h"
#include "coordinator/cuda_forward.h"
#include "coordinator/distributed_expert_executor.h"
#include "coordinator/engine.h"
#include "coordinator/membership.h"
#include "coordinator/scheduler.h"
#include "coordinator/services.h"
#include "worker/control_client.h"
#include "worker/expert_worker.h"

namespace epx {

class Runtime;

struct RuntimeOptions {
  std::string model_dir;
  // Set: this configuration instead of model_dir/config.json (a preset for --load-format dummy,
  // which then needs no directory at all; or a config with overridden fields).
  std::optional<ModelConfig> config;
  std::string placement = "round-robin";  // or a placement file (common/placement.h)
  int replicas = 1;  // round-robin: copies of every expert, on distinct workers (--replicas)
  std::string role;                       // "", "coordinator" or "worker" (MPMD launches)
  absl::Duration comm_timeout = absl::Seconds(30);
  EngineOptions engine;  // KV cache size (coordinator)
  // Where the coordinator computes: "cpu", or "cuda" (kernels/cuda; experts too unless workers
  // hold them).
  std::string device = "cpu";
  CudaForwardOptions cuda;  // --cuda-device, --expert-dtype, --grouped-gemm
  // --cuda-device not given: under a launcher each rank takes the GPU of its local rank
  // (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID or LOCAL_RANK, modulo the devices it sees);
  // otherwise cuda.device.
  bool cuda_device_from_local_rank = false;
  // "auto": the checkpoint's safetensors; "dummy": synthetic weights at the config's shapes,
  // generated on the GPU (needs --device cuda; the directory needs only config.json).
  std::string load_format = "auto";
  // Use this communicator instead of forming one (tests: in-process ranks). Not owned.
  comm::Communicator* comm = nullptr;

  // --data-plane: auto, mpi, gloo or nccl (comm/data_plane.h).
  std::string data_plane = "auto";
  // The address this rank's data plane listens on and advertises. Empty: the coordinator's
  // listen host (or this host's name for a wildcard); a worker's address towards the
  // coordinator.
  std::string data_plane_host;
  // The secret every process of a launcher-free cluster presents on the control plane (empty:
  // none; anyone who reaches the port may join).
  std::string cluster_token;
  // A launcher-free worker's TLS towards its coordinator (--tls-ca, --tls-cert, --tls-key).
  ClientTlsOptions coordinator_tls;

  // Launcher-free coordinator: wait for this many workers (--workers W), on the control plane
  // at `listen`.
  int workers = 0;
  std::string listen = "127.0.0.1:50051";
  // How long the coordinator waits for its W workers (infinite by default: they may be
  // scheduled late).
  absl::Duration form_timeout = absl::InfiniteDuration();
  MembershipOptions membership;  // heartbeat interval and timeout
  // Starts the control plane of a launcher-free coordinator (serve: the whole API server),
  // called once the config, placement, membership and store exist. The Runtime owns the server
  // (control_server()) and stops it before the membership and store it serves go away, also when
  // Start fails. Unset: a server with only the control plane (eval, generate).
  std::function<absl::StatusOr<std::unique_ptr<ApiServer>>(Runtime&)> start_control_plane;

  // Launcher-free worker: the coordinator's control plane (--coordinator HOST:PORT), the rank
  // asked for (--rank; 0: any) and how long to keep trying to reach the coordinator.
  std::string coordinator;
  int rank = 0;
  absl::Duration register_timeout = absl::Minutes(10);

  // Launcher-free coordinator: every this many steps, a placement that gives the
  // experts routed the most tokens in those steps extra replicas (same number of copies in all)
  // is computed, loaded by the workers in the background, and switched to between two steps.
  // 0: never.
  int64_t rebalance_interval = 0;
  // Worker slots a launcher-free cluster may grow to as workers join (scale up).
  int max_workers = 256;
};

// The build identity all ranks of a job must share.
std::string BuildId();
// This host's name ("localhost" if it has none).
std::string HostName();
// A random id drawn once per process, which its registrations carry (WorkerInfo::instance).
const std::string& ProcessInstanceId();
// The secret of a launcher-free cluster: the contents of `file` (surrounding whitespace
// dropped; NotFound / InvalidArgument for a missing or empty file), else $EPX_CLUSTER_TOKEN,
// else none ("").
absl::StatusOr<std::string> ClusterToken(const std::string& file);

class Runtime : public StepRecovery {
 public:
  // Errors: bad options or files (InvalidArgument/NotFound naming them), ranks that disagree or
  // workers refused (FailedPrecondition naming the rank), communication failures.
  static absl::StatusOr<std::unique_ptr<Runtime>> Start(const RuntimeOptions& options);
  // A command's whole job on every rank (eval, generate, batch): Start(); worker ranks
  // ServeAsWorker(); the coordinator runs `job` on its engine, prints PrintStats() to `log` after
  // a job that succeeded when `stats`, and Finish()es with the job's result.
  static absl::Status RunJob(const RuntimeOptions& options, bool stats, std::ostream& log,
                             const std::function<absl::Status(Engine&)>& job);
  // A coordinator that was not finished shuts its workers down (or aborts the job if a step was
  // cut short).
  ~Runtime();

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  bool is_worker() const { return rank() != 0; }
  // A cluster formed without a launcher (coordinator or worker).
  bool launcher_free() const { return !data_plane_.empty() && !launched_by_mpi_; }
  const ModelConfig& config() const { return config_; }
  // The host weights this rank loaded; nullptr with --load-format dummy.
  const ModelWeights* weights() const { return weights_.get(); }
  // The resolved data plane ("mpi", "gloo", "nccl"); empty alone or with an injected communicator.
  const std::string& data_plane() const { return data_plane_; }

  // Worker ranks: serves expert work until the coordinator shuts the job down. On an error the
  // job is aborted (the coordinator cannot be reached otherwise) and the error returned.
  absl::Status ServeAsWorker();
  // Serving under mpirun: rank 0 hands `endpoint` (the control plane's address and the job's
  // token) to every worker, which receive it; all ranks call this once, right after Start(). An
  // empty string means the coordinator could not start serving. Blocks until every rank took
  // part. Launcher-free and single-process runtimes return `endpoint`.
  absl::StatusOr<std::string> ShareControlEndpoint(const std::string& endpoint);
  // Where this rank computes: "cpu", or "cuda:N <device name>".
  std::string device() const;
  // What this worker says of itself at registration: its rank (the one asked for until it has
  // one), host, device, pid, build, config hash, data plane, instance id, and its experts once
  // the placement is known.
  WorkerInfo worker_info() const;
  // This rank's placement (multi-rank jobs); nullptr in a single process.
  const Placement* placement() const { return placement_.get(); }
  // Coordinator: the workers' membership (none in a single process) and, launcher-free, the
  // data plane's rendezvous store with its key prefix.
  Membership* membership() { return membership_.get(); }
  comm::KeyValueStore* store() { return store_.get(); }
  // Launcher-free coordinator: the server start_control_plane made; nullptr otherwise.
  ApiServer* control_server() { return control_server_.get(); }
  const std::string& store_prefix() const { return store_prefix_; }
  // Coordinator: the engine (experts local or remote).
  Engine& engine() { return *engine_; }

  // Coordinator of a launcher-free cluster (gloo or NCCL): its scheduler's StepRecovery (docs/
  // ARCHITECTURE.md, "Losing and gaining workers"). Fail-stop under mpirun (MPI aborts a job on
  // a process death).
  bool resilient() const;
  // Between steps: a worker waiting to join re-forms the data plane with it. Not OK while some
  // expert has no live worker (UNAVAILABLE naming it).
  absl::Status BeforeStep() override;
  // A step failed on the data plane: the workers it names are dropped, the data plane re-forms
  // among the others, and OK means the same step may run again. Else why not.
  absl::Status Recover(const absl::Status& failure) override;

  // Coordinator (resilient): moves to `placement_json` (a placement file in worker ranks; a
  // worker may hold none, and then leaves): the workers load their new experts in the
  // background and the switch happens between two steps. Thread-safe; InvalidArgument for a
  // placement that does not parse or fit, FailedPrecondition when not resilient.
  absl::Status RequestPlacement(const std::string& placement_json, const std::string& why);
  // Coordinator (resilient): worker `rank` hands its experts to the others and leaves.
  // Thread-safe; NotFound for a worker not in the cluster, FailedPrecondition for the last one.
  absl::Status RequestDrain(int rank);

  // Coordinator: ends the job with `result`. OK or an input error: the workers are told to stop
  // and `result` is returned. A failure in the middle of a step (a worker lost or silent): the
  // failure is reported and the whole job aborted, since the workers cannot be reached cleanly.
  absl::Status Finish(absl::Status result);

  // Coordinator: SIGTERM or SIGINT arrived (or RequestStop()); commands stop between steps and
  // Finish() cleanly, and a coordinator waiting for its workers gives up.
  static bool stop_requested();
  static void RequestStop();

  // Per-layer time in attention, dispatch, expert compute and combine; tokens per expert and
  // per worker; weight bytes this rank mapped.
  void PrintStats(std::ostream& out) const;
  // Coordinator of a multi-rank job: the executor's counters; nullptr otherwise.
  const ExpertParallelStats* expert_parallel_stats() const {
    return remote_experts_ ? &remote_experts_->stats() : nullptr;
  }

 private:
  Runtime() = default;
  // Decides this process's rank and world and forms the data plane (launcher-free: after the
  // registrations). Sets configured_ where the configuration is read before the data plane.
  absl::Status Connect();
  absl::Status FormAsCoordinator();
  absl::Status JoinAsWorker();
  // The data plane (data_plane_) of rank_ in world_size_, bootstrapped through `store`.
  absl::Status FormDataPlane(comm::KeyValueStore* store, const std::string& prefix,
                             const std::string& host, absl::Duration timeout);
  // The coordinator's view of its workers under this build, config and data plane.
  std::unique_ptr<Membership> NewMembership() const;
  bool OnGpu() const { return options_.device == "cuda"; }
  // Role, config and, for `world` > 1, the placement from the options.
  absl::Status Configure(int world);
  // The coordinator's engine on options_.device, over the loaded (or dummy) weights.
  absl::Status CreateEngine(ExpertExecutor* remote_experts);
  // Exchanges Hellos (carrying `configured`) and checks that all ranks agree.
  absl::Status Handshake(const absl::Status& configured);
  // The agreement every data plane starts with: Handshake, this rank's weights loaded (unless
  // they are), and every rank's report of that.
  absl::Status AgreeOnEpoch(const absl::Status& configured);
  // The placement of the current data plane (in its ranks).
  const Placement& current_placement() const {
    return epoch_placement_ != nullptr ? *epoch_placement_ : *placement_;
  }
  // Coordinator: publishes the next epoch with `members` (worker ranks, ascending, after 0) and
  // `placement` (worker ranks). FailedPrecondition when some expert has no member holding it.
  absl::Status PublishEpoch(const std::vector<int>& members, const Placement& placement);
  // Coordinator: makes `next` (worker ranks) the placement the cluster moves to.
  void SetTarget(Placement next, const std::string& why);
  // Coordinator: applies queued requests, gives joiners without experts some, and rebalances.
  void UpdateTarget();
  // Coordinator: every worker of `ranks` in the current epoch holds its target experts.
  bool TargetLoaded(const std::vector<int>& ranks) const;
  // Worker: holds the experts its placement gives it, swapping in those loaded in the
  // background when they are needed.
  absl::Status HoldEpochExperts();
  // Worker: loads the experts the coordinator asks for (ControlClient::OnTarget), one request at
  // a time, on loader_.
  void LoaderLoop();
  // Coordinator: the next data plane among the registered workers that wait for it, agreed on
  // and bound to the executor; Unavailable (also set as serving_) when it cannot serve.
  absl::Status FormNextEpoch();
  // Worker: waits for the next epoch after epoch_ and joins its data plane.
  absl::Status JoinEpoch();
  // Closes this rank's data plane (the peers' waits on it end).
  void DropDataPlane();

  RuntimeOptions options_;
  ModelConfig config_;
  int rank_ = 0;
  int world_size_ = 1;
  std::string data_plane_;
  bool launched_by_mpi_ = false;  // the ranks came from mpirun (data plane mpi, or nccl over it)
  std::optional<absl::Status> configured_;  // set when Connect() already configured
  std::unique_ptr<comm::Communicator> owned_comm_;
  comm::Communicator* comm_ = nullptr;
  // A launcher-free worker: the heartbeat thread interrupts comm_ when the coordinator left its
  // epoch (comm_epoch_), so comm_ changes (FormDataPlane, DropDataPlane) under comm_mu_.
  absl::Mutex comm_mu_;
  int64_t comm_epoch_ = 0;
  std::unique_ptr<Placement> placement_;
  // Coordinator's control plane.
  std::unique_ptr<Membership> membership_;
  std::unique_ptr<comm::KeyValueStore> store_;
  std::string store_prefix_;
  // Launcher-free: serves the membership and store above, so it is declared after them (and
  // destroyed first).
  std::unique_ptr<ApiServer> control_server_;
  // Launcher-free worker's registration and heartbeats.
  std::unique_ptr<ControlClient> control_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<DistributedExpertExecutor> remote_experts_;
  std::unique_ptr<Engine> engine_;
  bool finished_ = false;
  // Launcher-free: the current data plane's epoch, its placement (coordinator; a worker's is
  // placement_), and its members ([data-plane rank] -> worker rank).
  int64_t epoch_ = 0;
  std::unique_ptr<Placement> epoch_placement_;
  std::vector<int> members_;
  std::string data_plane_host_;  // the address this rank's data plane listens on
  int worker_rank_ = 0;          // launcher-free worker: its slot, kept across epochs
  std::unique_ptr<ExpertWorker> worker_;
  ExpertWorkerOptions worker_options_;
  std::atomic<bool> resilient_{false};  // read from gRPC threads (RequestPlacement)
  absl::Status serving_;  // coordinator: why the cluster cannot serve now (OK: it can)
  // Coordinator: the placement (worker ranks) the cluster moves to (none yet: placement_, which
  // stays as started, since the server reads it) and the one its data plane was formed from.
  const Placement& target() const { return target_ != nullptr ? *target_ : *placement_; }
  std::unique_ptr<Placement> target_;
  std::unique_ptr<Placement> active_;
  int64_t target_version_ = 0;
  int64_t rebalanced_at_step_ = 0;
  std::vector<int64_t> load_at_rebalance_;  // [expert] tokens routed, all layers
  absl::Mutex requests_mu_;
  std::vector<std::pair<std::string, std::string>> requests_ ABSL_GUARDED_BY(requests_mu_);
  // Worker: experts loaded in the background for the coordinator's next placement.
  absl::Mutex loader_mu_;
  int64_t wanted_version_ ABSL_GUARDED_BY(loader_mu_) = 0;
  int64_t loaded_version_ ABSL_GUARDED_BY(loader_mu_) = 0;
  bool stop_loader_ ABSL_GUARDED_BY(loader_mu_) = false;
  std::vector<int> wanted_ ABSL_GUARDED_BY(loader_mu_);
  std::vector<int> current_ ABSL_GUARDED_BY(loader_mu_);  // what worker_ computes
  std::vector<int> next_experts_ ABSL_GUARDED_BY(loader_mu_);
  std::unique_ptr<ModelWeights> next_weights_ ABSL_GUARDED_BY(loader_mu_);
  std::unique_ptr<ExpertWorker> next_worker_ ABSL_GUARDED_BY(loader_mu_);
  std::thread loader_;
};

}  // namespace epx

#endif  // EPX_RUNTIME_RUNTIME_H_
