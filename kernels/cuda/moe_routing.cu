// MoE routing on the device: the router's softmax and top-k, the expert permutation that groups
// routed slots by expert, and the gather of token rows into that order.
//
// Design choices:
// - RouterTopK is one warp per token: num_experts <= 256 puts 8 logits in each lane's registers,
//   so the max, the top-k rounds (a warp argmax each, ties to the lower expert) and the
//   renormalisation need only shuffles. The oracle's fp32 sums are sequential (expert order for
//   the softmax denominator, choice order for the top-k sum); every lane replays the same
//   sequence from shared memory, which costs a few hundred dependent adds per token and makes
//   the weights the oracle's bit for bit. exp is evaluated in double and rounded to fp32 so that
//   it equals the host's (nearly correctly rounded) expf rather than CUDA's 2-ulp expf: the top-k
//   ids then match the oracle exactly even for near ties.
// - ExpertPermutation is a stable radix sort of (expert id, slot) pairs with CUB, over only the
//   bits the expert ids use (one pass for up to 256 experts): radix sorts are stable, so slots
//   stay ascending within an expert, which is the oracle's counting sort. The offsets are read
//   off the sorted ids (each run boundary writes the offsets it spans) and the inverse
//   permutation is a scatter, so no separate histogram or scan is needed. An id outside
//   [0, num_experts) (the oracle refuses them; the router cannot produce them) sorts after every
//   expert: expert_offsets[num_experts] then counts only the valid slots and nothing is written
//   out of bounds.
// - PermuteRows copies one row per block in 16-byte words.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <initializer_list>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "kernels/cuda/check_args.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops.h"

namespace epx::cuda {
namespace {

// ---- host-side argument checks ----

size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }

// ---- RouterTopK ----

constexpr int kMaxExperts = 256;
constexpr int kMaxTopk = 8;
constexpr int kPerLane = kMaxExperts / 32;
constexpr int kRouterWarps = 4;

// (p, e) ranks before (q, f): larger first, then the lower expert.
__device__ __forceinline__ bool Before(float p, int e, float q, int f) {
  return p > q || (p == q && e < f);
}

__global__ void RouterTopKKernel(const float* logits, int64_t num_tokens, int num_experts,
                                 int num_topk, int32_t* topk_ids, float* topk_weights) {
  __shared__ float exps[kRouterWarps][kMaxExperts];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  if (t >= num_tokens) return;  // whole warps leave; no block-wide barrier follows
  const float* l = logits + t * num_experts;
  // Expert lane + 32 * i lives in slot i of the lane.
  float v[kPerLane];
  float max_logit = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    v[i] = e < num_experts ? l[e] : -INFINITY;
    max_logit = fmaxf(max_logit, v[i]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    max_logit = fmaxf(max_logit, __shfl_xor_sync(0xffffffffu, max_logit, offset));
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    if (e < num_experts) {
      v[i] = static_cast<float>(exp(static_cast<double>(v[i] - max_logit)));
      exps[warp][e] = v[i];
    }
  }
  __syncwarp();
  float sum = 0.f;  // in expert order, as the oracle
  for (int e = 0; e < num_experts; ++e) sum = __fadd_rn(sum, exps[warp][e]);
  // p for the weights; `rank` for the selection: NaN (only from NaN logits, which the oracle
  // refuses) ranks below every number, taken and absent experts below that, so the k ids are
  // always distinct and in range.
  float p[kPerLane], rank[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < num_experts ? v[i] / sum : 0.f;
    rank[i] = e >= num_experts ? -3.f : (isnan(p[i]) ? -1.f : p[i]);
  }
  int ids[kMaxTopk];
  float picked[kMaxTopk];
#pragma unroll
  for (int j = 0; j < kMaxTopk; ++j) {
    ids[j] = 0;
    picked[j] = 0.f;
    if (j >= num_topk) continue;
    float best_rank = -4.f, best_p = 0.f;
    int best_e = kMaxExperts;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (Before(rank[i], e, best_rank, best_e)) best_rank = rank[i], best_p = p[i], best_e = e;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other_rank = __shfl_xor_sync(0xffffffffu, best_rank, offset);
      const float other_p = __shfl_xor_sync(0xffffffffu, best_p, offset);
      const int other_e = __shfl_xor_sync(0xffffffffu, best_e, offset);
      if (Before(other_rank, other_e, best_rank, best_e))
        best_rank = other_rank, best_p = other_p, best_e = other_e;
    }
    ids[j] = best_e;
    picked[j] = best_p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (lane + 32 * i == best_e) rank[i] = -2.f;
    }
  }
  float top_sum = 0.f;  // in choice order, as the oracle
#pragma unroll
  for (int j = 0; j < kMaxTopk; ++j) {
    if (j < num_topk) top_sum = __fadd_rn(top_sum, picked[j]);
  }
#pragma unroll
  for (int j = 0; j < kMaxTopk; ++j) {
    if (j < num_topk && lane == j) {
      topk_ids[t * num_topk + j] = ids[j];
      topk_weights[t * num_topk + j] = picked[j] / top_sum;
    }
  }
}

// ---- ExpertPermutation ----

// Bits needed for the values 0..num_experts (num_experts is the key of an invalid id).
int KeyBits(int64_t num_experts) {
  int bits = 1;
  while ((int64_t{1} << bits) <= num_experts) ++bits;
  return bits;
}

struct PermutationScratch {
  uint32_t* keys_in;
  int32_t* slots_in;
  uint32_t* keys_out;
  void* sort_temp;
  size_t sort_temp_bytes;
};

// Bytes of the scratch's key and slot arrays for `n` slots: the part of its size that is known
// on the host (CUB's temporary storage, laid out after them, is sized by a device query).
size_t PermutationArraysBytes(int64_t n) {
  return 2 * AlignUp(n * sizeof(uint32_t)) + AlignUp(n * sizeof(int32_t));
}

// Lays out the scratch of `n` slots at `base` (nullptr: only sizes). Returns the total bytes.
absl::StatusOr<size_t> LayOutPermutationScratch(void* base, int64_t n, int64_t num_experts,
                                                StreamHandle stream, PermutationScratch* out) {
  size_t temp_bytes = 0;
  EPX_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), static_cast<int>(n), 0,
      KeyBits(num_experts), stream));
  const size_t keys = AlignUp(n * sizeof(uint32_t));
  const size_t slots = AlignUp(n * sizeof(int32_t));
  char* p = static_cast<char*>(base);
  if (out != nullptr && p != nullptr) {
    out->keys_in = reinterpret_cast<uint32_t*>(p);
    out->slots_in = reinterpret_cast<int32_t*>(p + keys);
    out->keys_out = reinterpret_cast<uint32_t*>(p + keys + slots);
    out->sort_temp = p + 2 * keys + slots;
    out->sort_temp_bytes = temp_bytes;
  }
  return PermutationArraysBytes(n) + AlignUp(temp_bytes);
}

__global__ void PermutationKeysKernel(const int32_t* topk_ids, int64_t n, int32_t num_experts,
                                      uint32_t* keys, int32_t* slots) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < n;
       s += stride) {
    const int32_t id = topk_ids[s];
    keys[s] = static_cast<uint32_t>(id >= 0 && id < num_experts ? id : num_experts);
    slots[s] = static_cast<int32_t>(s);
  }
}

// Row r of the sorted order starts the offsets of every expert in (key[r - 1], key[r]]; the last
// row also ends those in (key[n - 1], num_experts]. Keys never exceed num_experts.
__global__ void PermutationOffsetsKernel(const uint32_t* sorted_keys, const int32_t* slots,
                                         int64_t n, int32_t num_experts, int32_t* expert_offsets,
                                         int32_t* row_of_slot) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n;
       r += stride) {
    const int64_t key = sorted_keys[r];
    const int64_t prev = r == 0 ? -1 : int64_t{sorted_keys[r - 1]};
    for (int64_t e = prev + 1; e <= key; ++e) expert_offsets[e] = static_cast<int32_t>(r);
    if (r == n - 1) {
      for (int64_t e = key + 1; e <= num_experts; ++e) expert_offsets[e] = static_cast<int32_t>(n);
    }
    row_of_slot[slots[r]] = static_cast<int32_t>(r);
  }
}

constexpr int kFlatThreads = 256;
int FlatBlocks(int64_t items) {
  return static_cast<int>(
      std::clamp<int64_t>((items + kFlatThreads - 1) / kFlatThreads, 1, 1 << 16));
}

// ---- PermuteRows ----

// Word: the unit a thread copies (uint4 = 8 BF16, or one BF16).
template <typename Word>
__global__ void PermuteRowsKernel(const Word* x, int64_t num_tokens, const int32_t* slots,
                                  int64_t num_topk, int64_t row_words, Word* permuted) {
  const int64_t r = blockIdx.x;
  const int64_t slot = slots[r];
  const int64_t t = slot / num_topk;
  const bool valid = slot >= 0 && t < num_tokens;
  for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x)
    permuted[r * row_words + i] = valid ? x[t * row_words + i] : Word{};
}

// ---- AssignGroups ----

__global__ void AssignGroupsKernel(const int32_t* topk_ids, int64_t n, const int32_t* expert_groups,
                                   const int32_t* replica_counts, int64_t num_experts,
                                   int64_t max_replicas, int64_t rotation, int32_t num_groups,
                                   int32_t* groups) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < n;
       s += stride) {
    const int64_t e = topk_ids[s];
    if (e < 0 || e >= num_experts) {
      groups[s] = num_groups;
      continue;
    }
    const int64_t replicas = replica_counts[e];
    groups[s] = expert_groups[e * max_replicas + (s + rotation) % replicas];
  }
}

}  // namespace

absl::Status AssignGroups(const TensorView& topk_ids, const TensorView& expert_groups,
                          const TensorView& replica_counts, int64_t rotation, int64_t num_groups,
                          const TensorView& groups, StreamHandle stream) {
  constexpr const char* kOp = "AssignGroups";
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "topk_ids", topk_ids, DType::kI32, {-1, -1}));
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "expert_groups", expert_groups, DType::kI32, {-1, -1}));
  const int64_t num_experts = expert_groups.dim(0), max_replicas = expert_groups.dim(1);
  EPX_RETURN_IF_ERROR(
      CheckTensor(kOp, "replica_counts", replica_counts, DType::kI32, {num_experts}));
  EPX_RETURN_IF_ERROR(
      CheckTensor(kOp, "groups", groups, DType::kI32, {topk_ids.dim(0), topk_ids.dim(1)}));
  if (num_experts < 1 || max_replicas < 1)
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": expert_groups ",
                                                   ShapeString(expert_groups.shape()),
                                                   " needs an expert and a replica"));
  if (num_groups < 1 || num_groups >= INT32_MAX || rotation < 0)
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": ", num_groups, " groups, rotation ",
                                                   rotation));
  const int64_t n = topk_ids.numel();
  if (n == 0) return absl::OkStatus();
  AssignGroupsKernel<<<FlatBlocks(n), kFlatThreads, 0, stream>>>(
      topk_ids.data<const int32_t>(), n, expert_groups.data<const int32_t>(),
      replica_counts.data<const int32_t>(), num_experts, max_replicas, rotation,
      static_cast<int32_t>(num_groups), groups.data<int32_t>());
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status RouterTopK(const TensorView& logits, const TensorView& topk_ids,
                        const TensorView& topk_weights, StreamHandle stream) {
  EPX_RETURN_IF_ERROR(CheckTensor("RouterTopK", "logits", logits, DType::kF32, {-1, -1}));
  const int64_t num_tokens = logits.dim(0), num_experts = logits.dim(1);
  if (num_experts < 1 || num_experts > kMaxExperts)
    return absl::InvalidArgumentError(absl::StrCat("RouterTopK: logits ",
                                                   ShapeString(logits.shape()), " must have 1 to ",
                                                   kMaxExperts, " experts"));
  EPX_RETURN_IF_ERROR(
      CheckTensor("RouterTopK", "topk_ids", topk_ids, DType::kI32, {num_tokens, -1}));
  const int64_t num_topk = topk_ids.dim(1);
  if (num_topk < 1 || num_topk > std::min<int64_t>(kMaxTopk, num_experts))
    return absl::InvalidArgumentError(
        absl::StrCat("RouterTopK: topk_ids ", ShapeString(topk_ids.shape()), " must choose 1 to ",
                     std::min<int64_t>(kMaxTopk, num_experts), " experts per token"));
  EPX_RETURN_IF_ERROR(
      CheckTensor("RouterTopK", "topk_weights", topk_weights, DType::kF32, {num_tokens, num_topk}));
  if (num_tokens == 0) return absl::OkStatus();
  const int64_t blocks = (num_tokens + kRouterWarps - 1) / kRouterWarps;
  if (blocks > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat("RouterTopK: too many tokens: ", num_tokens));
  RouterTopKKernel<<<static_cast<int>(blocks), kRouterWarps * 32, 0, stream>>>(
      logits.data<const float>(), num_tokens, static_cast<int>(num_experts),
      static_cast<int>(num_topk), topk_ids.data<int32_t>(), topk_weights.data<float>());
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

size_t ExpertPermutationScratchBytes(int64_t num_tokens, int64_t num_topk, int64_t num_experts) {
  const int64_t n = num_tokens * num_topk;
  if (n <= 0 || n > INT32_MAX || num_experts < 1 || num_experts >= INT32_MAX) return 0;
  // CUB sizes its temporary storage for the current device; without one the query fails and
  // the size is 0, which ExpertPermutation refuses.
  auto bytes = LayOutPermutationScratch(nullptr, n, num_experts, nullptr, nullptr);
  return bytes.ok() ? *bytes : 0;
}

absl::Status ExpertPermutation(const TensorView& topk_ids, int64_t num_experts,
                               const TensorView& expert_offsets, const TensorView& slots,
                               const TensorView& row_of_slot, const TensorView& scratch,
                               StreamHandle stream) {
  constexpr const char* kOp = "ExpertPermutation";
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "topk_ids", topk_ids, DType::kI32, {-1, -1}));
  if (num_experts < 1 || num_experts >= INT32_MAX)
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": num_experts must be in [1, 2^31 - 1), got ", num_experts));
  const int64_t n = topk_ids.numel();
  if (n > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat(
        kOp, ": topk_ids ", ShapeString(topk_ids.shape()), " has more than 2^31 - 1 slots"));
  EPX_RETURN_IF_ERROR(
      CheckTensor(kOp, "expert_offsets", expert_offsets, DType::kI32, {num_experts + 1}));
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "slots", slots, DType::kI32, {n}));
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "row_of_slot", row_of_slot, DType::kI32, {n}));
  if (n == 0) {
    // No slots: every expert's range is empty.
    EPX_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(expert_offsets.raw(), 0, expert_offsets.nbytes(), stream));
    return absl::OkStatus();
  }
  auto short_scratch = [&](absl::string_view needs) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": scratch ", DTypeName(scratch.dtype()), " ",
                     ShapeString(scratch.shape()), " has ", scratch.empty() ? 0 : scratch.nbytes(),
                     " bytes, needs ", needs, " (ExpertPermutationScratchBytes)"));
  };
  // What can be checked without the device first: CUB's size query below needs one, and a
  // missing or short scratch is an argument error whether or not a device is there.
  if (scratch.empty() || scratch.nbytes() < PermutationArraysBytes(n))
    return short_scratch(absl::StrCat("at least ", PermutationArraysBytes(n)));
  PermutationScratch s{};
  EPX_ASSIGN_OR_RETURN(const size_t needed,
                       LayOutPermutationScratch(scratch.raw(), n, num_experts, stream, &s));
  if (scratch.nbytes() < needed) return short_scratch(absl::StrCat(needed));
  const int32_t experts = static_cast<int32_t>(num_experts);
  PermutationKeysKernel<<<FlatBlocks(n), kFlatThreads, 0, stream>>>(
      topk_ids.data<const int32_t>(), n, experts, s.keys_in, s.slots_in);
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  size_t temp_bytes = s.sort_temp_bytes;
  EPX_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      s.sort_temp, temp_bytes, s.keys_in, s.keys_out, s.slots_in, slots.data<int32_t>(),
      static_cast<int>(n), 0, KeyBits(num_experts), stream));
  PermutationOffsetsKernel<<<FlatBlocks(n), kFlatThreads, 0, stream>>>(
      s.keys_out, slots.data<const int32_t>(), n, experts, expert_offsets.data<int32_t>(),
      row_of_slot.data<int32_t>());
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status PermuteRows(const TensorView& x, const TensorView& slots, int64_t num_topk,
                         const TensorView& permuted, StreamHandle stream) {
  EPX_RETURN_IF_ERROR(CheckTensor("PermuteRows", "x", x, DType::kBF16, {-1, -1}));
  const int64_t num_tokens = x.dim(0), hidden = x.dim(1);
  EPX_RETURN_IF_ERROR(CheckTensor("PermuteRows", "slots", slots, DType::kI32, {-1}));
  const int64_t num_rows = slots.dim(0);
  EPX_RETURN_IF_ERROR(
      CheckTensor("PermuteRows", "permuted", permuted, DType::kBF16, {num_rows, hidden}));
  if (num_topk < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("PermuteRows: num_topk must be positive, got ", num_topk));
  if (num_rows > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat("PermuteRows: too many rows: ", num_rows));
  if (num_rows == 0 || hidden == 0) return absl::OkStatus();
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (hidden % 8 == 0 && aligned(x.raw()) && aligned(permuted.raw())) {
    const int64_t words = hidden / 8;
    const int threads = static_cast<int>(std::clamp<int64_t>((words + 31) / 32 * 32, 32, 256));
    PermuteRowsKernel<<<static_cast<int>(num_rows), threads, 0, stream>>>(
        x.data<const uint4>(), num_tokens, slots.data<const int32_t>(), num_topk, words,
        permuted.data<uint4>());
  } else {
    const int threads = static_cast<int>(std::clamp<int64_t>((hidden + 31) / 32 * 32, 32, 256));
    PermuteRowsKernel<<<static_cast<int>(num_rows), threads, 0, stream>>>(
        x.data<const uint16_t>(), num_tokens, slots.data<const int32_t>(), num_topk, hidden,
        permuted.data<uint16_t>());
  }
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

}  // namespace epx::cuda
