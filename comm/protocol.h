// The wire format between the coordinator and the expert workers, on top of a Communicator.
//
// Start-up, two AllGathers that every rank reaches even when its own set-up failed, so that all
// ranks stop together with the same message naming the rank at fault:
//   kHandshake: a Hello (build, config, placement, role, and whether its set-up so far worked);
//   kReady:     a StartupReport after loading the weights.
//
// Each engine step: rank 0 broadcasts a StepHeader, which names the rows' dtype (the
// coordinator's activations: F32 on the CPU, BF16 on a GPU). For kForward, every layer then runs
//   counts   (kCounts)   coordinator -> worker w: int64 rows per local expert of w
//   dispatch (kDispatch) coordinator -> worker w: those rows [rows, hidden], grouped by local
//                         expert in ascending expert order
//   combine  (kCombine)  worker w -> coordinator: the expert outputs in the same order and dtype,
//                         then one double: the worker's expert compute time in microseconds
// Workers exchange nothing among themselves (zero counts). kShutdown ends the worker loop;
// kReform ends this data plane (the control plane hands out the next, docs/ARCHITECTURE.md,
// "Losing and gaining workers").
//
// On the NCCL data plane (device rows, comm/device_communicator.h) a layer is three groups of
// transfers on the step's stream: the counts are worker w's slice of the coordinator's group
// offsets (local experts + 1 int32, rows counted in the coordinator's send order; LocalOffsets
// turns them into the worker's), then the rows, then the outputs back without a compute time.
// ExpertWire is the one place both sides take these sizes and layouts from.
#ifndef EPX_COMM_PROTOCOL_H_
#define EPX_COMM_PROTOCOL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/tensor.h"

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

// kReform: the coordinator re-forms the data plane (a worker joins or leaves); the workers
// leave this one and ask the control plane for the next.
enum class StepKind : int32_t { kForward = 1, kShutdown = 2, kReform = 3 };

struct StepHeader {
  StepKind kind = StepKind::kForward;
  DType activation = DType::kF32;  // the rows' dtype this step
  uint8_t reserved[3] = {};
  int64_t step = 0;
};

// Where each worker's rows sit in the coordinator's send order, from the offsets of the
// (worker, local expert) groups: worker w's groups are [group_base[w], group_base[w + 1]) and its
// rows [first[w], first[w] + rows[w]). Rank 0 (the coordinator) has no groups.
struct DispatchPlan {
  std::vector<int64_t> first;  // [rank]
  std::vector<int64_t> rows;   // [rank]
};
DispatchPlan PlanDispatch(absl::Span<const int64_t> group_base,
                          absl::Span<const int64_t> group_offsets);

// A worker's offsets [local experts + 1], starting at 0, from its slice of the coordinator's
// group offsets (the NCCL counts message). Internal for a slice that decreases or is negative.
absl::StatusOr<std::vector<int64_t>> LocalOffsets(absl::Span<const int32_t> slice);

// Room for `bytes` of payload in a float vector (F32 or BF16 rows, kept float-aligned).
void GrowPayload(std::vector<float>* payload, int64_t bytes);

// The per-layer payloads between the coordinator and one worker.
class ExpertWire {
 public:
  // InvalidArgument unless `activation` is F32 or BF16.
  static absl::StatusOr<ExpertWire> Create(int64_t hidden, DType activation);

  DType activation() const { return activation_; }
  int64_t CountBytes(int64_t local_experts) const {
    return local_experts * static_cast<int64_t>(sizeof(int64_t));
  }
  // The NCCL counts message: the worker's slice of the group offsets.
  int64_t OffsetsBytes(int64_t local_experts) const {
    return (local_experts + 1) * static_cast<int64_t>(sizeof(int32_t));
  }
  int64_t RowBytes(int64_t rows) const { return rows * row_bytes_; }
  // The outputs, then the worker's compute time.
  int64_t CombineBytes(int64_t rows) const {
    return RowBytes(rows) + static_cast<int64_t>(sizeof(double));
  }
  // Views of `rows` rows at `payload` (dispatch or combine layout).
  TensorView Rows(const void* payload, int64_t rows) const {
    return TensorView(payload, activation_, {rows, hidden_});
  }
  void SetComputeMicros(void* combine_payload, int64_t rows, double us) const;
  double ComputeMicros(const void* combine_payload, int64_t rows) const;

 private:
  ExpertWire(int64_t hidden, DType activation)
      : hidden_(hidden), activation_(activation),
        row_bytes_(hidden * static_cast<int64_t>(DTypeSize(activation))) {}
  int64_t hidden_;
  DType activation_;
  int64_t row_bytes_;
};

}  // namespace epx::comm

#endif  // EPX_COMM_PROTOCOL_H_
