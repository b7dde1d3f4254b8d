// The CUDA backend. One stream carries a whole step: the host packs the step's metadata (token
// ids, RoPE table, KV rows, sequence ranges, block tables, logit rows) into one pinned buffer and
// sends it in one copy; every layer then runs without the host, except where the cuBLAS grouped
// GEMM needs the per-expert row counts (large steps; one small copy and sync per layer) or the
// experts live behind a host data plane. Logits come back in one copy at the end.
//
// The experts are always an ExpertExecutor in device memory, handed the layer's BF16 rows on the
// step's stream: CudaLocalExperts (this GPU), a device-memory executor given by the caller, or
// a host one (MPI or gloo workers) behind NewHostStagedExpertExecutor.
#include "coordinator/cuda_forward.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/device_weights.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"

namespace epx {
namespace {

// Carves one allocation into aligned pieces: first a sizing pass (Add), then the same sequence
// of Add calls against a base pointer gives each piece its address.
class Layout {
 public:
  explicit Layout(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  TensorView Add(DType dtype, Shape shape) {
    const size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
    const size_t at = size_;
    size_ = (size_ + bytes + 255) & ~size_t{255};
    return TensorView(base_ == nullptr ? nullptr : base_ + at, dtype, std::move(shape));
  }
  size_t size() const { return size_; }

 private:
  char* base_;
  size_t size_ = 0;
};

// The experts on this GPU: permute the rows by expert, one grouped SwiGLU over the device
// weights, and leave the outputs in permuted order with row_of_slot for the combine.
class CudaLocalExperts final : public ExpertExecutor {
 public:
  CudaLocalExperts(const ModelConfig& config, const DeviceModelWeights* weights,
                   cuda::Blas* blas, cuda::GroupedGemmImpl impl)
      : config_(config), weights_(weights), blas_(blas), impl_(impl) {}

  absl::Status Init() {
    EPX_ASSIGN_OR_RETURN(offsets_host_,
                         cuda::PinnedBuffer::Allocate(config_.num_hidden_layers *
                                                      (config_.num_local_experts + 1) * 4));
    return absl::OkStatus();
  }

  MemoryKind memory() const override { return MemoryKind::kDevice; }

  absl::StatusOr<ExpertOutput> Run(int layer, const ExpertBatch& batch) override {
    const int64_t T = batch.x.dim(0), K = config_.num_experts_per_tok;
    const int64_t E = config_.num_local_experts;
    cuda::StreamHandle s = batch.stream;
    EPX_RETURN_IF_ERROR(Reserve(T, s));
    int32_t* offsets_host = static_cast<int32_t*>(offsets_host_.data()) + layer * (E + 1);
    const TensorView slots = slots_.Slice(0, T * K);
    const TensorView row_of_slot = row_of_slot_.Slice(0, T * K);
    const TensorView permuted = permuted_.Slice(0, T * K);
    const TensorView expert_out = expert_out_.Slice(0, T * K);
    EPX_RETURN_IF_ERROR(cuda::ExpertPermutation(batch.topk_ids, E, offsets_, slots, row_of_slot,
                                                permutation_scratch_, s));
    EPX_RETURN_IF_ERROR(cuda::PermuteRows(batch.x, slots, K, permuted, s));
    EPX_RETURN_IF_ERROR(cuda::CopyToHost(offsets_host, offsets_.raw(), offsets_.nbytes(), s));
    const cuda::GroupedGemmImpl impl = cuda::ResolveGroupedGemmImpl(impl_, T * K);
    // The cuBLAS forms size their GEMMs on the host: wait for this layer's counts.
    absl::Span<const int64_t> host_offsets;
    if (impl != cuda::GroupedGemmImpl::kSkinny) {
      EPX_RETURN_IF_ERROR(cuda::SynchronizeStream(s));
      host_offsets_.assign(offsets_host, offsets_host + E + 1);
      host_offsets = host_offsets_;
    }
    EPX_RETURN_IF_ERROR(cuda::GroupedSwiGlu(permuted, offsets_, host_offsets,
                                            weights_->layer(layer).experts, impl,
                                            grouped_scratch_, expert_out, *blas_));
    return ExpertOutput{
        .rows = expert_out, .row_of_slot = row_of_slot, .expert_offsets = offsets_host};
  }

 private:
  // Buffers for T tokens, grown (with room) when a step is larger.
  absl::Status Reserve(int64_t T, cuda::StreamHandle s) {
    if (T <= capacity_) return absl::OkStatus();
    const ModelConfig& c = config_;
    const int64_t want = std::max(T, 2 * capacity_), K = c.num_experts_per_tok;
    const int64_t E = c.num_local_experts, H = c.hidden_size;
    auto carve = [&](Layout& d) {
      offsets_ = d.Add(DType::kI32, {E + 1});
      slots_ = d.Add(DType::kI32, {want * K});
      row_of_slot_ = d.Add(DType::kI32, {want * K});
      permuted_ = d.Add(DType::kBF16, {want * K, H});
      expert_out_ = d.Add(DType::kBF16, {want * K, H});
      permutation_scratch_ = d.Add(
          DType::kU8, {static_cast<int64_t>(cuda::ExpertPermutationScratchBytes(want, K, E))});
      grouped_scratch_ = d.Add(
          DType::kU8, {static_cast<int64_t>(cuda::GroupedSwiGluScratchBytes(
                          want * K, H, c.intermediate_size, weights_->options().expert_dtype))});
    };
    Layout size;
    carve(size);
    EPX_RETURN_IF_ERROR(cuda::SynchronizeStream(s));
    // The old buffer goes first; until the new one exists nothing fits.
    capacity_ = 0;
    buffer_ = cuda::DeviceBuffer();
    EPX_ASSIGN_OR_RETURN(buffer_, cuda::DeviceBuffer::Allocate(size.size()));
    Layout at(buffer_.data());
    carve(at);
    capacity_ = want;
    return absl::OkStatus();
  }

  const ModelConfig config_;
  const DeviceModelWeights* weights_;
  cuda::Blas* blas_;
  const cuda::GroupedGemmImpl impl_;
  int64_t capacity_ = 0;  // tokens
  cuda::DeviceBuffer buffer_;
  TensorView offsets_, slots_, row_of_slot_, permuted_, expert_out_;
  TensorView permutation_scratch_, grouped_scratch_;
  cuda::PinnedBuffer offsets_host_;    // [layer, num_experts + 1] I32
  std::vector<int64_t> host_offsets_;  // the layer's offsets for the cuBLAS forms
};

class CudaForward : public ModelForward {
 public:
  CudaForward(const ModelConfig& config, ExpertExecutor* experts, cuda::GroupedGemmImpl impl)
      : config_(config),
        attention_(AttentionParamsOf(config)),
        remote_experts_(experts),
        impl_(impl),
        expert_offsets_(config.num_hidden_layers, nullptr) {}

  absl::Status Init(const ModelWeights* host, const CudaForwardOptions& options);

  int64_t kv_element_bytes() const override { return 2; }
  std::string device() const override { return device_name_; }
  bool reports_routing() const override { return true; }
  absl::Status AllocateKv(int64_t num_blocks, int64_t block_size) override;
  absl::StatusOr<Tensor> Forward(const ForwardBatch& batch, EngineStats& stats) override;

 private:
  // Device and pinned buffers for steps of up to T tokens, R logit rows, S sequences and B
  // blocks per table, with the views into them.
  struct Step {
    int64_t T = 0, R = 0, S = 0, B = 0;
    // metadata, pinned on the host and mirrored on the device (one copy)
    TensorView ids, kv_rows, rope, q_start, first_position, block_tables, logit_rows;
    // activations
    TensorView x, xn, qkv, q, attn, proj, router_logits, topk_ids, topk_weights, last, logits;
    TensorView routed;  // host only: [layer, T, K] top-k ids, for ForwardBatch::routed
  };
  absl::Status Reserve(const ForwardBatch& batch, int64_t max_blocks);
  void Carve(Layout& host, Layout& device, Step& s, bool on_device) const;
  // The layer's experts for the T tokens routed in dev_.topk_ids, combined into dev_.x.
  absl::Status Experts(int64_t layer, int64_t num_tokens);

  ModelConfig config_;
  const cpu::AttentionParams attention_;
  ExpertExecutor* remote_experts_;  // the caller's, or null
  cuda::GroupedGemmImpl impl_;
  // What the layers call: the local experts, the caller's device executor, or the staging
  // around the caller's host executor.
  std::unique_ptr<ExpertExecutor> owned_experts_;
  ExpertExecutor* experts_ = nullptr;
  std::vector<const int32_t*> expert_offsets_;  // [layer], this step's, from the executor
  int device_ = 0;
  std::string device_name_;
  cuda::Stream stream_;
  std::unique_ptr<cuda::Blas> blas_;
  std::unique_ptr<DeviceModelWeights> weights_;
  std::vector<cuda::DeviceBuffer> kv_;  // [layer]: keys then values
  int64_t kv_rows_total_ = 0;

  cuda::PinnedBuffer host_buffer_;
  cuda::DeviceBuffer device_buffer_;
  cuda::DeviceBuffer attention_scratch_;
  Step host_, dev_;  // views into host_buffer_ and device_buffer_
  size_t metadata_bytes_ = 0;
  std::vector<cuda::Event> events_;  // per layer: start, attention done; then the end
};

absl::Status CudaForward::Init(const ModelWeights* host, const CudaForwardOptions& options) {
  device_ = options.device;
  const absl::Status set = cuda::SetDevice(device_);
  if (!set.ok()) return absl::Status(set.code(), absl::StrCat("--device cuda: ", set.message()));
  device_name_ = cuda::DeviceLabel(device_);
  EPX_ASSIGN_OR_RETURN(stream_, cuda::Stream::Create());
  EPX_ASSIGN_OR_RETURN(cuda::Blas blas, cuda::Blas::Create(stream_.handle()));
  blas_ = std::make_unique<cuda::Blas>(std::move(blas));

  DeviceWeightOptions wo;
  wo.non_expert = true;
  wo.expert_dtype = options.expert_dtype;
  wo.dummy_seed = options.dummy_seed;
  if (remote_experts_ == nullptr) {
    for (int e = 0; e < config_.num_local_experts; ++e) wo.experts.push_back(e);
  }
  if (host != nullptr) {
    EPX_ASSIGN_OR_RETURN(weights_, DeviceModelWeights::Upload(*host, wo, stream_.handle()));
  } else {
    EPX_ASSIGN_OR_RETURN(weights_, DeviceModelWeights::Dummy(config_, wo, stream_.handle()));
  }
  if (remote_experts_ == nullptr) {
    auto local = std::make_unique<CudaLocalExperts>(config_, weights_.get(), blas_.get(), impl_);
    EPX_RETURN_IF_ERROR(local->Init());
    owned_experts_ = std::move(local);
  } else if (remote_experts_->memory() == MemoryKind::kHost) {
    owned_experts_ = NewHostStagedExpertExecutor(remote_experts_, config_.num_hidden_layers,
                                                 config_.num_local_experts);
  }
  experts_ = owned_experts_ != nullptr ? owned_experts_.get() : remote_experts_;
  for (int64_t i = 0; i < 2 * config_.num_hidden_layers + 1; ++i) {
    EPX_ASSIGN_OR_RETURN(cuda::Event e, cuda::Event::Create());
    events_.push_back(std::move(e));
  }
  return absl::OkStatus();
}

absl::Status CudaForward::AllocateKv(int64_t num_blocks, int64_t block_size) {
  // The current device is per host thread, and this may run on another thread than Init.
  EPX_RETURN_IF_ERROR(cuda::SetDevice(device_));
  kv_rows_total_ = num_blocks * block_size;
  const size_t bytes = static_cast<size_t>(kv_rows_total_ * config_.kv_size()) * 2;
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    auto buffer = cuda::DeviceBuffer::Allocate(2 * bytes);
    if (!buffer.ok())
      return absl::ResourceExhaustedError(absl::StrCat(
          "KV cache: ", num_blocks, " blocks of ", block_size, " tokens do not fit next to ",
          weights_->bytes() >> 20, " MiB of weights (", buffer.status().message(),
          "); lower --kv-cache-mib"));
    kv_.push_back(std::move(*buffer));
  }
  return absl::OkStatus();
}

void CudaForward::Carve(Layout& h, Layout& d, Step& s, bool on_device) const {
  const ModelConfig& c = config_;
  const int64_t T = s.T, R = s.R, S = s.S, B = s.B, H = c.hidden_size;
  const int64_t K = c.num_experts_per_tok, E = c.num_local_experts;
  Layout& meta = on_device ? d : h;
  s.ids = meta.Add(DType::kI32, {T});
  s.kv_rows = meta.Add(DType::kI32, {T});
  s.rope = meta.Add(DType::kF32, {T, c.head_dim});
  s.q_start = meta.Add(DType::kI32, {S + 1});
  s.first_position = meta.Add(DType::kI32, {S});
  s.block_tables = meta.Add(DType::kI32, {S, B});
  s.logit_rows = meta.Add(DType::kI32, {R});
  if (on_device) {
    s.x = d.Add(DType::kF32, {T, H});
    s.xn = d.Add(DType::kBF16, {T, H});
    s.qkv = d.Add(DType::kF32, {T, c.q_size() + 2 * c.kv_size()});
    s.q = d.Add(DType::kBF16, {T, c.q_size()});
    s.attn = d.Add(DType::kBF16, {T, c.q_size()});
    s.proj = d.Add(DType::kF32, {T, H});
    s.router_logits = d.Add(DType::kF32, {T, E});
    s.topk_ids = d.Add(DType::kI32, {T, K});
    s.topk_weights = d.Add(DType::kF32, {T, K});
    s.last = d.Add(DType::kBF16, {R, H});
    s.logits = d.Add(DType::kF32, {R, c.vocab_size});
  } else {
    s.logits = h.Add(DType::kF32, {R, c.vocab_size});
    s.routed = h.Add(DType::kI32, {c.num_hidden_layers, T, K});
  }
}

absl::Status CudaForward::Reserve(const ForwardBatch& batch, int64_t max_blocks) {
  Step want;
  want.T = static_cast<int64_t>(batch.ids.size());
  want.R = static_cast<int64_t>(batch.logit_rows.size());
  want.S = static_cast<int64_t>(batch.sequences.size());
  want.B = max_blocks;
  if (want.T <= dev_.T && want.R <= dev_.R && want.S <= dev_.S && want.B <= dev_.B)
    return absl::OkStatus();
  // Grow every bound at once, with room, so that growing steps do not reallocate each time.
  want.T = std::max(want.T, 2 * dev_.T);
  want.R = std::max(want.R, 2 * dev_.R);
  want.S = std::max(want.S, 2 * dev_.S);
  want.B = std::max(want.B, 2 * dev_.B);
  // Size both sides, allocate, then carve the same layouts again over the new memory.
  Step h = want, d = want;
  Layout host_size, device_size;
  Carve(host_size, device_size, h, false);
  Carve(host_size, device_size, d, true);
  EPX_RETURN_IF_ERROR(stream_.Synchronize());
  // The old buffers go first (a big step may need their memory); until the new ones exist the
  // bounds say nothing fits, so a failed growth never leaves views into freed memory.
  host_.T = host_.R = host_.S = host_.B = 0;
  dev_.T = dev_.R = dev_.S = dev_.B = 0;
  host_buffer_ = cuda::PinnedBuffer();
  device_buffer_ = cuda::DeviceBuffer();
  EPX_ASSIGN_OR_RETURN(host_buffer_, cuda::PinnedBuffer::Allocate(host_size.size()));
  EPX_ASSIGN_OR_RETURN(device_buffer_, cuda::DeviceBuffer::Allocate(device_size.size()));
  Layout host_layout(host_buffer_.data()), device_layout(device_buffer_.data());
  host_ = h;
  dev_ = d;
  Carve(host_layout, device_layout, host_, false);
  Carve(host_layout, device_layout, dev_, true);
  // The metadata leads both buffers in the same layout: one copy sends it.
  metadata_bytes_ = static_cast<size_t>(static_cast<char*>(dev_.x.raw()) -
                                        static_cast<char*>(device_buffer_.data()));
  return absl::OkStatus();
}

absl::Status CudaForward::Experts(int64_t l, int64_t T) {
  cuda::StreamHandle s = stream_.handle();
  const ExpertBatch batch{
      .x = dev_.xn.Slice(0, T), .topk_ids = dev_.topk_ids.Slice(0, T), .stream = s};
  EPX_ASSIGN_OR_RETURN(const ExpertOutput out, experts_->Run(static_cast<int>(l), batch));
  expert_offsets_[l] = out.expert_offsets;
  return cuda::MoeCombine(dev_.x.Slice(0, T), out.rows, out.row_of_slot,
                          dev_.topk_weights.Slice(0, T), s);
}

absl::StatusOr<Tensor> CudaForward::Forward(const ForwardBatch& batch, EngineStats& stats) {
  const ModelConfig& c = config_;
  const int64_t T = static_cast<int64_t>(batch.ids.size());
  const int64_t R = static_cast<int64_t>(batch.logit_rows.size());
  const int64_t S = static_cast<int64_t>(batch.sequences.size());
  const int64_t E = c.num_local_experts;
  // The current device is per host thread: the engine's step thread is not the one that ran Init
  // (epx serve), and allocations and launches must go to this backend's device.
  EPX_RETURN_IF_ERROR(cuda::SetDevice(device_));
  // A step that failed part-way may have left work queued (its metadata copy reads the pinned
  // buffer rewritten below): let it drain, which also reports a fault it hit here.
  EPX_RETURN_IF_ERROR(stream_.Synchronize());
  EPX_RETURN_IF_ERROR(experts_->BeginStep());
  std::fill(expert_offsets_.begin(), expert_offsets_.end(), nullptr);
  int64_t max_blocks = 1, max_queries = 0, max_kv_len = 0;
  for (const ForwardBatch::Sequence& seq : batch.sequences) {
    max_blocks = std::max<int64_t>(max_blocks, seq.block_table.size());
    max_queries = std::max(max_queries, seq.num_tokens);
    max_kv_len = std::max(max_kv_len, seq.first_position + seq.num_tokens);
  }
  EPX_RETURN_IF_ERROR(Reserve(batch, max_blocks));
  cuda::StreamHandle s = stream_.handle();

  // Metadata, packed on the host in the device's layout (block tables with the current row
  // stride dev_.B) and sent in one copy.
  int32_t* ids = host_.ids.data<int32_t>();
  int32_t* kv_rows = host_.kv_rows.data<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    ids[t] = batch.ids[t];
    kv_rows[t] = static_cast<int32_t>(batch.kv_rows[t]);
  }
  EPX_RETURN_IF_ERROR(
      cpu::RopeTable(batch.positions, c.head_dim, c.rope_theta, host_.rope.Slice(0, T)));
  int32_t* q_start = host_.q_start.data<int32_t>();
  int32_t* first_position = host_.first_position.data<int32_t>();
  int32_t* tables = host_.block_tables.data<int32_t>();
  for (int64_t i = 0; i < S; ++i) {
    const ForwardBatch::Sequence& seq = batch.sequences[i];
    q_start[i] = static_cast<int32_t>(seq.first_token);
    first_position[i] = static_cast<int32_t>(seq.first_position);
    std::copy(seq.block_table.begin(), seq.block_table.end(), tables + i * dev_.B);
  }
  q_start[S] = static_cast<int32_t>(T);
  for (int64_t r = 0; r < R; ++r)
    host_.logit_rows.data<int32_t>()[r] = static_cast<int32_t>(batch.logit_rows[r]);
  EPX_RETURN_IF_ERROR(
      cuda::CopyToDevice(device_buffer_.data(), host_buffer_.data(), metadata_bytes_, s));

  cuda::AttentionBatch ab;
  ab.q_start = dev_.q_start.Slice(0, S + 1);
  ab.first_position = dev_.first_position.Slice(0, S);
  ab.num_seqs = S;
  ab.max_queries = max_queries;
  ab.max_kv_len = max_kv_len;
  EPX_RETURN_IF_ERROR(
      cuda::GrowBuffer(attention_scratch_, cuda::AttentionScratchBytes(ab, attention_), s));
  const TensorView attention_scratch_view =
      attention_scratch_.view(DType::kU8, {static_cast<int64_t>(attention_scratch_.size())});

  const float eps = static_cast<float>(c.rms_norm_eps);
  const TensorView x = dev_.x.Slice(0, T), xn = dev_.xn.Slice(0, T);
  const TensorView qkv = dev_.qkv.Slice(0, T), q = dev_.q.Slice(0, T);
  const TensorView attn = dev_.attn.Slice(0, T), proj = dev_.proj.Slice(0, T);
  const TensorView router_logits = dev_.router_logits.Slice(0, T);
  const TensorView rope = dev_.rope.Slice(0, T), kv_rows_dev = dev_.kv_rows.Slice(0, T);
  EPX_RETURN_IF_ERROR(cuda::Embedding(dev_.ids.Slice(0, T), weights_->embed_tokens(), x, s));
  const int64_t rows = kv_rows_total_, kv_size = c.kv_size();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const DeviceLayerWeights& lw = weights_->layer(l);
    const TensorView k_cache(kv_[l].data(), DType::kBF16, {rows, kv_size});
    const TensorView v_cache(static_cast<char*>(kv_[l].data()) + rows * kv_size * 2,
                             DType::kBF16, {rows, kv_size});
    EPX_RETURN_IF_ERROR(events_[2 * l].Record(s));
    if (l == 0) {
      EPX_RETURN_IF_ERROR(cuda::RmsNorm(x, lw.input_norm, eps, xn, s));
    }  // later layers: the previous layer's MoE combine is followed by this norm below
    EPX_RETURN_IF_ERROR(cuda::Linear(xn, lw.qkv_proj, qkv, false, *blas_));
    EPX_RETURN_IF_ERROR(cuda::RopeQkvToCache(qkv, rope, kv_rows_dev, c.num_attention_heads,
                                             c.num_key_value_heads, c.head_dim, q, k_cache,
                                             v_cache, s));
    const cuda::PagedKv kv{k_cache, v_cache, dev_.block_tables.Slice(0, S), batch.block_size};
    EPX_RETURN_IF_ERROR(cuda::Attention(q, kv, ab, attention_, attention_scratch_view, attn, s));
    EPX_RETURN_IF_ERROR(cuda::Linear(attn, lw.o_proj, proj, false, *blas_));
    // h = x + o_proj(attn), and the MoE input norm, in one pass.
    EPX_RETURN_IF_ERROR(cuda::AddRmsNorm(x, proj, lw.post_attention_norm, eps, xn, s));
    EPX_RETURN_IF_ERROR(events_[2 * l + 1].Record(s));
    EPX_RETURN_IF_ERROR(cuda::Linear(xn, lw.gate, router_logits, false, *blas_));
    EPX_RETURN_IF_ERROR(cuda::RouterTopK(router_logits, dev_.topk_ids.Slice(0, T),
                                         dev_.topk_weights.Slice(0, T), s));
    if (!batch.routed.empty()) {  // packed: layer l's T x K ids at l * T * K
      const size_t bytes = static_cast<size_t>(T * c.num_experts_per_tok) * sizeof(int32_t);
      EPX_RETURN_IF_ERROR(cuda::CopyToHost(static_cast<char*>(host_.routed.raw()) + l * bytes,
                                           dev_.topk_ids.raw(), bytes, s));
    }
    EPX_RETURN_IF_ERROR(Experts(l, T));
    const TensorView next_norm =
        l + 1 < c.num_hidden_layers ? weights_->layer(l + 1).input_norm : weights_->final_norm();
    EPX_RETURN_IF_ERROR(cuda::RmsNorm(x, next_norm, eps, xn, s));
  }
  EPX_RETURN_IF_ERROR(events_.back().Record(s));
  // xn holds the final norm of every token; only the logit rows go through lm_head.
  const TensorView last = dev_.last.Slice(0, R), logits = dev_.logits.Slice(0, R);
  EPX_RETURN_IF_ERROR(cuda::PermuteRows(xn, dev_.logit_rows.Slice(0, R), 1, last, s));
  EPX_RETURN_IF_ERROR(cuda::Linear(last, weights_->lm_head(), logits, false, *blas_));
  EPX_RETURN_IF_ERROR(cuda::CopyToHost(host_.logits.raw(), logits.raw(), logits.nbytes(), s));
  EPX_RETURN_IF_ERROR(stream_.Synchronize());

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    EPX_ASSIGN_OR_RETURN(float attention_ms,
                         cuda::Event::ElapsedMs(events_[2 * l], events_[2 * l + 1]));
    EPX_ASSIGN_OR_RETURN(float moe_ms, cuda::Event::ElapsedMs(events_[2 * l + 1],
                                                              events_[2 * l + 2]));
    stats.attention_us[l] += 1e3 * attention_ms;
    stats.moe_us[l] += 1e3 * moe_ms;
    if (const int32_t* offsets = expert_offsets_[l]; offsets != nullptr)
      for (int64_t e = 0; e < E; ++e) stats.expert_tokens[l][e] += offsets[e + 1] - offsets[e];
  }
  Tensor out = Tensor::Empty(DType::kF32, {R, c.vocab_size});
  std::memcpy(out.data<void>(), host_.logits.raw(), out.nbytes());
  if (!batch.routed.empty())
    std::memcpy(batch.routed.data(), host_.routed.raw(), batch.routed.size() * sizeof(int32_t));
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModelForward>> NewCudaForward(const ModelConfig& config,
                                                             const ModelWeights* weights,
                                                             ExpertExecutor* experts,
                                                             const CudaForwardOptions& options) {
  EPX_ASSIGN_OR_RETURN(cuda::GroupedGemmImpl impl, cuda::ParseGroupedGemmImpl(options.grouped_gemm));
  if (options.expert_dtype != DType::kBF16 && options.expert_dtype != DType::kF8E4M3)
    return absl::InvalidArgumentError(absl::StrCat("--expert-dtype: BF16 or F8_E4M3, not ",
                                                   DTypeName(options.expert_dtype)));
  if (weights != nullptr && !weights->selection().non_expert)
    return absl::InvalidArgumentError("the CUDA backend needs the non-expert weights");
  if (weights != nullptr && experts == nullptr &&
      static_cast<int64_t>(weights->selection().experts.size()) != config.num_local_experts)
    return absl::InvalidArgumentError(
        "local experts on the GPU need every expert loaded (or pass an ExpertExecutor)");
  auto forward = std::make_unique<CudaForward>(config, experts, impl);
  EPX_RETURN_IF_ERROR(forward->Init(weights, options));
  return std::unique_ptr<ModelForward>(std::move(forward));
}

}  // namespace epx
