// `epx bench decode`: whole-model decode throughput on this process's device, by batch size, as a
// fraction of what the memory system allows. For each batch size B it adds B sequences, prefills
// them with random tokens, then times decode steps (one new token per sequence) with the wall
// clock around Engine::Step, which returns only when the step's logits are on the host. Each step
// is charged the bytes it must read: the non-expert weights, the experts its tokens were routed to
// (counted from the engine's per-layer expert statistics around that step) and the KV cache its
// attention reads. With --device cuda the rate is compared with a device-to-device copy measured
// in the same process. bench/README.md ("Whole-model decode") describes the byte model; the
// Hugging Face peer is bench/peer/decode_torch.py, run beside this one by bench/decode.sh.
//
// Not thread-safe: it owns the Runtime it starts for the time of the call.
#ifndef EPX_CLI_BENCH_DECODE_H_
#define EPX_CLI_BENCH_DECODE_H_

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "runtime/runtime.h"

namespace epx {

struct BenchDecodeOptions {
  // --model or --preset, --device, --expert-dtype, --grouped-gemm, --load-format, ...
  RuntimeOptions runtime;
  // With --load-format dummy: a PresetConfig() name (tiny, small, mixtral-8x7b, mixtral-8x22b)
  // instead of --model. Empty: the config of --model.
  std::string preset;
  // Set: overrides num_hidden_layers (--load-format dummy only), so that a model fits the device
  // (bf16 Mixtral-8x7B is 93 GB; 16 of its 32 layers fit an 80 GB H100).
  std::optional<int64_t> num_layers;
  std::vector<int64_t> batch_sizes = {1, 2, 4, 8, 16, 32, 64, 128, 256};
  int64_t context = 512;                // prompt tokens per sequence, random ids from `seed`
  int64_t prefill_chunk_tokens = 2048;  // at most this many prompt tokens per prefill step
  int64_t warmup_steps = 3;             // decode steps run before the timed ones
  int64_t steps = 32;                   // timed decode steps per batch size
  uint64_t seed = 0;
  // KV cache in MiB; 0: exactly what the largest batch needs (batch x (context + warmup_steps +
  // steps) tokens, rounded up to whole blocks).
  int64_t kv_cache_mib = 0;
  std::string json;    // non-empty: write the results there as JSON
  bool stats = false;  // print per-layer timings and expert load to the log at the end
};

// Prints a header (device, model shape, expert dtype, copy bandwidth, the byte model) and one row
// per batch size to `out`; progress to `log`. A batch size whose steps run out of device memory
// (ResourceExhausted) gets a row saying so and the run goes on. Errors: InvalidArgument for bad
// options, a context beyond max_position_embeddings, or a KV cache too small for the largest
// batch (naming the --kv-cache-mib needed); Runtime::Start's errors (FailedPrecondition for
// --device cuda without a device or a CUDA build); Cancelled on SIGINT/SIGTERM; the JSON file's
// error. Under mpirun the worker ranks serve experts and the coordinator refuses to run
// (InvalidArgument): the byte model is for one process holding every expert.
absl::Status RunBenchDecode(const BenchDecodeOptions& options, std::ostream& out,
                            std::ostream& log);

}  // namespace epx

#endif  // EPX_CLI_BENCH_DECODE_H_
