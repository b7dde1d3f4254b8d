// The wire format between the coordinator and the expert workers, on top of a Communicator.
//
// Start-up, two AllGathers that every rank reaches even when its own set-up failed, so that all
// ranks stop together with the same message naming the rank at fault:
//   kHandshake: a Hello (build, config, placement, role, and whether its set-up so far worked);
//   kReady:     a StartupReport after loading the weights.
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

// Whether a rank's set-up step worked, and if not why.
struct StartupReport {
  int32_t code = 0;      // absl::StatusCode
  char error[252] = {};  // the message, NUL-padded, truncated
};

struct Hello {
  StartupReport setup;          // config and placement parsed?
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

StartupReport MakeReport(const absl::Status& status);
// The first failed rank's error (its status code; the message names the rank and the stage).
absl::Status VerifyReports(const std::vector<StartupReport>& reports, const std::string& stage);

enum class StepKind : int32_t { kForward = 1, kShutdown = 2 };

struct StepHeader {
  StepKind kind = StepKind::kForward;
  int32_t reserved = 0;
  int64_t step = 0;
};

}  // namespace epx::comm

#endif  // EPX_COMM_PROTOCOL_H_
