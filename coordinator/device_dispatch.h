// The coordinator's per-layer exchange on the NCCL data plane (comm/protocol.h): the routed
// rows stay on the GPU from the router to the workers and back. On the step's stream: each slot
// gets its (worker, local expert) group (cuda::AssignGroups), the slots are sorted by group
// (cuda::ExpertPermutation) and the rows gathered in that order (cuda::PermuteRows); the group
// offsets come to the host (the one synchronisation of the layer: NCCL takes the sizes of its
// transfers on the host); then each worker is sent its slice of the offsets and its rows, and
// the outputs are received into the same order, which the combine reads through row_of_slot.
//
// A build without CUDA links device_dispatch_unavailable.cc (FailedPrecondition).
#ifndef EPX_COORDINATOR_DEVICE_DISPATCH_H_
#define EPX_COORDINATOR_DEVICE_DISPATCH_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/device_communicator.h"
#include "comm/protocol.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "coordinator/expert_executor.h"

namespace epx {

struct ExpertParallelStats;  // coordinator/distributed_expert_executor.h

class DeviceDispatch {
 public:
  virtual ~DeviceDispatch() = default;
  // One layer of step `step`: batch.x BF16 rows on the device, batch.stream the step's stream.
  // The last layer waits for its outputs (under the watchdog), so that the step's own final
  // synchronisation never waits on a peer. members: the worker rank of each data-plane rank
  // (stats count rows by worker rank).
  virtual absl::StatusOr<ExpertOutput> Run(int layer, int64_t step, const ExpertBatch& batch,
                                           const std::vector<int>& members,
                                           ExpertParallelStats& stats) = 0;
};

// group_base: [world + 1], worker w's groups [group_base[w], group_base[w + 1]).
absl::StatusOr<std::unique_ptr<DeviceDispatch>> NewDeviceDispatch(const ModelConfig& config,
                                                                  const Placement& placement,
                                                                  std::vector<int64_t> group_base,
                                                                  comm::DeviceCommunicator* comm,
                                                                  absl::Duration timeout);

}  // namespace epx

#endif  // EPX_COORDINATOR_DEVICE_DISPATCH_H_
