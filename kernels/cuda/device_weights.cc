#include "kernels/cuda/device_weights.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/dummy_weights.h"
#include "common/status.h"

namespace epx {
namespace {

// Where one block of rows of a device tensor comes from: a host tensor of the checkpoint (any
// float dtype), or the dummy generator under the tensor's Hugging Face name.
struct Source {
  TensorView host;   // empty for dummy
  std::string name;  // for messages and dummy seeds
  DummyFill fill;
  int64_t rows = 0;  // rows of the device tensor it fills
};

}  // namespace

class DeviceModelWeights::Builder {
 public:
  Builder(DeviceModelWeights* w, const ModelWeights* host, cuda::StreamHandle stream)
      : w_(w), host_(host), stream_(stream) {}

  absl::Status Build() {
    const ModelConfig& c = w_->config_;
    const DeviceWeightOptions& o = w_->options_;
    if (o.expert_dtype != DType::kBF16 && o.expert_dtype != DType::kF8E4M3)
      return absl::InvalidArgumentError(absl::StrCat(
          "expert weights on the GPU are BF16 or F8_E4M3, not ", DTypeName(o.expert_dtype)));
    const int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_local_experts;
    const int64_t Q = c.q_size(), KV = c.kv_size();
    w_->layers_.resize(c.num_hidden_layers);
    if (o.non_expert) {
      EPX_ASSIGN_OR_RETURN(w_->embed_tokens_,
                           Matrix({Src(host_ ? host_->embed_tokens() : TensorView(),
                                       "model.embed_tokens.weight", DummyFill::Matrix(1),
                                       c.vocab_size)},
                                  H));
      EPX_ASSIGN_OR_RETURN(w_->final_norm_,
                           Vector(host_ ? host_->final_norm().view() : TensorView(),
                                  "model.norm.weight", H));
      EPX_ASSIGN_OR_RETURN(w_->lm_head_,
                           Matrix({Src(host_ ? host_->lm_head() : TensorView(), "lm_head.weight",
                                       DummyFill::Matrix(H), c.vocab_size)},
                                  H));
    }
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const LayerWeights* hl = host_ ? &host_->layer(static_cast<int>(l)) : nullptr;
      DeviceLayerWeights& dl = w_->layers_[l];
      const std::string p = absl::StrCat("model.layers.", l, ".");
      auto view = [&](TensorView LayerWeights::*m) { return hl ? hl->*m : TensorView(); };
      if (o.non_expert) {
        EPX_ASSIGN_OR_RETURN(dl.input_norm, Vector(hl ? hl->input_norm.view() : TensorView(),
                                                   p + "input_layernorm.weight", H));
        EPX_ASSIGN_OR_RETURN(dl.post_attention_norm,
                             Vector(hl ? hl->post_attention_norm.view() : TensorView(),
                                    p + "post_attention_layernorm.weight", H));
        EPX_ASSIGN_OR_RETURN(
            dl.qkv_proj,
            Matrix({Src(view(&LayerWeights::q_proj), p + "self_attn.q_proj.weight",
                        DummyFill::Matrix(H), Q),
                    Src(view(&LayerWeights::k_proj), p + "self_attn.k_proj.weight",
                        DummyFill::Matrix(H), KV),
                    Src(view(&LayerWeights::v_proj), p + "self_attn.v_proj.weight",
                        DummyFill::Matrix(H), KV)},
                   H));
        EPX_ASSIGN_OR_RETURN(dl.o_proj, Matrix({Src(view(&LayerWeights::o_proj),
                                                    p + "self_attn.o_proj.weight",
                                                    DummyFill::Matrix(Q), H)},
                                               Q));
        EPX_ASSIGN_OR_RETURN(dl.gate, Matrix({Src(view(&LayerWeights::gate),
                                                  p + "block_sparse_moe.gate.weight",
                                                  DummyFill::Matrix(H), E)},
                                             H));
      }
      dl.experts.resize(E);
      for (int e : o.experts) {
        if (e < 0 || e >= E)
          return absl::InvalidArgumentError(
              absl::StrCat("expert ", e, " is outside [0, ", E, ")"));
        const ExpertWeights* he = hl ? &hl->experts[e] : nullptr;
        if (he != nullptr && !he->loaded())
          return absl::FailedPreconditionError(absl::StrCat(
              "expert ", e, " of layer ", l, " is not in the host weights to upload"));
        const std::string pe = absl::StrCat(p, "block_sparse_moe.experts.", e, ".");
        EPX_ASSIGN_OR_RETURN(
            dl.experts[e],
            Expert(Src(he ? he->w1 : TensorView(), pe + "w1.weight", DummyFill::Matrix(H), I),
                   Src(he ? he->w3 : TensorView(), pe + "w3.weight", DummyFill::Matrix(H), I),
                   Src(he ? he->w2 : TensorView(), pe + "w2.weight", DummyFill::Matrix(I), H), H,
                   I));
      }
    }
    return cuda::SynchronizeStream(stream_);
  }

 private:
  static Source Src(const TensorView& host, std::string name, DummyFill fill, int64_t rows) {
    return {host, std::move(name), fill, rows};
  }

  absl::StatusOr<TensorView> Alloc(DType dtype, Shape shape, const std::string& what) {
    const size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
    auto buffer = cuda::DeviceBuffer::Allocate(bytes);
    if (!buffer.ok())
      return absl::Status(buffer.status().code(),
                          absl::StrCat("uploading ", what, " after ", w_->bytes_ >> 20,
                                       " MiB of weights: ", buffer.status().message()));
    w_->bytes_ += static_cast<int64_t>(bytes);
    w_->buffers_.push_back(std::move(*buffer));
    return w_->buffers_.back().view(dtype, std::move(shape));
  }

  // Writes `src` (rows x cols) into `dst` (BF16 or F32, same element count).
  absl::Status Fill(const Source& src, const TensorView& dst) {
    if (src.host.empty()) {
      if (host_ != nullptr)
        return absl::FailedPreconditionError(
            absl::StrCat(src.name, " is not in the host weights to upload"));
      return cuda::FillDummy(dst, DummyTensorSeed(w_->options_.dummy_seed, src.name),
                             src.fill.scale, src.fill.offset, stream_);
    }
    if (src.host.numel() != dst.numel())
      return absl::InvalidArgumentError(absl::StrCat(src.name, ": host shape ",
                                                     ShapeString(src.host.shape()),
                                                     " does not match the device tensor ",
                                                     ShapeString(dst.shape())));
    // Raw bytes go up first and are converted on the device: the host never widens a tensor.
    // The previous staging buffer may still be read by a queued conversion (GrowBuffer waits).
    EPX_RETURN_IF_ERROR(cuda::GrowBuffer(staging_, src.host.nbytes(), stream_));
    EPX_RETURN_IF_ERROR(
        cuda::CopyToDevice(staging_.data(), src.host.raw(), src.host.nbytes(), stream_));
    return cuda::Convert(staging_.view(src.host.dtype(), dst.shape()), dst, stream_);
  }

  // A BF16 matrix [rows, cols] stacked from `parts` (their rows in order).
  absl::StatusOr<TensorView> Matrix(const std::vector<Source>& parts, int64_t cols) {
    int64_t rows = 0;
    for (const Source& part : parts) rows += part.rows;
    EPX_ASSIGN_OR_RETURN(TensorView m, Alloc(DType::kBF16, {rows, cols}, parts[0].name));
    int64_t row = 0;
    for (const Source& part : parts) {
      EPX_RETURN_IF_ERROR(Fill(part, m.Slice(row, row + part.rows)));
      row += part.rows;
    }
    return m;
  }

  absl::StatusOr<TensorView> Vector(const TensorView& host, const std::string& name, int64_t n) {
    EPX_ASSIGN_OR_RETURN(TensorView v, Alloc(DType::kF32, {n}, name));
    EPX_RETURN_IF_ERROR(Fill({host, name, DummyFill::Ones(), n}, v));
    return v;
  }

  // One expert: w13 = [w1; w3] and w2, in the options' expert dtype.
  absl::StatusOr<cuda::DeviceExpert> Expert(const Source& w1, const Source& w3, const Source& w2,
                                            int64_t hidden, int64_t intermediate) {
    cuda::DeviceExpert e;
    if (w_->options_.expert_dtype == DType::kBF16) {
      EPX_ASSIGN_OR_RETURN(e.w13, Alloc(DType::kBF16, {2 * intermediate, hidden}, w1.name));
      EPX_RETURN_IF_ERROR(Fill(w1, e.w13.Slice(0, intermediate)));
      EPX_RETURN_IF_ERROR(Fill(w3, e.w13.Slice(intermediate, 2 * intermediate)));
      EPX_ASSIGN_OR_RETURN(e.w2, Alloc(DType::kBF16, {hidden, intermediate}, w2.name));
      EPX_RETURN_IF_ERROR(Fill(w2, e.w2));
      return e;
    }
    // FP8: each part goes through a BF16 temporary and is quantised row by row, which is what
    // the host oracle (QuantizeFp8RowWise) does to the same BF16 values.
    EPX_ASSIGN_OR_RETURN(e.w13, Alloc(DType::kF8E4M3, {2 * intermediate, hidden}, w1.name));
    EPX_ASSIGN_OR_RETURN(e.w13_scale, Alloc(DType::kF32, {2 * intermediate}, w1.name));
    EPX_ASSIGN_OR_RETURN(e.w2, Alloc(DType::kF8E4M3, {hidden, intermediate}, w2.name));
    EPX_ASSIGN_OR_RETURN(e.w2_scale, Alloc(DType::kF32, {hidden}, w2.name));
    EPX_RETURN_IF_ERROR(Quantised(w1, e.w13.Slice(0, intermediate),
                                  e.w13_scale.Slice(0, intermediate)));
    EPX_RETURN_IF_ERROR(Quantised(w3, e.w13.Slice(intermediate, 2 * intermediate),
                                  e.w13_scale.Slice(intermediate, 2 * intermediate)));
    EPX_RETURN_IF_ERROR(Quantised(w2, e.w2, e.w2_scale));
    return e;
  }

  absl::Status Quantised(const Source& src, const TensorView& q, const TensorView& scale) {
    EPX_RETURN_IF_ERROR(
        cuda::GrowBuffer(bf16_temp_, static_cast<size_t>(q.numel()) * 2, stream_));
    const TensorView temp = bf16_temp_.view(DType::kBF16, q.shape());
    EPX_RETURN_IF_ERROR(Fill(src, temp));
    return cuda::QuantizeFp8RowWise(temp, q, scale, stream_);
  }

  DeviceModelWeights* w_;
  const ModelWeights* host_;
  cuda::StreamHandle stream_;
  cuda::DeviceBuffer staging_;
  cuda::DeviceBuffer bf16_temp_;
};

absl::StatusOr<std::unique_ptr<DeviceModelWeights>> DeviceModelWeights::Upload(
    const ModelWeights& host, const DeviceWeightOptions& options, cuda::StreamHandle stream) {
  if (options.non_expert && !host.selection().non_expert)
    return absl::FailedPreconditionError(
        "the non-expert tensors are not in the host weights to upload");
  auto w = std::unique_ptr<DeviceModelWeights>(new DeviceModelWeights());
  w->config_ = host.config();
  w->options_ = options;
  EPX_RETURN_IF_ERROR(Builder(w.get(), &host, stream).Build());
  return w;
}

absl::StatusOr<std::unique_ptr<DeviceModelWeights>> DeviceModelWeights::Dummy(
    const ModelConfig& config, const DeviceWeightOptions& options, cuda::StreamHandle stream) {
  auto w = std::unique_ptr<DeviceModelWeights>(new DeviceModelWeights());
  w->config_ = config;
  w->options_ = options;
  EPX_RETURN_IF_ERROR(Builder(w.get(), nullptr, stream).Build());
  return w;
}

}  // namespace epx
