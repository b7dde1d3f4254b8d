#include "worker/expert_worker.h"

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/protocol.h"
#include "common/status.h"
#include "common/stopwatch.h"
#include "kernels/cuda/runtime.h"

namespace epx {

absl::Status RunExpertWorker(comm::Communicator* comm, const ModelWeights& weights,
                             const Placement& placement, const ExpertWorkerOptions& options) {
  const ModelConfig& c = weights.config();
  const int rank = comm->rank(), world = comm->world_size();
  const std::vector<int>& local = placement.experts_of(rank);
  EPX_ASSIGN_OR_RETURN(std::unique_ptr<ExpertCompute> compute,
                       NewExpertCompute(weights, local, options.compute));
  const bool on_device = compute->memory() == MemoryKind::kDevice;
  std::vector<int64_t> counts(local.size()), offsets(local.size() + 1, 0);
  std::vector<int64_t> count_bytes(world, 0), row_bytes(world, 0), back_bytes(world, 0),
      none(world, 0);
  std::vector<float> rows, out;  // the payloads of the host data plane
  cuda::DeviceStaging device_rows, device_out;  // a GPU compute's rows in and out

  while (true) {
    comm::StepHeader header;
    EPX_RETURN_IF_ERROR(comm->Broadcast(&header, sizeof(header), 0, comm::Tag::kStepHeader,
                                        options.timeout, "waiting for the next step"));
    if (header.kind == comm::StepKind::kShutdown) return absl::OkStatus();
    if (header.kind != comm::StepKind::kForward)
      return absl::InternalError(absl::StrCat("unknown step kind ", static_cast<int>(header.kind)));
    EPX_ASSIGN_OR_RETURN(const comm::ExpertWire wire,
                         comm::ExpertWire::Create(c.hidden_size, header.activation));
    count_bytes[0] = wire.CountBytes(static_cast<int64_t>(local.size()));
    for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      EPX_RETURN_IF_ERROR(comm->AllToAllV(nullptr, none, counts.data(), count_bytes,
                                          comm::Tag::kCounts, options.timeout,
                                          absl::StrCat("layer ", layer, " counts")));
      for (size_t i = 0; i < counts.size(); ++i) offsets[i + 1] = offsets[i] + counts[i];
      const int64_t n = offsets.back();
      row_bytes[0] = wire.RowBytes(n);
      comm::GrowPayload(&rows, row_bytes[0]);
      EPX_RETURN_IF_ERROR(comm->AllToAllV(nullptr, none, rows.data(), row_bytes,
                                          comm::Tag::kDispatch, options.timeout,
                                          absl::StrCat("layer ", layer, " dispatch")));
      const Stopwatch watch;
      back_bytes[0] = wire.CombineBytes(n);
      comm::GrowPayload(&out, back_bytes[0]);
      // A host compute writes straight into the combine payload; a GPU's rows cross to its
      // memory and back.
      const TensorView rows_in = wire.Rows(rows.data(), n), rows_out = wire.Rows(out.data(), n);
      if (on_device) {
        EPX_ASSIGN_OR_RETURN(const TensorView in, device_rows.Upload(rows_in, compute->stream()));
        EPX_ASSIGN_OR_RETURN(const TensorView result,
                             device_out.View(wire.activation(), {n, c.hidden_size},
                                             compute->stream()));
        EPX_RETURN_IF_ERROR(compute->Run(layer, in, offsets, result));
        EPX_RETURN_IF_ERROR(cuda::CopyToHost(rows_out.raw(), result.raw(), result.nbytes(),
                                             compute->stream()));
        EPX_RETURN_IF_ERROR(cuda::SynchronizeStream(compute->stream()));
      } else {
        EPX_RETURN_IF_ERROR(compute->Run(layer, rows_in, offsets, rows_out));
      }
      wire.SetComputeMicros(out.data(), n, watch.Micros());
      EPX_RETURN_IF_ERROR(comm->AllToAllV(out.data(), back_bytes, nullptr, none,
                                          comm::Tag::kCombine, options.timeout,
                                          absl::StrCat("layer ", layer, " combine")));
    }
  }
}

}  // namespace epx
