// The coordinator's side of expert parallelism: an ExpertExecutor that sends each layer's routed
// rows to the workers holding their experts (comm/protocol.h) and brings the outputs back in
// slot order. Rows of a replicated expert are dealt to its replicas in turn (row i of the
// expert's group to replica i mod R), which changes nothing in the results: every row is
// computed the same way wherever it goes.
//
// The rows travel in the coordinator's activation dtype (F32 from the CPU backend, BF16 from a
// GPU's), named in every step header. On a host data plane (MPI, gloo) a GPU's rows are staged
// through the host by NewHostStagedExpertExecutor; on NCCL (UseDeviceExchange) they stay on the
// device (coordinator/device_dispatch.h) and memory() is the device.
//
// Used from the engine's thread only. Every call blocks; a worker that does not answer within
// the timeout turns into DeadlineExceeded naming it and the layer.
#ifndef EPX_COORDINATOR_DISTRIBUTED_EXPERT_EXECUTOR_H_
#define EPX_COORDINATOR_DISTRIBUTED_EXPERT_EXECUTOR_H_

#include <memory>
#include <vector>

#include "absl/time/time.h"
#include "comm/communicator.h"
#include "comm/protocol.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "coordinator/device_dispatch.h"
#include "coordinator/expert_executor.h"

namespace epx {

// Per-layer totals since creation (or the last ResetStats()).
struct ExpertParallelStats {
  std::vector<double> dispatch_us;     // [layer] counts + rows out, coordinator's wall time
  std::vector<double> expert_us;       // [layer] slowest worker's compute time, summed over steps
  std::vector<double> combine_us;      // [layer] rows back, minus the slowest worker's compute
  std::vector<int64_t> worker_tokens;  // [worker rank] rows received, all layers
};

class DistributedExpertExecutor : public ExpertExecutor {
 public:
  // REQUIRES: comm->rank() == 0; placement.num_workers() == comm->world_size() - 1;
  // activation is F32 or BF16.
  DistributedExpertExecutor(const ModelConfig& config, const Placement& placement,
                            comm::Communicator* comm, absl::Duration timeout,
                            DType activation = DType::kF32);

  // Sends the rows of every layer from device memory over `comm` (the data plane's device
  // exchanges; the activation must be BF16). FailedPrecondition without CUDA.
  absl::Status UseDeviceExchange(comm::DeviceCommunicator* comm);
  MemoryKind memory() const override {
    return device_ != nullptr ? MemoryKind::kDevice : MemoryKind::kHost;
  }

  // Broadcasts the step header that precedes the layers of one engine step. The engine's
  // Step() calls Run() once per layer after this.
  absl::Status BeginStep() override;
  // batch.x: the activation dtype, in memory(). Returns slot order (host), or the device rows
  // with row_of_slot.
  absl::StatusOr<ExpertOutput> Run(int layer, const ExpertBatch& batch) override;
  // Tells every worker to leave its loop. Idempotent.
  absl::Status Shutdown();
  // Tells every worker that the data plane is re-formed: they leave this one and ask the
  // control plane for the next (the cluster changes between two steps).
  absl::Status Reform();
  // From the next step on, the rows go over `comm` with `placement` (in its ranks), whose rank
  // i is worker members[i] (members[0] = 0): the data plane re-formed around a lost or a new
  // worker. Clears a step cut short. Host data planes only (FailedPrecondition on NCCL).
  absl::Status Rebind(comm::Communicator* comm, const Placement& placement,
                      std::vector<int> members);

  const ExpertParallelStats& stats() const { return stats_; }
  // True between BeginStep() and the last layer's Run(): the workers are inside a step, and a
  // failure now leaves them where only aborting the job reaches them.
  bool in_step() const { return layers_done_ < config_.num_hidden_layers; }

 private:
  // group_base_ and count_bytes_ for comm_ and placement_.
  void Layout();

  const ModelConfig config_;
  Placement placement_;
  std::vector<int> members_;  // [data-plane rank] -> worker rank
  comm::Communicator* comm_;
  const absl::Duration timeout_;
  const comm::ExpertWire wire_;
  int64_t step_ = 0;
  int64_t layers_done_ = 0;  // in the current step
  bool shut_down_ = false;
  ExpertParallelStats stats_;
  std::unique_ptr<DeviceDispatch> device_;  // the NCCL data plane's layers
  std::vector<int64_t> group_base_;   // [rank + 1]: first (worker, local expert) group of a rank
  std::vector<int64_t> count_bytes_;  // [rank]: bytes of a worker's counts
  // Scratch kept between layers.
  std::vector<int64_t> group_offsets_;  // [group + 1]: rows of each group in send order
  std::vector<int64_t> order_;          // send-buffer row -> slot
  // Payloads (float vectors for alignment; they hold F32 or BF16 rows).
  std::vector<float> send_;
  std::vector<float> recv_;
  std::vector<float> slot_out_;
};

}  // namespace epx

#endif  // EPX_COORDINATOR_DISTRIBUTED_EXPERT_EXECUTOR_H_
