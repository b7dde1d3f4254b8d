#include "worker/expert_worker.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/device_communicator.h"
#include "comm/protocol.h"
#include "common/status.h"
#include "common/stopwatch.h"
#include "kernels/cuda/runtime.h"

namespace epx {
namespace {

using Transfer = comm::DeviceCommunicator::Transfer;

// Offsets over the loaded experts from those over the data plane's: group g of the data plane
// is loaded expert slot[g]; the other loaded experts get no rows.
void ExpandOffsets(const std::vector<int64_t>& offsets, const std::vector<int>& slot,
                   std::vector<int64_t>* loaded_offsets) {
  std::vector<int64_t>& out = *loaded_offsets;
  std::fill(out.begin(), out.end(), 0);
  for (size_t g = 0; g < slot.size(); ++g) out[slot[g] + 1] = offsets[g + 1] - offsets[g];
  for (size_t i = 1; i < out.size(); ++i) out[i] += out[i - 1];
}

}  // namespace

// A forward step on the NCCL data plane: rows from the coordinator's GPU into this one's, the
// outputs back, with one wait per layer (for the counts, whose size NCCL needs on the host).
class ExpertWorker::DeviceStepLoop {
 public:
  DeviceStepLoop(comm::DeviceCommunicator* comm, ExpertCompute* compute, const ModelConfig& config,
                 absl::Duration timeout)
      : comm_(comm), compute_(compute), config_(config), timeout_(timeout) {}

  // `slot`: the loaded expert of each of this data plane's local experts.
  absl::Status Step(const comm::ExpertWire& wire, const std::vector<int>& slot, int64_t loaded) {
    cuda::StreamHandle s = compute_->stream();
    const int64_t H = config_.hidden_size, local = static_cast<int64_t>(slot.size());
    // Sized while the stream is idle (growing a staging buffer waits on the stream, which here
    // would be a wait on the coordinator without the watchdog).
    if (counts_host_.size() < static_cast<size_t>(wire.OffsetsBytes(local))) {
      EPX_ASSIGN_OR_RETURN(counts_, cuda::DeviceBuffer::Allocate(wire.OffsetsBytes(local)));
      EPX_ASSIGN_OR_RETURN(counts_host_, cuda::PinnedBuffer::Allocate(wire.OffsetsBytes(local)));
    }
    std::vector<int64_t> offsets_loaded(loaded + 1);
    for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
      const std::string what = absl::StrCat("layer ", layer);
      const Transfer in_counts{
          .is_send = false, .peer = 0, .data = counts_.data(), .bytes = wire.OffsetsBytes(local)};
      EPX_RETURN_IF_ERROR(comm_->Post({&in_counts, 1}, s, what + " counts"));
      EPX_RETURN_IF_ERROR(
          cuda::CopyToHost(counts_host_.data(), counts_.data(), wire.OffsetsBytes(local), s));
      EPX_RETURN_IF_ERROR(comm_->Synchronize(s, timeout_, {0}, what + " counts"));
      EPX_ASSIGN_OR_RETURN(const std::vector<int64_t> offsets,
                           comm::LocalOffsets({static_cast<const int32_t*>(counts_host_.data()),
                                               static_cast<size_t>(local + 1)}));
      const int64_t n = offsets.back();
      if (n == 0) continue;  // idle this layer: nothing to or from the coordinator
      ExpandOffsets(offsets, slot, &offsets_loaded);
      // The stream is idle here, so the buffers (this loop's and the compute's) may grow.
      EPX_ASSIGN_OR_RETURN(const TensorView rows, rows_.View(wire.activation(), {n, H}, s));
      EPX_ASSIGN_OR_RETURN(const TensorView out, out_.View(wire.activation(), {n, H}, s));
      EPX_RETURN_IF_ERROR(compute_->Reserve(n, loaded));
      const Transfer in_rows{.is_send = false, .peer = 0, .data = rows.raw(),
                             .bytes = wire.RowBytes(n)};
      EPX_RETURN_IF_ERROR(comm_->Post({&in_rows, 1}, s, what + " dispatch"));
      EPX_RETURN_IF_ERROR(compute_->Run(layer, rows, offsets_loaded, out));
      const Transfer out_rows{.is_send = true, .peer = 0, .data = out.raw(),
                              .bytes = wire.RowBytes(n)};
      EPX_RETURN_IF_ERROR(comm_->Post({&out_rows, 1}, s, what + " combine"));
    }
    // The next step header is a host call: the last outputs must have left first.
    return comm_->Synchronize(s, timeout_, {0}, "the step's last outputs");
  }

 private:
  comm::DeviceCommunicator* comm_;
  ExpertCompute* compute_;
  const ModelConfig& config_;
  const absl::Duration timeout_;
  cuda::DeviceBuffer counts_;       // the counts message, [local experts + 1] I32
  cuda::PinnedBuffer counts_host_;  // its copy on the host
  cuda::DeviceStaging rows_, out_;
};

ExpertWorker::ExpertWorker(const ModelWeights& weights, std::vector<int> loaded,
                           const ExpertWorkerOptions& options,
                           std::unique_ptr<ExpertCompute> compute)
    : weights_(weights),
      loaded_(std::move(loaded)),
      options_(options),
      compute_(std::move(compute)) {}

ExpertWorker::~ExpertWorker() = default;

absl::StatusOr<std::unique_ptr<ExpertWorker>> ExpertWorker::Create(
    const ModelWeights& weights, std::vector<int> loaded, const ExpertWorkerOptions& options) {
  EPX_ASSIGN_OR_RETURN(std::unique_ptr<ExpertCompute> compute,
                       NewExpertCompute(weights, loaded, options.compute));
  return std::unique_ptr<ExpertWorker>(
      new ExpertWorker(weights, std::move(loaded), options, std::move(compute)));
}

absl::StatusOr<WorkerLoopEnd> ExpertWorker::Serve(comm::Communicator* comm,
                                                  const std::vector<int>& experts) {
  const ModelConfig& c = weights_.config();
  const int world = comm->world_size();
  // slot[g]: the loaded expert that is this data plane's local expert g.
  std::vector<int> slot;
  for (int e : experts) {
    auto it = std::lower_bound(loaded_.begin(), loaded_.end(), e);
    if (it == loaded_.end() || *it != e)
      return absl::FailedPreconditionError(absl::StrCat("the placement gives this worker expert ",
                                                        e, ", which it has not loaded (it holds ",
                                                        absl::StrJoin(loaded_, ","), ")"));
    slot.push_back(static_cast<int>(it - loaded_.begin()));
  }
  const int64_t loaded = static_cast<int64_t>(loaded_.size());
  const bool on_device = compute_->memory() == MemoryKind::kDevice;
  std::vector<int64_t> counts(experts.size()), offsets(experts.size() + 1, 0),
      offsets_loaded(loaded + 1, 0);
  std::vector<int64_t> count_bytes(world, 0), row_bytes(world, 0), back_bytes(world, 0),
      none(world, 0);
  std::vector<float> rows, out;  // the payloads of the host data plane
  cuda::DeviceStaging device_rows, device_out;  // a GPU compute's rows in and out
  // The NCCL data plane carries device rows straight to a GPU compute.
  comm::DeviceCommunicator* device_comm = comm->device();
  if (device_comm != nullptr && !on_device)
    return absl::FailedPreconditionError(
        "the NCCL data plane delivers rows to this worker's GPU: start it with --device cuda");
  if (device_comm != nullptr)
    device_loop_ =
        std::make_unique<DeviceStepLoop>(device_comm, compute_.get(), c, options_.timeout);

  while (true) {
    comm::StepHeader header;
    EPX_RETURN_IF_ERROR(comm->Broadcast(&header, sizeof(header), 0, comm::Tag::kStepHeader,
                                        options_.timeout, "waiting for the next step"));
    if (header.kind == comm::StepKind::kShutdown) return WorkerLoopEnd::kShutdown;
    if (header.kind == comm::StepKind::kReform) return WorkerLoopEnd::kReform;
    if (header.kind != comm::StepKind::kForward)
      return absl::InternalError(absl::StrCat("unknown step kind ", static_cast<int>(header.kind)));
    EPX_ASSIGN_OR_RETURN(const comm::ExpertWire wire,
                         comm::ExpertWire::Create(c.hidden_size, header.activation));
    if (device_comm != nullptr) {
      EPX_RETURN_IF_ERROR(device_loop_->Step(wire, slot, loaded));
      continue;
    }
    count_bytes[0] = wire.CountBytes(static_cast<int64_t>(experts.size()));
    for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      EPX_RETURN_IF_ERROR(comm->AllToAllV(nullptr, none, counts.data(), count_bytes,
                                          comm::Tag::kCounts, options_.timeout,
                                          absl::StrCat("layer ", layer, " counts")));
      for (size_t i = 0; i < counts.size(); ++i) offsets[i + 1] = offsets[i] + counts[i];
      ExpandOffsets(offsets, slot, &offsets_loaded);
      const int64_t n = offsets.back();
      row_bytes[0] = wire.RowBytes(n);
      comm::GrowPayload(&rows, row_bytes[0]);
      EPX_RETURN_IF_ERROR(comm->AllToAllV(nullptr, none, rows.data(), row_bytes,
                                          comm::Tag::kDispatch, options_.timeout,
                                          absl::StrCat("layer ", layer, " dispatch")));
      const Stopwatch watch;
      back_bytes[0] = wire.CombineBytes(n);
      comm::GrowPayload(&out, back_bytes[0]);
      // A host compute writes straight into the combine payload; a GPU's rows cross to its
      // memory and back.
      const TensorView rows_in = wire.Rows(rows.data(), n), rows_out = wire.Rows(out.data(), n);
      if (on_device) {
        EPX_ASSIGN_OR_RETURN(const TensorView in, device_rows.Upload(rows_in, compute_->stream()));
        EPX_ASSIGN_OR_RETURN(
            const TensorView result,
            device_out.View(wire.activation(), {n, c.hidden_size}, compute_->stream()));
        EPX_RETURN_IF_ERROR(compute_->Run(layer, in, offsets_loaded, result));
        EPX_RETURN_IF_ERROR(
            cuda::CopyToHost(rows_out.raw(), result.raw(), result.nbytes(), compute_->stream()));
        EPX_RETURN_IF_ERROR(cuda::SynchronizeStream(compute_->stream()));
      } else {
        EPX_RETURN_IF_ERROR(compute_->Run(layer, rows_in, offsets_loaded, rows_out));
      }
      wire.SetComputeMicros(out.data(), n, watch.Micros());
      EPX_RETURN_IF_ERROR(comm->AllToAllV(out.data(), back_bytes, nullptr, none,
                                          comm::Tag::kCombine, options_.timeout,
                                          absl::StrCat("layer ", layer, " combine")));
    }
  }
}

absl::Status RunExpertWorker(comm::Communicator* comm, const ModelWeights& weights,
                             const Placement& placement, const ExpertWorkerOptions& options) {
  const std::vector<int>& experts = placement.experts_of(comm->rank());
  EPX_ASSIGN_OR_RETURN(std::unique_ptr<ExpertWorker> worker,
                       ExpertWorker::Create(weights, experts, options));
  EPX_ASSIGN_OR_RETURN(const WorkerLoopEnd end, worker->Serve(comm, experts));
  if (end == WorkerLoopEnd::kReform)
    return absl::FailedPreconditionError(
        "the coordinator re-formed the data plane, which only a launcher-free worker can follow");
  return absl::OkStatus();
}

}  // namespace epx
