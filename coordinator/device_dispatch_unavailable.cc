// NewDeviceDispatch for builds without CUDA.
#include "coordinator/device_dispatch.h"

namespace epx {

absl::StatusOr<std::unique_ptr<DeviceDispatch>> NewDeviceDispatch(const ModelConfig&,
                                                                  const Placement&,
                                                                  std::vector<int64_t>,
                                                                  comm::DeviceCommunicator*,
                                                                  absl::Duration) {
  return absl::FailedPreconditionError(
      "device rows on the data plane need the CUDA backend, and this epx was built without CUDA");
}

}  // namespace epx
