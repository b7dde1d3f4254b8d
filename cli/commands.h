// The `epx` subcommands as library functions: main.cc parses flags into these option structs
// and calls one Run...() function. Each returns a Status; output goes to the given streams.
#ifndef EPX_CLI_COMMANDS_H_
#define EPX_CLI_COMMANDS_H_

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "cli/client.h"
#include "common/model_config.h"
#include "coordinator/membership.h"
#include "coordinator/scheduler.h"
#include "coordinator/services.h"
#include "runtime/runtime.h"

namespace epx {

struct EvalOptions {
  RuntimeOptions runtime;   // model directory, placement, role, timeouts
  std::string input;        // golden file with prompt_{i}.tokens and prompt_{i}.greedy
  std::string output;       // written in the golden layout
  bool sequential = false;  // one prompt at a time instead of one batch
  bool stats = false;       // print per-layer timings and expert load at the end
  // Compare with the reference outputs in the input (golden layout): logits within `tolerance`
  // of the largest reference magnitude, greedy tokens exact; FailedPrecondition if not.
  bool check = false;
  double tolerance = 1e-4;
};
// Prefill of every prompt (logits at every position), then greedy decode through the KV cache
// for as many tokens as the input's prompt_{i}.greedy holds. Under mpirun, rank 0 does this and
// the other ranks serve the experts.
absl::Status RunEval(const EvalOptions& options, std::ostream& log);

struct GenerateOptions {
  RuntimeOptions runtime;
  GenerateFlags request;  // prompt, sampling, stops (the same flags as with --server)
  bool stats = false;
};
// Prints the completion to `out` as it is produced, then a newline. The request runs through
// the serving scheduler (one generation loop: BOS, EOS, stop strings, penalties as a server's).
absl::Status RunGenerate(const GenerateOptions& options, std::ostream& out, std::ostream& log);

struct ServeOptions {
  RuntimeOptions runtime;               // model, placement, role, timeouts, KV cache size
  ApiServerOptions server;              // listen address, request size limit
  SchedulerOptions scheduler;           // queue, batch and step budget
  std::string advertise_host;           // host workers reach the control plane at (default:
                                        // the listen host, or this host's name for 0.0.0.0)
  std::string port_file;                // written with the bound port once serving
  std::string http_port_file;           // the same for --http-listen
  // Under mpirun with TLS: the CA the workers check the coordinator's certificate with
  // (--tls-ca); with --tls-client-ca they present the server's --tls-cert and --tls-key.
  std::string tls_ca;
  bool stats = false;                   // print per-layer timings and expert load at the end
  // After a data-plane failure the server stays up, NOT_SERVING, this long (so health checks
  // and load balancers see it) before it exits non-zero for the launcher to restart the job.
  absl::Duration failure_grace = absl::Seconds(5);
};
// `epx serve`: alone, as any rank of an mpirun job (rank 0 serves gRPC, the others serve
// experts and register over the control plane), or as the coordinator of a launcher-free
// cluster (runtime.workers = W: NOT_SERVING until W `epx worker`s registered and the data plane
// formed). Returns at Admin/Shutdown or SIGTERM/SIGINT.
absl::Status RunServe(const ServeOptions& options, std::ostream& log);

struct WorkerOptions {
  RuntimeOptions runtime;  // model, --coordinator, --rank, data plane, device
};
// `epx worker --coordinator HOST:PORT`: registers (retrying until the coordinator answers),
// loads the experts it is given, joins the data plane and serves expert work until the
// coordinator ends the job. A refusal by the coordinator is returned as is.
absl::Status RunWorker(const WorkerOptions& options, std::ostream& log);

struct MakeModelOptions {
  std::string preset = "tiny";
  std::string out_dir;
  uint64_t seed = 0;
  DType dtype = DType::kBF16;
  int64_t shards = 0;  // 0: files of at most 5 GB
  // Only config.json, generation_config.json and tokenizer.model (for --load-format dummy, which
  // makes the weights on the GPU): full-size presets without writing ~90 GB.
  bool config_only = false;
  // Overrides of the preset (unset: keep the preset's value).
  std::optional<int64_t> num_layers, hidden_size, intermediate_size, vocab_size, num_heads,
      num_kv_heads, head_dim, num_experts, num_experts_per_tok, sliding_window,
      max_position_embeddings;
};
// "bf16"/"bfloat16", "fp16"/"float16", "fp32"/"float32"; InvalidArgument otherwise.
absl::StatusOr<DType> ParseWeightDType(const std::string& name);
// NotFound for an unknown preset (the message lists the known ones).
absl::StatusOr<ModelConfig> PresetConfig(const std::string& preset);
// Writes config.json, generation_config.json, tokenizer.model and random weights in the HF
// layout (model.safetensors, or shards with model.safetensors.index.json).
absl::Status RunMakeModel(const MakeModelOptions& options, std::ostream& log);

}  // namespace epx

#endif  // EPX_CLI_COMMANDS_H_
