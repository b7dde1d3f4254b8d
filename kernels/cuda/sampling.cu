// Token selection on the device: greedy argmax and cpu::Sample (temperature, top-k, top-p, one
// draw) for every row of a logits matrix, so that only the chosen ids cross to the host.
//
// Design choices:
// - ArgMax is one block per row with a (value, index) max reduction. The oracle's scan keeps the
//   first maximum and never lets a NaN win unless it is element 0 (every `>` against NaN is
//   false); the reduction skips NaNs, orders equal values by index, and element 0 being NaN is
//   decided apart, which gives the same index for every input.
// - Sample first sorts each row by descending logit with CUB's segmented radix sort. Radix sorts
//   are stable, so equal logits keep ascending ids: exactly the oracle's candidate order, a
//   total order that makes the draw reproducible. The keys are canonicalised first (-0 becomes +0,
//   which the oracle's comparison already treats as equal; NaN becomes -inf, a case the oracle
//   refuses), so nothing depends on how CUB orders special values. A full sort costs a few tens
//   of microseconds at a 32k vocabulary; a top-k select would be faster for small k and is a
//   possible refinement.
// - The selection is one block per row over the sorted candidates, with the oracle's arithmetic:
//   probabilities exp((logit - max) / T) in double, the top-p cut on the cumulative sum of
//   p / sum in sorted order, and the draw as the first candidate whose cumulative p exceeds
//   uniform * sum. Sums and prefix sums are fp64 but formed in parallel (sequential within a
//   thread, then across threads), not strictly left to right as on the host, and CUDA's exp
//   may differ from the host's in the last bit: the token can differ from the oracle's only when
//   the draw or the top-p threshold falls within ~1e-15 (relative) of a boundary. exp is
//   recomputed in each pass rather than stored, so the kernel needs no scratch of its own and
//   the passes that stop early (top-p, the draw) touch only the candidates they need.
// - Rows with temperature 0 take the first sorted candidate, which is the argmax with ties to the
//   lower id. Per-row parameters are device data, validated by the caller on the host
//   (SamplingParams::Validate); whatever they hold, the kernel reads only inside its row and
//   returns an id in [0, vocab).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cub/device/device_segmented_radix_sort.cuh>
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

// The logits matrix: F32 [num_rows, vocab] with 1 <= vocab and num_rows * vocab < 2^31 (CUB's
// segmented sort counts items in int).
absl::Status CheckLogits(const char* op, const TensorView& logits) {
  EPX_RETURN_IF_ERROR(CheckTensor(op, "logits", logits, DType::kF32, {-1, -1}));
  if (logits.dim(1) < 1 || logits.numel() > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat(op, ": logits ", ShapeString(logits.shape()),
                                                   " must have a vocabulary of at least 1 and "
                                                   "fewer than 2^31 elements"));
  return absl::OkStatus();
}

size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }

// ---- ArgMax ----

// (v, i) ranks before (w, j): larger, then the lower index. NaN never ranks before anything.
__device__ __forceinline__ bool Before(float v, int i, float w, int j) {
  return v > w || (v == w && i < j);
}

// Threads scan strided words of kW floats (indices ascending within a thread), then the block
// reduces (value, index) pairs.
template <int kW>
__global__ void ArgMaxKernel(const float* logits, int vocab, int32_t* out) {
  __shared__ float warp_best[32];
  __shared__ int warp_index[32];
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  // -inf with index INT_MAX ranks after every non-NaN element, -inf ones included.
  float best = -INFINITY;
  int index = INT_MAX;
  for (int64_t i = threadIdx.x * kW; i < vocab; i += blockDim.x * kW) {
    float v[kW];
    if constexpr (kW == 4) {
      const float4 w = *reinterpret_cast<const float4*>(row + i);
      v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
    } else {
      v[0] = row[i];
    }
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      const int j = static_cast<int>(i) + k;  // < vocab <= INT_MAX
      if (Before(v[k], j, best, index)) best = v[k], index = j;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (Before(other, other_index, best, index)) best = other, index = other_index;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = best, warp_index[warp] = index;
  __syncthreads();
  if (warp != 0) return;
  best = lane < static_cast<int>(blockDim.x / 32) ? warp_best[lane] : -INFINITY;
  index = lane < static_cast<int>(blockDim.x / 32) ? warp_index[lane] : INT_MAX;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (Before(other, other_index, best, index)) best = other, index = other_index;
  }
  if (lane == 0) out[blockIdx.x] = isnan(row[0]) || index == INT_MAX ? 0 : index;
}

// ---- Sample ----

struct SampleScratch {
  float* keys_in;
  int32_t* ids_in;
  float* keys_out;
  int32_t* ids_out;
  int32_t* row_offsets;  // [num_rows + 1]
  void* sort_temp;
  size_t sort_temp_bytes;
};

// Bytes of the scratch's key, id and offset arrays: the part of its size that is known on the
// host (CUB's temporary storage, laid out after them, is sized by a device query).
size_t SampleArraysBytes(int64_t num_rows, int64_t vocab) {
  const size_t column = AlignUp(num_rows * vocab * sizeof(float));  // floats and int32 ids alike
  return 4 * column + AlignUp((num_rows + 1) * sizeof(int32_t));
}

// Lays out the scratch for `n` = num_rows * vocab logits at `base` (nullptr: only sizes).
// Returns the total bytes.
absl::StatusOr<size_t> LayOutSampleScratch(void* base, int64_t num_rows, int64_t vocab,
                                           StreamHandle stream, SampleScratch* out) {
  const int64_t n = num_rows * vocab;
  size_t temp_bytes = 0;
  EPX_CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, temp_bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), static_cast<int>(n),
      static_cast<int>(num_rows), static_cast<const int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), 0, 32, stream));
  const size_t column = AlignUp(n * sizeof(float));  // floats and int32 ids alike
  const size_t offsets = AlignUp((num_rows + 1) * sizeof(int32_t));
  char* p = static_cast<char*>(base);
  if (out != nullptr && p != nullptr) {
    out->keys_in = reinterpret_cast<float*>(p);
    out->ids_in = reinterpret_cast<int32_t*>(p + column);
    out->keys_out = reinterpret_cast<float*>(p + 2 * column);
    out->ids_out = reinterpret_cast<int32_t*>(p + 3 * column);
    out->row_offsets = reinterpret_cast<int32_t*>(p + 4 * column);
    out->sort_temp = p + 4 * column + offsets;
    out->sort_temp_bytes = temp_bytes;
  }
  return SampleArraysBytes(num_rows, vocab) + AlignUp(temp_bytes);
}

constexpr int kFlatThreads = 256;
int FlatBlocks(int64_t items) {
  return static_cast<int>(
      std::clamp<int64_t>((items + kFlatThreads - 1) / kFlatThreads, 1, 1 << 16));
}

// Sort keys (canonical logits), ids within the row, and the rows' segment offsets.
__global__ void SampleKeysKernel(const float* logits, int num_rows, int vocab, float* keys,
                                 int32_t* ids, int32_t* row_offsets) {
  const int64_t n = int64_t{num_rows} * vocab;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < max(n, int64_t{num_rows} + 1); i += stride) {
    if (i < n) {
      float v = logits[i];
      if (isnan(v)) v = -INFINITY;
      if (v == 0.f) v = 0.f;  // -0 -> +0
      keys[i] = v;
      ids[i] = static_cast<int32_t>(i) % vocab;  // n < 2^31
    }
    if (i <= num_rows) row_offsets[i] = static_cast<int32_t>(i * vocab);
  }
}

constexpr int kSelectThreads = 256;
constexpr int kSelectItems = 4;  // consecutive candidates per thread
constexpr int kSelectChunk = kSelectThreads * kSelectItems;

// Block-wide helpers of the selection kernel. REQUIRES: all threads call each one.
class BlockScanner {
 public:
  // The sum of term(i) for i in [0, n); every thread gets the same bits.
  template <typename Term>
  __device__ double Sum(int n, Term term) {
    double local = 0.0;
    for (int64_t base = 0; base < n; base += kSelectChunk) {
#pragma unroll
      for (int k = 0; k < kSelectItems; ++k) {
        const int64_t i = base + threadIdx.x * kSelectItems + k;
        if (i < n) local += term(static_cast<int>(i));
      }
    }
    return BlockTotal(local);
  }

  // The first i in [0, n) whose prefix sum term(0) + ... + term(i) satisfies pred; -1 if none.
  template <typename Term, typename Pred>
  __device__ int FirstPrefix(int n, Term term, Pred pred) {
    double running = 0.0;  // the sum of the chunks before this one
    for (int64_t base = 0; base < n; base += kSelectChunk) {
      double prefix[kSelectItems];
      double own = 0.0;
#pragma unroll
      for (int k = 0; k < kSelectItems; ++k) {
        const int64_t i = base + threadIdx.x * kSelectItems + k;
        own += i < n ? term(static_cast<int>(i)) : 0.0;
        prefix[k] = own;
      }
      double chunk_total;
      const double before = ExclusivePrefix(own, &chunk_total);
      if (threadIdx.x == 0) found_ = INT_MAX;
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kSelectItems; ++k) {
        const int64_t i = base + threadIdx.x * kSelectItems + k;
        if (i < n && pred(running + (before + prefix[k]))) {
          atomicMin(&found_, static_cast<int>(i));
          break;
        }
      }
      __syncthreads();
      const int found = found_;
      running += chunk_total;
      __syncthreads();  // found_ and the partials are rewritten by the next chunk
      if (found != INT_MAX) return found;
    }
    return -1;
  }

 private:
  // The block's total of `v`, the same bits in every thread.
  __device__ double BlockTotal(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (threadIdx.x % 32 == 0) partial_[threadIdx.x / 32] = v;
    __syncthreads();
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kSelectThreads / 32; ++w) total += partial_[w];
    __syncthreads();
    return total;
  }

  // The sum of `v` over the threads before this one, and the block's total in *total.
  __device__ double ExclusivePrefix(double v, double* total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    double inclusive = v;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const double up = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    double exclusive = __shfl_up_sync(0xffffffffu, inclusive, 1);
    if (lane == 0) exclusive = 0.0;
    if (lane == 31) partial_[warp] = inclusive;
    __syncthreads();
    double warps_before = 0.0, sum = 0.0;
#pragma unroll
    for (int w = 0; w < kSelectThreads / 32; ++w) {
      if (w < warp) warps_before += partial_[w];
      sum += partial_[w];
    }
    *total = sum;
    return warps_before + exclusive;
  }

  double partial_[kSelectThreads / 32];
  int found_;
};

__global__ void __launch_bounds__(kSelectThreads)
    SampleSelectKernel(const float* sorted_logits, const int32_t* sorted_ids, int vocab,
                       const float* temperature, const int32_t* top_k, const float* top_p,
                       const double* uniform, int32_t* out) {
  __shared__ BlockScanner scanner;
  const int64_t row = blockIdx.x;
  const float* logit = sorted_logits + row * vocab;
  const int32_t* id = sorted_ids + row * vocab;
  const float t = temperature[row];
  if (t == 0.f) {  // greedy: the first candidate is the argmax, ties to the lower id
    if (threadIdx.x == 0) out[row] = id[0];
    return;
  }
  int keep = top_k[row] > 0 ? min(top_k[row], vocab) : vocab;
  const double inv_t = 1.0 / static_cast<double>(t);
  const double max_logit = logit[0];
  auto prob = [&](int i) { return exp((static_cast<double>(logit[i]) - max_logit) * inv_t); };
  double sum = scanner.Sum(keep, prob);
  const float p = top_p[row];
  if (p < 1.f) {
    // The smallest prefix whose share of the probability reaches top_p.
    const double threshold = p;
    const int last = scanner.FirstPrefix(
        keep, [&](int i) { return prob(i) / sum; }, [&](double c) { return c >= threshold; });
    if (last >= 0) keep = last + 1;
    sum = scanner.Sum(keep, prob);
  }
  const double u = uniform[row] * sum;
  const int drawn = scanner.FirstPrefix(keep, prob, [&](double c) { return u < c; });
  if (threadIdx.x == 0) out[row] = id[drawn >= 0 ? drawn : keep - 1];
}

}  // namespace

absl::Status ArgMax(const TensorView& logits, const TensorView& out, StreamHandle stream) {
  EPX_RETURN_IF_ERROR(CheckLogits("ArgMax", logits));
  const int64_t num_rows = logits.dim(0), vocab = logits.dim(1);
  EPX_RETURN_IF_ERROR(CheckTensor("ArgMax", "out", out, DType::kI32, {num_rows}));
  if (num_rows == 0) return absl::OkStatus();
  const bool vec = vocab % 4 == 0 && reinterpret_cast<uintptr_t>(logits.raw()) % 16 == 0;
  const int64_t words = vec ? vocab / 4 : vocab;
  const int threads = static_cast<int>(std::clamp<int64_t>((words + 31) / 32 * 32, 32, 1024));
  if (vec) {
    ArgMaxKernel<4><<<static_cast<int>(num_rows), threads, 0, stream>>>(
        logits.data<const float>(), static_cast<int>(vocab), out.data<int32_t>());
  } else {
    ArgMaxKernel<1><<<static_cast<int>(num_rows), threads, 0, stream>>>(
        logits.data<const float>(), static_cast<int>(vocab), out.data<int32_t>());
  }
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

size_t SampleScratchBytes(int64_t num_rows, int64_t vocab) {
  if (num_rows <= 0 || vocab <= 0 || num_rows * vocab > INT32_MAX) return 0;
  // CUB sizes its temporary storage for the current device; without one the query fails and
  // the size is 0, which Sample refuses.
  auto bytes = LayOutSampleScratch(nullptr, num_rows, vocab, nullptr, nullptr);
  return bytes.ok() ? *bytes : 0;
}

absl::Status Sample(const TensorView& logits, const SampleArgs& args, const TensorView& scratch,
                    const TensorView& out, StreamHandle stream) {
  EPX_RETURN_IF_ERROR(CheckLogits("Sample", logits));
  const int64_t num_rows = logits.dim(0), vocab = logits.dim(1);
  EPX_RETURN_IF_ERROR(
      CheckTensor("Sample", "temperature", args.temperature, DType::kF32, {num_rows}));
  EPX_RETURN_IF_ERROR(CheckTensor("Sample", "top_k", args.top_k, DType::kI32, {num_rows}));
  EPX_RETURN_IF_ERROR(CheckTensor("Sample", "top_p", args.top_p, DType::kF32, {num_rows}));
  EPX_RETURN_IF_ERROR(CheckTensor("Sample", "uniform", args.uniform, DType::kF64, {num_rows}));
  EPX_RETURN_IF_ERROR(CheckTensor("Sample", "out", out, DType::kI32, {num_rows}));
  if (num_rows == 0) return absl::OkStatus();
  auto short_scratch = [&](absl::string_view needs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Sample: scratch ", DTypeName(scratch.dtype()), " ", ShapeString(scratch.shape()), " has ",
        scratch.empty() ? 0 : scratch.nbytes(), " bytes, needs ", needs, " (SampleScratchBytes)"));
  };
  // What can be checked without the device first: CUB's size query below needs one, and a
  // missing or short scratch is an argument error whether or not a device is there.
  if (scratch.empty() || scratch.nbytes() < SampleArraysBytes(num_rows, vocab))
    return short_scratch(absl::StrCat("at least ", SampleArraysBytes(num_rows, vocab)));
  SampleScratch s{};
  EPX_ASSIGN_OR_RETURN(const size_t needed,
                       LayOutSampleScratch(scratch.raw(), num_rows, vocab, stream, &s));
  if (scratch.nbytes() < needed) return short_scratch(absl::StrCat(needed));
  const int rows = static_cast<int>(num_rows), n = static_cast<int>(num_rows * vocab);
  SampleKeysKernel<<<FlatBlocks(std::max(n, rows + 1)), kFlatThreads, 0, stream>>>(
      logits.data<const float>(), rows, static_cast<int>(vocab), s.keys_in, s.ids_in,
      s.row_offsets);
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  size_t temp_bytes = s.sort_temp_bytes;
  EPX_CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      s.sort_temp, temp_bytes, s.keys_in, s.keys_out, s.ids_in, s.ids_out, n, rows,
      static_cast<const int32_t*>(s.row_offsets), static_cast<const int32_t*>(s.row_offsets + 1), 0,
      32, stream));
  SampleSelectKernel<<<rows, kSelectThreads, 0, stream>>>(
      s.keys_out, s.ids_out, static_cast<int>(vocab), args.temperature.data<const float>(),
      args.top_k.data<const int32_t>(), args.top_p.data<const float>(),
      args.uniform.data<const double>(), out.data<int32_t>());
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

}  // namespace epx::cuda
