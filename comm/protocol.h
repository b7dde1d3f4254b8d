// The wire format between the coordinator and the expert workers, on top of a Communicator.
//
// Start-up: every rank contributes a Hello to an AllGather; each rank checks them all the same
// way (Verify), so a mismatch stops every rank with the same message naming the offending rank.
//
// Each engine step: rank 0 broadcasts a StepHeader. For kForward, every layer then runs
//   counts   (kCounts)   coordinator -> worker w: int64 rows per local expert of w
//   dispatch (kDispatch) coordinator -> worker w: those rows, fp32 [rows, hidden], grouped by
//                         local expert in ascending expert order
//   combine  (kCombine)  worker w -> coordinator: the expert outputs in the same order, then one
//                         double: the worker's expert compute time in microseconds
// Workers exchange nothing among themselves (zero counts). kShutdown ends the worker loop.
#ifndef EPX_COMM_PROTOCOL_H_
#define EPX_COMM_PROTOCOL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace epx::comm {

enum class Role : int32_t { kCoordinator = 0, kWorker = 1 };

struct Hello {
  char build[64] = {};          // BuildId(), NUL-padded
  uint64_t config_hash = 0;     // ModelConfig::Hash()
  uint64_t placement_hash = 0;  // hash of Placement::ToString()
  int32_t rank = 0;
  Role role = Role::kWorker;
  int32_t world_size = 0;
  int32_t reserved = 0;
};

// Checks that rank 0 is the coordinator, every other rank a worker, and that all agree on the
// build, the config and the placement. FailedPrecondition naming the first offending rank.
absl::Status VerifyHellos(const std::vector<Hello>& hellos);

enum class StepKind : int32_t { kForward = 1, kShutdown = 2 };

struct StepHeader {
  StepKind kind = StepKind::kForward;
  int32_t reserved = 0;
  int64_t step = 0;
};

}  // namespace epx::comm

#endif  // EPX_COMM_PROTOCOL_H_
