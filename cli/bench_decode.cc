#include "cli/bench_decode.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "cli/commands.h"
#include "common/status.h"
#include "coordinator/engine.h"
#include "kernels/cuda/runtime.h"
#include "nlohmann/json.hpp"

namespace epx {

namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

// Llama/Mixtral vocabularies start with <unk>, <s>, </s>: random prompts start above them.
constexpr int32_t kFirstOrdinaryToken = 3;
// The copy that stands for the memory system: far above any L2 (50 MiB on an H100).
constexpr size_t kCopyBytes = size_t{1} << 30;
constexpr int kCopyRepeats = 5;

double GB(double bytes) { return bytes / 1e9; }

// What one decode step must read, by part. Weights are read once per step whatever the batch
// (every row of a matrix is needed by every token); an expert only when a token was routed to it.
struct ByteModel {
  int64_t non_expert = 0;     // lm_head; per layer q/k/v, o_proj, router, two norms; final norm
  int64_t embedding_row = 0;  // one row of the embedding table (a decode token reads one)
  int64_t expert = 0;         // one expert's w1, w2, w3 (and their scales in fp8)
  int64_t kv_per_token = 0;   // one cached token's keys and values over all layers
  std::string expert_dtype;   // "bf16", "fp8", ...
};

std::string DTypeLabel(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "fp16";
    case DType::kF32:
      return "fp32";
    case DType::kF8E4M3:
      return "fp8";
    default:
      return DTypeName(dtype);
  }
}

// The layouts the backends hold (kernels/cuda/device_weights.h, common/model_weights.h): on the
// GPU bf16 matrices, fp32 norms, bf16 KV cache, experts bf16 or fp8 e4m3 with an fp32 scale per
// output row; on the CPU the checkpoint's dtype, fp32 norms and fp32 KV cache.
ByteModel MakeByteModel(const ModelConfig& c, bool cuda, const ModelWeights* weights,
                        DType cuda_expert_dtype) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  int64_t w = 2, kv = 2, expert_bytes = 0;
  std::string expert_dtype;
  if (cuda) {
    if (cuda_expert_dtype == DType::kF8E4M3) {
      expert_bytes = 3 * H * I + (2 * I + H) * 4;
    } else {
      expert_bytes = 3 * H * I * 2;
    }
    expert_dtype = DTypeLabel(cuda_expert_dtype);
  } else {
    // REQUIRES (RunBenchDecode): the CPU backend runs over host weights holding every expert.
    const LayerWeights& layer = weights->layer(0);
    w = static_cast<int64_t>(DTypeSize(layer.q_proj.dtype()));
    const DType e = layer.experts[0].w1.dtype();
    expert_bytes = 3 * H * I * static_cast<int64_t>(DTypeSize(e));
    expert_dtype = DTypeLabel(e) + " (checkpoint)";
    kv = 4;
  }
  constexpr int64_t kNorm = 4;
  const int64_t per_layer = (c.q_size() + 2 * c.kv_size()) * H * w + H * c.q_size() * w +
                            c.num_local_experts * H * w + 2 * H * kNorm;
  ByteModel m;
  m.non_expert = c.vocab_size * H * w + c.num_hidden_layers * per_layer + H * kNorm;
  m.embedding_row = H * w;
  m.expert = expert_bytes;
  m.kv_per_token = 2 * c.num_hidden_layers * c.kv_size() * kv;
  m.expert_dtype = expert_dtype;
  return m;
}

// Device-to-device copy rate of the current device in GB/s, counting read + write bytes
// (2 x bytes / time) as bandwidth tests do.
absl::StatusOr<double> CopyBandwidthGBps() {
  EPX_ASSIGN_OR_RETURN(cuda::Stream stream, cuda::Stream::Create());
  EPX_ASSIGN_OR_RETURN(const double bytes_per_s,
                       cuda::MeasureCopyBandwidth(kCopyBytes, kCopyRepeats, stream.handle()));
  return bytes_per_s / 1e9;
}

absl::Status ValidateOptions(const BenchDecodeOptions& o) {
  if (o.batch_sizes.empty()) return absl::InvalidArgumentError("--batch-sizes is empty");
  for (int64_t b : o.batch_sizes)
    if (b <= 0)
      return absl::InvalidArgumentError(absl::StrCat("--batch-sizes must be positive, got ", b));
  if (o.context <= 0)
    return absl::InvalidArgumentError(absl::StrCat("--context must be positive, got ", o.context));
  if (o.steps <= 0)
    return absl::InvalidArgumentError(absl::StrCat("--steps must be positive, got ", o.steps));
  if (o.warmup_steps < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--warmup must not be negative, got ", o.warmup_steps));
  if (o.prefill_chunk_tokens <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--prefill-chunk must be positive, got ", o.prefill_chunk_tokens));
  if (o.kv_cache_mib < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-cache-mib must not be negative, got ", o.kv_cache_mib));
  if (o.runtime.load_format == "dummy" && o.runtime.device != "cuda")
    return absl::InvalidArgumentError(
        "--load-format dummy generates the weights on the GPU: it needs --device cuda");
  return absl::OkStatus();
}

// The config the run uses: the preset's or the checkpoint's, with --num-layers applied.
absl::StatusOr<ModelConfig> ResolveConfig(const BenchDecodeOptions& o) {
  const bool dummy = o.runtime.load_format == "dummy";
  ModelConfig config;
  if (!o.preset.empty()) {
    if (!o.runtime.model_dir.empty())
      return absl::InvalidArgumentError("give --model or --preset, not both");
    if (!dummy)
      return absl::InvalidArgumentError(absl::StrCat(
          "--preset ", o.preset,
          " has no checkpoint to load: it needs --load-format dummy (with --device cuda)"));
    EPX_ASSIGN_OR_RETURN(config, PresetConfig(o.preset));
  } else if (o.runtime.config.has_value()) {
    config = *o.runtime.config;
  } else {
    if (o.runtime.model_dir.empty())
      return absl::InvalidArgumentError(
          "bench decode needs --model DIR, or --preset NAME with --load-format dummy");
    EPX_ASSIGN_OR_RETURN(config, ModelConfig::FromDir(o.runtime.model_dir));
  }
  if (o.num_layers.has_value()) {
    if (!dummy)
      return absl::InvalidArgumentError(
          "--num-layers needs --load-format dummy (a checkpoint is loaded with all its layers)");
    if (*o.num_layers <= 0)
      return absl::InvalidArgumentError(
          absl::StrCat("--num-layers must be positive, got ", *o.num_layers));
    config.num_hidden_layers = *o.num_layers;
  }
  EPX_RETURN_IF_ERROR(config.Validate(o.preset.empty() ? o.runtime.model_dir : o.preset));
  return config;
}

// One batch size's measurement.
struct Row {
  int64_t batch = 0;
  double prefill_s = 0;
  int64_t prefill_steps = 0;
  std::vector<double> step_ms;  // [steps] wall clock of each timed step
  double bytes = 0;             // all timed steps
  int64_t experts_hit = 0;      // summed over timed steps and layers
};

// Adds `batch` sequences (ids 0..batch-1), prefills, warms up and times the decode steps; the
// caller removes the sequences.
absl::Status MeasureBatch(Engine& engine, const BenchDecodeOptions& o, const ByteModel& bytes,
                          Row& row, std::ostream& log) {
  const ModelConfig& c = engine.config();
  const int64_t B = row.batch, L = c.num_hidden_layers, E = c.num_local_experts;
  std::seed_seq seq{static_cast<uint32_t>(o.seed), static_cast<uint32_t>(o.seed >> 32),
                    static_cast<uint32_t>(B)};
  std::mt19937_64 rng(seq);
  const int32_t first =
      static_cast<int32_t>(std::min<int64_t>(kFirstOrdinaryToken, c.vocab_size - 1));
  std::uniform_int_distribution<int32_t> token(first, static_cast<int32_t>(c.vocab_size) - 1);
  auto step = [&engine](absl::Span<const SequenceInput> batch) -> absl::Status {
    if (Runtime::stop_requested()) return absl::CancelledError("interrupted (SIGINT/SIGTERM)");
    return engine.Step(batch).status();
  };

  for (int64_t s = 0; s < B; ++s) EPX_RETURN_IF_ERROR(engine.AddSequence(s));

  // Prefill: sequences in order, each step at most prefill_chunk_tokens prompt tokens (a long
  // prompt spans steps, several short ones share one), as a serving scheduler would chunk them.
  std::vector<std::vector<int32_t>> prompts(B, std::vector<int32_t>(o.context));
  for (auto& p : prompts)
    for (int32_t& id : p) id = token(rng);
  std::vector<int64_t> done(B, 0);
  const Clock::time_point prefill_start = Clock::now();
  for (int64_t next = 0; next < B;) {
    std::vector<SequenceInput> batch;
    int64_t budget = o.prefill_chunk_tokens;
    for (int64_t s = next; s < B && budget > 0; ++s) {
      const int64_t n = std::min(o.context - done[s], budget);
      batch.push_back({s, absl::MakeConstSpan(prompts[s].data() + done[s], n), false});
      done[s] += n;
      budget -= n;
    }
    EPX_RETURN_IF_ERROR(step(batch));
    ++row.prefill_steps;
    while (next < B && done[next] == o.context) ++next;
  }
  row.prefill_s = std::chrono::duration<double>(Clock::now() - prefill_start).count();
  log << absl::StrFormat("batch %d: prefilled %d x %d tokens in %d steps, %.2f s\n", B, B,
                         o.context, row.prefill_steps, row.prefill_s)
      << std::flush;

  // Decode: one random token per sequence per step (no sampling: the host work between steps
  // is not what is measured).
  std::vector<int32_t> ids(B);
  std::vector<SequenceInput> batch(B);
  auto next_tokens = [&] {
    for (int64_t s = 0; s < B; ++s) {
      ids[s] = token(rng);
      batch[s] = {s, absl::MakeConstSpan(&ids[s], 1), false};
    }
  };
  for (int64_t i = 0; i < o.warmup_steps; ++i) {
    next_tokens();
    EPX_RETURN_IF_ERROR(step(batch));
  }
  const int64_t window = c.sliding_window.value_or(std::numeric_limits<int64_t>::max());
  for (int64_t i = 0; i < o.steps; ++i) {
    next_tokens();
    const int64_t attended = std::min(engine.SequenceLength(0) + 1, window);
    const std::vector<std::vector<int64_t>> before = engine.stats().expert_tokens;
    const Clock::time_point start = Clock::now();
    EPX_RETURN_IF_ERROR(step(batch));
    row.step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    int64_t hit = 0;
    const std::vector<std::vector<int64_t>>& after = engine.stats().expert_tokens;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t e = 0; e < E; ++e) hit += after[l][e] > before[l][e] ? 1 : 0;
    row.experts_hit += hit;
    row.bytes += static_cast<double>(bytes.non_expert) +
                 static_cast<double>(B) * static_cast<double>(bytes.embedding_row) +
                 static_cast<double>(hit) * static_cast<double>(bytes.expert) +
                 static_cast<double>(B) * static_cast<double>(attended) *
                     static_cast<double>(bytes.kv_per_token);
  }
  return absl::OkStatus();
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

struct RowNumbers {
  double total_s = 0, ms_per_step = 0, tokens_per_s = 0, gb_per_step = 0, gbps = 0;
  double experts_per_layer = 0;
};

RowNumbers Numbers(const Row& r, int64_t layers) {
  RowNumbers n;
  double total_ms = 0;
  for (double ms : r.step_ms) total_ms += ms;
  const double steps = static_cast<double>(r.step_ms.size());
  n.total_s = total_ms / 1e3;
  n.ms_per_step = steps > 0 ? total_ms / steps : 0;
  n.tokens_per_s = n.total_s > 0 ? static_cast<double>(r.batch) * steps / n.total_s : 0;
  n.gb_per_step = steps > 0 ? GB(r.bytes) / steps : 0;
  n.gbps = n.total_s > 0 ? GB(r.bytes) / n.total_s : 0;
  n.experts_per_layer =
      steps > 0 ? static_cast<double>(r.experts_hit) / (steps * static_cast<double>(layers)) : 0;
  return n;
}

absl::Status WriteJson(const std::string& path, const Json& json) {
  std::ofstream file(path, std::ios::trunc);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot open for writing"));
  file << json.dump(2) << "\n";
  file.flush();
  if (!file) return absl::DataLossError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

absl::Status RunOnEngine(const BenchDecodeOptions& o, Runtime& runtime,
                         std::optional<double> copy_gbps, std::ostream& out, std::ostream& log) {
  Engine& engine = runtime.engine();
  const ModelConfig& c = engine.config();
  const bool cuda = o.runtime.device == "cuda";
  const bool dummy = o.runtime.load_format == "dummy";
  const ByteModel bytes = MakeByteModel(c, cuda, runtime.weights(), o.runtime.cuda.expert_dtype);
  const int64_t L = c.num_hidden_layers, E = c.num_local_experts;
  const int64_t max_batch = *std::max_element(o.batch_sizes.begin(), o.batch_sizes.end());
  const int64_t per_seq = o.context + o.warmup_steps + o.steps;
  const KvCache& kv = engine.kv_cache();
  if (max_batch * kv.BlocksFor(per_seq) > kv.num_blocks())
    return absl::InvalidArgumentError(absl::StrCat(
        "batch ", max_batch, " x ", per_seq, " tokens need ", max_batch * kv.BlocksFor(per_seq),
        " KV cache blocks, the cache has ", kv.num_blocks(), ": raise --kv-cache-mib"));

  // The header: enough to read the table without the command line.
  std::string name = o.preset.empty() ? o.runtime.model_dir : o.preset;
  if (dummy) name += " (dummy weights)";
  int64_t full_layers = L;
  if (!o.preset.empty()) {
    absl::StatusOr<ModelConfig> preset = PresetConfig(o.preset);
    if (preset.ok()) full_layers = preset->num_hidden_layers;
  }
  const std::string layers = full_layers != L ? absl::StrCat(L, " of ", full_layers, " layers")
                                              : absl::StrCat(L, " layers");
  const double expert_total = static_cast<double>(bytes.expert) * static_cast<double>(L * E);
  out << "epx bench decode: whole-model decode steps; wall clock around Engine::Step, which "
         "returns when the step's logits are on the host\n";
  out << absl::StrFormat("device        %s\n", engine.device());
  out << absl::StrFormat(
      "model         %s: %s, hidden %d, intermediate %d, %d experts top-%d, heads %d/%d x %d, "
      "vocab %d%s\n",
      name, layers, c.hidden_size, c.intermediate_size, E, c.num_experts_per_tok,
      c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size,
      c.sliding_window ? absl::StrCat(", sliding window ", *c.sliding_window) : "");
  out << absl::StrFormat(
      "weights       experts %s: %d x %d x %.1f MB = %.2f GB; non-expert %.2f GB (lm_head, "
      "attention, router, norms)%s\n",
      bytes.expert_dtype, L, E, bytes.expert / 1e6, GB(expert_total), GB(bytes.non_expert),
      cuda ? absl::StrCat(", grouped GEMM ", o.runtime.cuda.grouped_gemm) : "");
  out << absl::StrFormat(
      "run           per batch size: %d random prompt tokens per sequence (prefill steps of <= %d "
      "tokens), %d warm-up + %d timed decode steps; KV cache %d blocks of %d tokens\n",
      o.context, o.prefill_chunk_tokens, o.warmup_steps, o.steps, kv.num_blocks(), kv.block_size());
  if (copy_gbps.has_value()) {
    out << absl::StrFormat(
        "copy BW       %.1f GB/s: device-to-device copy of 1 GiB, best of %d, counting read + "
        "write bytes (2 x bytes / time), as bandwidth tests do\n",
        *copy_gbps, kCopyRepeats);
  } else {
    out << "copy BW       - (measured with --device cuda only)\n";
  }
  out << absl::StrFormat(
      "bytes/step    non-expert weights %.3f GB + B embedding rows + experts hit x %.1f MB + "
      "KV read (B x length x %d B)\n",
      GB(bytes.non_expert), bytes.expert / 1e6, bytes.kv_per_token);
  out << "              experts/layer: distinct experts the step's tokens were routed to, mean "
         "over layers and steps; GB/s = bytes/step / time/step; frac = GB/s / copy BW\n\n";
  out << absl::StrFormat("%7s %10s %11s %13s %9s %9s %8s\n", "batch", "ms/step", "tok/s",
                         "experts/layer", "GB/step", "GB/s", "frac_bw")
      << std::flush;

  Json json;
  json["tool"] = "epx bench decode";
  json["engine"] = "epx";
  json["device"] = engine.device();
  json["backend"] = o.runtime.device;
  json["model"] = {{"name", o.preset.empty() ? o.runtime.model_dir : o.preset},
                   {"load_format", o.runtime.load_format},
                   {"num_hidden_layers", L},
                   {"hidden_size", c.hidden_size},
                   {"intermediate_size", c.intermediate_size},
                   {"num_local_experts", E},
                   {"num_experts_per_tok", c.num_experts_per_tok},
                   {"num_attention_heads", c.num_attention_heads},
                   {"num_key_value_heads", c.num_key_value_heads},
                   {"head_dim", c.head_dim},
                   {"vocab_size", c.vocab_size}};
  json["expert_dtype"] = bytes.expert_dtype;
  if (cuda) json["grouped_gemm"] = o.runtime.cuda.grouped_gemm;
  json["context"] = o.context;
  json["warmup_steps"] = o.warmup_steps;
  json["steps"] = o.steps;
  json["prefill_chunk_tokens"] = o.prefill_chunk_tokens;
  json["seed"] = o.seed;
  json["copy_bandwidth_GBps"] = copy_gbps.has_value() ? Json(*copy_gbps) : Json(nullptr);
  json["copy_bandwidth_note"] = absl::StrFormat(
      "device-to-device copy of 1 GiB, best of %d, counting read + write bytes (2 x bytes / time)",
      kCopyRepeats);
  json["bytes_model"] = {{"non_expert_bytes", bytes.non_expert},
                         {"embedding_row_bytes", bytes.embedding_row},
                         {"expert_bytes", bytes.expert},
                         {"kv_bytes_per_token", bytes.kv_per_token}};
  json["rows"] = Json::array();

  // After a step runs out of memory the backend is not trusted with more steps (a failed
  // allocation may leave its scratch half-replaced), so the remaining batch sizes are skipped.
  int64_t out_of_memory_at = 0;
  for (int64_t b : o.batch_sizes) {
    Json j;
    j["batch"] = b;
    if (out_of_memory_at > 0) {
      const std::string skipped =
          absl::StrCat("skipped: batch ", out_of_memory_at, " ran out of memory before it");
      out << absl::StrFormat("%7d  %s\n", b, skipped) << std::flush;
      j["error"] = skipped;
      json["rows"].push_back(std::move(j));
      if (!o.json.empty()) EPX_RETURN_IF_ERROR(WriteJson(o.json, json));
      continue;
    }
    Row row;
    row.batch = b;
    absl::Status measured = MeasureBatch(engine, o, bytes, row, log);
    for (int64_t s = 0; s < b; ++s) engine.RemoveSequence(s).IgnoreError();  // some may be absent
    if (absl::IsResourceExhausted(measured)) {
      // Too large for the device (weights, KV cache and this batch's activations): a row that
      // says so, not an error, so that the smaller batches' rows stand.
      out_of_memory_at = b;
      out << absl::StrFormat("%7d  out of memory: %s\n", b, measured.message()) << std::flush;
      j["error"] = absl::StrCat("out of memory: ", measured.message());
    } else {
      EPX_RETURN_IF_ERROR(measured);
      const RowNumbers n = Numbers(row, L);
      const std::string frac =
          copy_gbps.has_value() ? absl::StrFormat("%.3f", n.gbps / *copy_gbps) : "-";
      out << absl::StrFormat("%7d %10.3f %11.1f %13.2f %9.3f %9.1f %8s\n", b, n.ms_per_step,
                             n.tokens_per_s, n.experts_per_layer, n.gb_per_step, n.gbps, frac)
          << std::flush;
      j["ms_per_step"] = n.ms_per_step;
      j["tokens_per_s"] = n.tokens_per_s;
      j["experts_hit_per_layer"] = n.experts_per_layer;
      j["GB_per_step"] = n.gb_per_step;
      j["achieved_GBps"] = n.gbps;
      j["fraction_of_copy_bw"] = copy_gbps.has_value() ? Json(n.gbps / *copy_gbps) : Json(nullptr);
      j["step_ms_min"] = *std::min_element(row.step_ms.begin(), row.step_ms.end());
      j["step_ms_p50"] = Percentile(row.step_ms, 50);
      j["prefill_s"] = row.prefill_s;
      j["prefill_steps"] = row.prefill_steps;
    }
    json["rows"].push_back(std::move(j));
    // Rewritten after every row, so that a run cut short keeps what it measured.
    if (!o.json.empty()) EPX_RETURN_IF_ERROR(WriteJson(o.json, json));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunBenchDecode(const BenchDecodeOptions& options, std::ostream& out,
                            std::ostream& log) {
  EPX_RETURN_IF_ERROR(ValidateOptions(options));
  EPX_ASSIGN_OR_RETURN(ModelConfig config, ResolveConfig(options));
  const bool cuda = options.runtime.device == "cuda";

  const int64_t per_seq = options.context + options.warmup_steps + options.steps;
  if (per_seq > config.max_position_embeddings)
    return absl::InvalidArgumentError(absl::StrFormat(
        "--context %d + %d warm-up + %d timed steps = %d positions exceed the model's "
        "max_position_embeddings %d; lower --context or --steps",
        options.context, options.warmup_steps, options.steps, per_seq,
        config.max_position_embeddings));

  RuntimeOptions rt = options.runtime;
  if (!options.preset.empty() || options.num_layers.has_value()) rt.config = config;
  // The KV cache: sized to the run unless the user gave its size, in which case the largest
  // batch must fit (checked here, before minutes of loading weights).
  const int64_t max_batch =
      *std::max_element(options.batch_sizes.begin(), options.batch_sizes.end());
  const int64_t block_size = rt.engine.kv_block_size;
  if (block_size <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("KV block size must be positive, got ", block_size));
  const int64_t blocks_needed = max_batch * ((per_seq + block_size - 1) / block_size);
  const int64_t kv_element_bytes = cuda ? 2 : 4;  // the backends' KV dtypes: bf16, fp32
  const int64_t block_bytes =
      block_size * config.num_hidden_layers * config.kv_size() * 2 * kv_element_bytes;
  if (options.kv_cache_mib > 0) {
    rt.engine.kv_blocks = 0;
    rt.engine.kv_cache_bytes = options.kv_cache_mib << 20;
    const int64_t have = rt.engine.KvBlocks(config, kv_element_bytes);
    if (blocks_needed > have) {
      const int64_t mib_needed = (blocks_needed * block_bytes + (int64_t{1} << 20) - 1) >> 20;
      return absl::InvalidArgumentError(absl::StrFormat(
          "batch %d x %d tokens (--context %d + %d warm-up + %d timed steps) need %d KV cache "
          "blocks of %d tokens, %d MiB; --kv-cache-mib %d holds %d blocks. Raise --kv-cache-mib "
          "to at least %d (or leave it unset to size the cache to the run)",
          max_batch, per_seq, options.context, options.warmup_steps, options.steps, blocks_needed,
          block_size, mib_needed, options.kv_cache_mib, have, mib_needed));
    }
  } else if (rt.engine.kv_blocks <= 0) {
    rt.engine.kv_blocks = blocks_needed;
  }

  // The copy bandwidth, before the weights take the memory its buffers need.
  std::optional<double> copy_gbps;
  if (cuda) {
    // No CUDA build, no device visible or no such ordinal: SetDevice says which.
    const absl::Status set = cuda::SetDevice(rt.cuda.device);
    if (!set.ok()) return absl::Status(set.code(), absl::StrCat("--device cuda: ", set.message()));
    absl::StatusOr<double> gbps = CopyBandwidthGBps();
    if (!gbps.ok())
      return absl::Status(gbps.status().code(),
                          absl::StrCat("measuring the copy bandwidth: ", gbps.status().message()));
    copy_gbps = *gbps;
    log << absl::StrFormat("copy bandwidth %.1f GB/s (read + write)\n", *copy_gbps);
  }

  log << "loading " << (options.preset.empty() ? options.runtime.model_dir : options.preset) << " ("
      << config.num_hidden_layers << " layers) on " << options.runtime.device << "\n"
      << std::flush;
  absl::StatusOr<std::unique_ptr<Runtime>> started = Runtime::Start(rt);
  if (!started.ok()) {
    if (cuda && absl::IsResourceExhausted(started.status()))
      return absl::ResourceExhaustedError(
          absl::StrCat(started.status().message(),
                       " (fewer --num-layers, or --expert-dtype fp8, make the model fit; a smaller "
                       "--kv-cache-mib or fewer --batch-sizes shrink the KV cache)"));
    return started.status();
  }
  std::unique_ptr<Runtime> runtime = *std::move(started);
  if (runtime->is_worker()) return runtime->ServeAsWorker();
  if (runtime->world_size() > 1)
    return runtime->Finish(absl::InvalidArgumentError(
        "bench decode runs in one process holding every expert (its byte model counts the "
        "experts as read on this device); run it without mpirun"));
  absl::Status result = RunOnEngine(options, *runtime, copy_gbps, out, log);
  if (result.ok() && options.stats) runtime->PrintStats(log);
  return runtime->Finish(result);
}

}  // namespace epx
