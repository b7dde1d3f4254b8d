// epx: the command-line entry point. Parses flags and calls one Run...() of cli/commands.h.
#include <initializer_list>
#include <iostream>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "cli/batch.h"
#include "cli/bench_decode.h"
#include "cli/bench_serve.h"
#include "cli/client.h"
#include "cli/commands.h"

namespace {

int Finish(const absl::Status& status) {
  if (status.ok()) return 0;
  std::cerr << "epx: error: " << status.message() << "\n";
  return 1;
}

// Flags that only one way of running a command understands are an error, not silently ignored.
// (Flags the command does not have are skipped.)
absl::Status RejectFlags(const CLI::App& cmd, std::initializer_list<const char*> flags,
                         absl::string_view why) {
  for (const char* flag : flags)
    if (cmd.get_option_no_throw(flag) != nullptr && cmd.count(flag) > 0)
      return absl::InvalidArgumentError(absl::StrCat(cmd.get_name(), ": ", flag, " ", why));
  return absl::OkStatus();
}

// `epx generate` and `epx batch` run here (--model) or on a running server (--server); a flag
// of the other way is an error. `doing` names the work ("generating").
absl::Status CheckHereOrServer(const CLI::App& cmd, const std::string& model_dir,
                               absl::string_view doing) {
  if (cmd.count("--server") == 0) {
    if (model_dir.empty())
      return absl::InvalidArgumentError(absl::StrCat(cmd.get_name(), " needs --model or --server"));
    // (not the keys: they may come from the environment, and mean nothing here)
    return RejectFlags(cmd, {"--timeout", "--tls-ca", "--tls-cert", "--tls-key"},
                       "is for --server");
  }
  return RejectFlags(cmd,
                     {"--model", "--placement", "--replicas", "--role", "--comm-timeout", "--stats",
                      "--workers", "--listen", "--data-plane"},
                     absl::StrCat("is for ", doing,
                                  " here; not with --server (see `epx stats` for the server's)"));
}

}  // namespace

int Run(int argc, char** argv);

int main(int argc, char** argv) {
  // Library code returns Status; what can still escape is the standard library's: out of memory.
  try {
    return Run(argc, argv);
  } catch (const std::bad_alloc&) {
    std::cerr << "epx: error: out of memory\n";
  } catch (const std::exception& e) {
    std::cerr << "epx: error: " << e.what() << "\n";
  }
  return 1;
}

int Run(int argc, char** argv) {
  CLI::App app{"epx: expert-parallel inference for Mixtral-family MoE models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", epx::BuildId());

  // Where the model (or a worker's experts) compute.
  auto add_device_options = [](CLI::App* cmd, epx::RuntimeOptions* rt) {
    cmd->add_option("--device", rt->device,
                    "where the coordinator (and local experts) compute: cpu or cuda")
        ->capture_default_str()
        ->check(CLI::IsMember({"cpu", "cuda"}));
    rt->cuda_device_from_local_rank = true;
    cmd->add_option_function<int>(
           "--cuda-device",
           [rt](int device) {
             rt->cuda.device = device;
             rt->cuda_device_from_local_rank = false;
           },
           "--device cuda: the GPU ordinal (default: the local rank under a launcher, else 0)")
        ->check(CLI::NonNegativeNumber);
    cmd->add_option_function<std::string>(
           "--expert-dtype",
           [rt](const std::string& name) {
             rt->cuda.expert_dtype = name == "fp8" ? epx::DType::kF8E4M3 : epx::DType::kBF16;
           },
           "--device cuda: expert weights as bf16, or fp8 (e4m3, a scale per row)")
        ->check(CLI::IsMember({"bf16", "fp8"}));
    cmd->add_option("--grouped-gemm", rt->cuda.grouped_gemm,
                    "--device cuda: expert GEMMs by auto, skinny, cublas-loop or cublas-grouped")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "skinny", "cublas-loop", "cublas-grouped"}));
  };
  // How the ranks of a job exchange rows, and the secret of a launcher-free cluster.
  auto add_cluster_options = [](CLI::App* cmd, epx::RuntimeOptions* rt, std::string* token_file) {
    cmd->add_option("--data-plane", rt->data_plane,
                    "auto (mpi under mpirun, gloo otherwise), mpi, gloo or nccl; every rank "
                    "must resolve to the same")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "mpi", "gloo", "nccl"}));
    cmd->add_option("--data-plane-host", rt->data_plane_host,
                    "address this rank's data plane listens on and advertises (default: the "
                    "coordinator's --listen host; a worker's address towards the coordinator)");
    cmd->add_option("--cluster-token-file", *token_file,
                    "launcher-free cluster: a file holding the secret every process presents "
                    "on the control plane (default: $EPX_CLUSTER_TOKEN, else none)");
  };
  // Options of every command that runs the model, alone or as one rank of a job.
  auto add_runtime_options = [&](CLI::App* cmd, epx::RuntimeOptions* rt, double* timeout_s,
                                 bool* stats, bool model_required, std::string* token_file) {
    cmd->add_option("--model", rt->model_dir, "HF model directory")->required(model_required);
    cmd->add_option("--placement", rt->placement,
                    "expert placement of a multi-rank job: round-robin or a JSON file "
                    "{\"experts\": {\"0\": [1, 2], ...}}")
        ->capture_default_str();
    cmd->add_option("--replicas", rt->replicas,
                    "round-robin placement: copies of every expert, on distinct workers (2 or "
                    "more lets a launcher-free cluster lose a worker and keep serving)")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--role", rt->role, "coordinator or worker (MPMD launches; default: by rank)")
        ->check(CLI::IsMember({"coordinator", "worker"}));
    cmd->add_option("--comm-timeout", *timeout_s,
                    "seconds a rank waits for a peer before reporting it")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_flag("--stats", *stats,
                  "print per-layer attention/dispatch/expert/combine time and expert load");
    add_device_options(cmd, rt);
    add_cluster_options(cmd, rt, token_file);
    cmd->add_option("--load-format", rt->load_format,
                    "auto: the checkpoint; dummy: synthetic weights at the config's shapes, made "
                    "on the GPU (--device cuda; --model needs only config.json)")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "dummy"}));
    cmd->add_option("--dummy-seed", rt->cuda.dummy_seed, "--load-format dummy: the weights' seed")
        ->capture_default_str();
    cmd->add_option("--workers", rt->workers,
                    "form a cluster without mpirun: wait for this many `epx worker "
                    "--coordinator` processes to register at --listen, then run")
        ->check(CLI::PositiveNumber);
  };
  // The control plane of eval and generate (serve's --listen serves the API and it alike).
  auto add_listen_option = [](CLI::App* cmd, epx::RuntimeOptions* rt) {
    cmd->add_option("--listen", rt->listen,
                    "--workers: HOST:PORT of the control plane the workers register at")
        ->capture_default_str();
  };
  std::string token_file;

  epx::EvalOptions eval;
  double eval_timeout_s = 30;
  CLI::App* eval_cmd = app.add_subcommand(
      "eval", "Prefill and greedy-decode the prompts of a golden file; write logits and tokens");
  add_runtime_options(eval_cmd, &eval.runtime, &eval_timeout_s, &eval.stats, true, &token_file);
  add_listen_option(eval_cmd, &eval.runtime);
  eval_cmd->add_option("--input", eval.input, "safetensors with prompt_{i}.tokens/.greedy")
      ->required();
  eval_cmd->add_option("--output", eval.output, "safetensors to write")->required();
  eval_cmd->add_flag("--sequential", eval.sequential, "one prompt at a time, not one batch");
  eval_cmd->add_flag("--check", eval.check,
                     "compare with the input's reference logits and greedy tokens; fail if they "
                     "differ");
  eval_cmd
      ->add_option("--tolerance", eval.tolerance,
                   "--check: largest error relative to the largest reference logit")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  // TLS and bearer keys of a client of `epx serve` (security/auth.h).
  auto add_client_security = [](CLI::App* cmd, epx::ClientOptions* client) {
    cmd->add_option("--tls-ca", client->tls.ca_file,
                    "connect over TLS, checking the server against this CA (PEM)");
    cmd->add_option("--tls-cert", client->tls.cert_file,
                    "TLS: this client's certificate (PEM), for a server that requires one");
    cmd->add_option("--tls-key", client->tls.key_file, "TLS: the key of --tls-cert (PEM)");
    cmd->add_option("--api-key", client->api_key,
                    "send \"authorization: Bearer KEY\" (default: $EPX_API_KEY)")
        ->envname("EPX_API_KEY");
    cmd->add_option("--admin-key", client->admin_key,
                    "the key admin calls send instead (default: $EPX_ADMIN_KEY)")
        ->envname("EPX_ADMIN_KEY");
  };

  epx::GenerateOptions gen;
  double gen_timeout_s = 30;
  epx::RemoteGenerateOptions remote_gen;
  uint64_t gen_seed = 0;
  CLI::App* gen_cmd = app.add_subcommand(
      "generate", "Generate text from a prompt: here (--model) or on a running server (--server)");
  // --model is required unless --server is given; checked after parsing for a clearer message.
  add_runtime_options(gen_cmd, &gen.runtime, &gen_timeout_s, &gen.stats, false, &token_file);
  add_listen_option(gen_cmd, &gen.runtime);
  gen_cmd->add_option("--server", remote_gen.client.server,
                      "HOST:PORT of a running `epx serve`: generate there instead of loading "
                      "--model here");
  gen_cmd->add_option("--prompt", gen.request.prompt, "prompt text")->required();
  gen_cmd->add_option("--max-tokens", gen.request.max_tokens, "tokens to generate at most")
      ->capture_default_str();
  gen_cmd->add_option("--temperature", gen.request.temperature, "0 = greedy")
      ->capture_default_str();
  gen_cmd->add_option("--top-k", gen.request.top_k, "keep the k most likely tokens (0 = all)")
      ->capture_default_str();
  gen_cmd->add_option("--top-p", gen.request.top_p, "nucleus probability mass in (0, 1]")
      ->capture_default_str();
  gen_cmd->add_option("--seed", gen_seed, "sampling seed (drawn at random if unset)")
      ->capture_default_str();
  gen_cmd
      ->add_option("--repetition-penalty", gen.request.repetition_penalty,
                   "> 0, 1 = none; divides the logits of tokens already seen")
      ->capture_default_str();
  // One value per flag, so that a stop string is never taken for the next flag's value.
  gen_cmd->add_option("--stop", gen.request.stop, "stop before this text (repeatable)")
      ->allow_extra_args(false);
  gen_cmd
      ->add_option("--stop-token-id", gen.request.stop_token_ids,
                   "stop after this token id (repeatable)")
      ->allow_extra_args(false);
  gen_cmd->add_flag("--chat", gen.request.chat,
                    "the prompt is a user message in the model's chat template");
  std::string gen_system;
  gen_cmd->add_option("--system", gen_system, "--chat: system message");
  gen_cmd->add_flag("--ignore-eos", gen.request.ignore_eos,
                    "keep generating after the end-of-sequence token");
  gen_cmd->add_flag("--usage", gen.request.usage,
                    "print the finish reason and token counts to stderr");
  gen_cmd
      ->add_option("--timeout", remote_gen.client.timeout_s,
                   "--server: seconds the request may take in all")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  add_client_security(gen_cmd, &remote_gen.client);

  // Commands that talk to a running `epx serve` (cli/client.h).
  auto add_client_options = [&](CLI::App* cmd, epx::ClientOptions* client) {
    cmd->add_option("--server", client->server, "HOST:PORT of a running `epx serve`")
        ->capture_default_str();
    cmd->add_option("--timeout", client->timeout_s, "deadline of the call in seconds")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    add_client_security(cmd, client);
  };

  epx::ClientOptions health;
  std::string health_service;
  bool health_wait = false;
  CLI::App* health_cmd =
      app.add_subcommand("health", "Ask a server's grpc.health.v1 service; exit 0 when SERVING");
  add_client_options(health_cmd, &health);
  health_cmd->add_option("--service", health_service,
                         "\"\" (default): the process is up; epx.v1.Generation: it takes "
                         "requests");
  health_cmd->add_flag("--wait", health_wait,
                       "poll every 200 ms until SERVING or --timeout, retrying connection "
                       "failures");

  epx::ClientOptions stats;
  bool stats_json = false;
  CLI::App* stats_cmd = app.add_subcommand(
      "stats", "A server's state, queue, KV cache, counters, expert load, layer times, workers");
  add_client_options(stats_cmd, &stats);
  stats_cmd->add_flag("--json", stats_json, "print the StatsResponse as JSON");

  epx::ClientOptions drain;
  bool drain_wait = false;
  CLI::App* drain_cmd = app.add_subcommand(
      "drain", "Stop a server admitting requests; the running and queued ones finish");
  add_client_options(drain_cmd, &drain);
  drain_cmd->add_flag("--wait", drain_wait, "return when nothing is left (or at --timeout)");

  int drain_rank = 0;
  drain_cmd
      ->add_option("--rank", drain_rank,
                   "drain one worker instead: it hands its experts to the others and leaves "
                   "(launcher-free cluster); --wait: until it left")
      ->check(CLI::PositiveNumber);

  epx::ClientOptions placement_client;
  std::string placement_set;
  bool placement_wait = false;
  CLI::App* placement_cmd = app.add_subcommand(
      "placement", "A server's expert placement; --set FILE moves it to another while serving");
  add_client_options(placement_cmd, &placement_client);
  placement_cmd
      ->add_option("--set", placement_set,
                   "a placement file in worker ranks ({\"experts\": {\"0\": [1, 2], "
                   "...}}): the workers load it in the background, then it is used")
      ->check(CLI::ExistingFile);
  placement_cmd->add_flag("--wait", placement_wait, "--set: return once it is in use");

  epx::ClientOptions shutdown;
  bool shutdown_drain = false;
  CLI::App* shutdown_cmd = app.add_subcommand(
      "shutdown", "End a server: running requests are cancelled, queued ones refused");
  add_client_options(shutdown_cmd, &shutdown);
  shutdown_cmd->add_flag("--drain", shutdown_drain, "drain first, so every request finishes");

  epx::ClientOptions model_info;
  CLI::App* model_info_cmd = app.add_subcommand(
      "model-info", "A server's model configuration, placement and limits as JSON");
  add_client_options(model_info_cmd, &model_info);

  CLI::App* bench_cmd = app.add_subcommand(
      "bench", "Benchmarks: a running server (serve), the model on this device (decode)");
  bench_cmd->require_subcommand(1);
  epx::BatchOptions batch;
  double batch_timeout_s = 30;
  CLI::App* batch_cmd = app.add_subcommand(
      "batch",
      "Answer a file of OpenAI batch lines (/v1/completions, /v1/chat/completions) line for line: "
      "here (--model) or on a running server (--server)");
  add_runtime_options(batch_cmd, &batch.runtime, &batch_timeout_s, &batch.stats, false,
                      &token_file);
  batch_cmd->add_option("--server", batch.client.server,
                        "HOST:PORT of a running `epx serve`: answer there instead of loading "
                        "--model here");
  batch_cmd
      ->add_option("--timeout", batch.client.timeout_s,
                   "--server: seconds each line's request may take")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  add_client_security(batch_cmd, &batch.client);
  batch_cmd->add_option("--input", batch.input, "JSONL of {custom_id, method, url, body}")
      ->required();
  batch_cmd->add_option("--output", batch.output, "JSONL of results, one per input line, in order")
      ->required();
  batch_cmd->add_option("--concurrency", batch.concurrency, "lines in flight at once")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bool batch_progress = false;
  CLI::Option* batch_progress_flag =
      batch_cmd->add_flag("--progress,!--no-progress", batch_progress,
                          "a progress bar on stderr (default: when stderr is a terminal)");

  epx::BenchServeOptions bench_serve;
  CLI::App* bench_serve_cmd = bench_cmd->add_subcommand(
      "serve", "Concurrent streaming requests: throughput, TTFT, ITL, failures");
  add_client_options(bench_serve_cmd, &bench_serve.client);
  bench_serve_cmd
      ->add_option("--concurrency", bench_serve.concurrency, "requests in flight at once")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_serve_cmd->add_option("--requests", bench_serve.requests, "requests in all")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_serve_cmd->add_option("--max-tokens", bench_serve.max_tokens, "tokens per request")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  CLI::Option* bench_prompt =
      bench_serve_cmd->add_option("--prompt", bench_serve.prompt, "the prompt of every request");
  bench_serve_cmd
      ->add_option("--prompt-tokens", bench_serve.prompt_tokens,
                   "instead of --prompt: random token-id prompts of this length (from --seed)")
      ->check(CLI::PositiveNumber)
      ->excludes(bench_prompt);
  bench_serve_cmd->add_option("--temperature", bench_serve.temperature, "0 = greedy")
      ->capture_default_str();
  bench_serve_cmd->add_option("--seed", bench_serve.seed, "request i samples with seed + i")
      ->capture_default_str();
  bench_serve_cmd->add_flag("--ignore-eos,!--no-ignore-eos", bench_serve.ignore_eos,
                            "generate --max-tokens even past the end-of-sequence token "
                            "(default on)");
  bench_serve_cmd
      ->add_option("--api", bench_serve.api,
                   "grpc: epx.v1.Generation; openai: POST /v1/completions to --server as the "
                   "--http-listen address")
      ->capture_default_str()
      ->check(CLI::IsMember({"grpc", "openai"}));
  bench_serve_cmd
      ->add_option("--connections", bench_serve.connections,
                   "gRPC connections the streams spread over (0: one per 500 streams)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  bench_serve_cmd->add_option("--csv", bench_serve.csv,
                              "append one line of results to this file (header if new)");

  epx::BenchDecodeOptions bench_decode;
  double bench_decode_timeout_s = 30;
  CLI::App* bench_decode_cmd = bench_cmd->add_subcommand(
      "decode",
      "Whole-model decode steps here, by batch size: ms/step, tokens/s, bytes read per step as "
      "a fraction of the device's copy bandwidth");
  add_runtime_options(bench_decode_cmd, &bench_decode.runtime, &bench_decode_timeout_s,
                      &bench_decode.stats, false, &token_file);
  bench_decode_cmd
      ->add_option("--preset", bench_decode.preset,
                   "--load-format dummy: this shape instead of --model (tiny, small, "
                   "mixtral-8x7b, mixtral-8x22b)")
      ->check(CLI::IsMember({"tiny", "small", "mixtral-8x7b", "mixtral-8x22b"}));
  bench_decode_cmd->add_option("--num-layers", bench_decode.num_layers,
                               "--load-format dummy: override num_hidden_layers (to fit the "
                               "device)");
  bench_decode_cmd
      ->add_option("--batch-sizes", bench_decode.batch_sizes,
                   "comma-separated batch sizes, one table row each")
      ->delimiter(',')
      ->capture_default_str();
  bench_decode_cmd
      ->add_option("--context", bench_decode.context,
                   "random prompt tokens per sequence, prefilled before the decode steps")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_decode_cmd->add_option("--steps", bench_decode.steps, "timed decode steps per batch size")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_decode_cmd
      ->add_option("--warmup", bench_decode.warmup_steps, "decode steps before the timed ones")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  bench_decode_cmd
      ->add_option("--prefill-chunk", bench_decode.prefill_chunk_tokens,
                   "prompt tokens per prefill step at most")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_decode_cmd->add_option("--seed", bench_decode.seed, "seed of the random token ids")
      ->capture_default_str();
  bench_decode_cmd
      ->add_option("--kv-cache-mib", bench_decode.kv_cache_mib,
                   "KV cache memory in MiB (default: what the largest batch needs)")
      ->check(CLI::PositiveNumber);
  bench_decode_cmd->add_option("--json", bench_decode.json, "also write the results to this file");

  epx::ServeOptions serve;
  double serve_timeout_s = 30, heartbeat_ms = 500, heartbeat_timeout_ms = 3000,
         failure_grace_s = 5;
  int64_t kv_cache_mib = 2048;
  CLI::App* serve_cmd = app.add_subcommand(
      "serve",
      "Serve the model over gRPC (alone, as any rank of an mpirun job, or as the coordinator of "
      "--workers W)");
  add_runtime_options(serve_cmd, &serve.runtime, &serve_timeout_s, &serve.stats, true, &token_file);
  serve_cmd->add_option("--listen", serve.server.listen, "HOST:PORT to serve on (port 0: any)")
      ->capture_default_str();
  serve_cmd->add_option("--port-file", serve.port_file,
                        "write the bound port to this file once serving");
  serve_cmd->add_option("--advertise-host", serve.advertise_host,
                        "host the workers reach the control plane at (default: the --listen "
                        "host, or this host's name for 0.0.0.0)");
  serve_cmd->add_option("--max-queue", serve.scheduler.max_queue,
                        "requests waiting beyond the running ones; more: RESOURCE_EXHAUSTED")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  serve_cmd->add_option("--max-running", serve.scheduler.max_running,
                        "sequences in one batch")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--max-batch-tokens", serve.scheduler.max_batch_tokens,
                        "tokens in one step: decode tokens plus prompt chunks")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd
      ->add_option("--rebalance-interval", serve.runtime.rebalance_interval,
                   "launcher-free cluster: every STEPS steps, give the experts "
                   "routed the most tokens extra replicas (loaded in the background, "
                   "switched between two steps); 0: never")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  serve_cmd
      ->add_option("--max-workers", serve.runtime.max_workers,
                   "launcher-free cluster: workers it may grow to as more join "
                   "after --workers")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--kv-block-size", serve.runtime.engine.kv_block_size,
                        "tokens per KV cache block")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{4096}));
  serve_cmd->add_option("--kv-blocks", serve.runtime.engine.kv_blocks,
                        "KV cache blocks (default: as many as --kv-cache-mib holds)")
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--kv-cache-mib", kv_cache_mib, "KV cache memory in MiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--http-listen", serve.server.http_listen,
                        "HOST:PORT of the OpenAI-compatible HTTP API (/v1/completions, "
                        "/v1/chat/completions, /v1/models), /health, /ready and /metrics "
                        "(port 0: any); off unless given");
  serve_cmd
      ->add_option("--http-threads", serve.server.http_threads,
                   "HTTP connections served at once (each open stream holds one)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--http-port-file", serve.http_port_file,
                        "write the bound HTTP port to this file once serving");
  serve_cmd->add_option("--tls-cert", serve.server.tls.cert_file,
                        "serve gRPC and HTTP over TLS with this certificate (chain, PEM)");
  serve_cmd->add_option("--tls-key", serve.server.tls.key_file, "TLS: the key of --tls-cert (PEM)");
  serve_cmd->add_option("--tls-client-ca", serve.server.tls.client_ca_file,
                        "TLS: require client certificates signed by this CA (PEM; mutual TLS)");
  serve_cmd->add_option("--tls-ca", serve.tls_ca,
                        "TLS under mpirun: the CA of --tls-cert, which the workers check the "
                        "coordinator with");
  serve_cmd
      ->add_option("--api-key", serve.server.keys.api_key,
                   "client and admin calls need \"authorization: Bearer KEY\" (gRPC and HTTP "
                   "/v1/; health, readiness and /metrics stay open; default: $EPX_API_KEY)")
      ->envname("EPX_API_KEY");
  serve_cmd
      ->add_option("--admin-key", serve.server.keys.admin_key,
                   "admin calls (drain, shutdown, placement) need this key instead "
                   "(default: $EPX_ADMIN_KEY)")
      ->envname("EPX_ADMIN_KEY");
  serve_cmd->add_option("--max-request-bytes", serve.server.max_request_bytes,
                        "larger requests are refused with INVALID_ARGUMENT")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--heartbeat-ms", heartbeat_ms, "worker heartbeat interval")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--heartbeat-timeout-ms", heartbeat_timeout_ms,
                        "a worker silent this long is lost: readiness NOT_SERVING")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--failure-grace-s", failure_grace_s,
                        "after a data-plane failure, stay up NOT_SERVING this long, then exit 1")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);

  epx::WorkerOptions worker;
  double register_timeout_s = 600;
  CLI::App* worker_cmd = app.add_subcommand(
      "worker", "Serve experts for a coordinator started with --workers W (no launcher needed)");
  worker_cmd->add_option("--model", worker.runtime.model_dir, "HF model directory")->required();
  worker_cmd->add_option("--coordinator", worker.runtime.coordinator,
                         "HOST:PORT of the coordinator's --listen")
      ->required();
  worker_cmd->add_option("--rank", worker.runtime.rank,
                         "ask for this rank (1..W; default: the coordinator assigns one)")
      ->check(CLI::PositiveNumber);
  worker_cmd->add_option("--register-timeout", register_timeout_s,
                         "seconds to keep trying to reach the coordinator")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  add_device_options(worker_cmd, &worker.runtime);
  add_cluster_options(worker_cmd, &worker.runtime, &token_file);
  worker_cmd->add_option("--tls-ca", worker.runtime.coordinator_tls.ca_file,
                         "reach a coordinator served over TLS, checking it against this CA (PEM)");
  worker_cmd->add_option("--tls-cert", worker.runtime.coordinator_tls.cert_file,
                         "TLS: this worker's certificate (PEM), for a coordinator that requires "
                         "one");
  worker_cmd->add_option("--tls-key", worker.runtime.coordinator_tls.key_file,
                         "TLS: the key of --tls-cert (PEM)");

  epx::MakeModelOptions mm;
  std::string dtype = "bf16";
  CLI::App* mm_cmd =
      app.add_subcommand("make-model", "Write a random checkpoint in the Hugging Face layout");
  mm_cmd->add_option("--preset", mm.preset, "tiny, small, mixtral-8x7b, mixtral-8x22b")
      ->capture_default_str();
  mm_cmd->add_option("--out", mm.out_dir, "output directory")->required();
  mm_cmd->add_option("--seed", mm.seed, "weight seed")->capture_default_str();
  mm_cmd->add_option("--dtype", dtype, "bf16, fp16 or fp32")->capture_default_str();
  mm_cmd
      ->add_option(
          "--shards", mm.shards,
          "split the weights into up to N files of about equal size (0: files of at most 5 GB)")
      ->capture_default_str();
  mm_cmd->add_flag("--config-only", mm.config_only,
                   "write the config and tokenizer but no weights (for --load-format dummy)");
  mm_cmd->add_option("--num-layers", mm.num_layers, "override num_hidden_layers");
  mm_cmd->add_option("--hidden-size", mm.hidden_size, "override hidden_size");
  mm_cmd->add_option("--intermediate-size", mm.intermediate_size, "override intermediate_size");
  mm_cmd->add_option("--vocab-size", mm.vocab_size, "override vocab_size (>= 512)");
  mm_cmd->add_option("--num-heads", mm.num_heads, "override num_attention_heads");
  mm_cmd->add_option("--num-kv-heads", mm.num_kv_heads, "override num_key_value_heads");
  mm_cmd->add_option("--head-dim", mm.head_dim, "override head_dim");
  mm_cmd->add_option("--num-experts", mm.num_experts, "override num_local_experts");
  mm_cmd->add_option("--experts-per-tok", mm.num_experts_per_tok,
                     "override num_experts_per_tok (top-k of the router)");
  mm_cmd->add_option("--sliding-window", mm.sliding_window, "override sliding_window (0 = none)");
  mm_cmd->add_option("--max-position-embeddings", mm.max_position_embeddings,
                     "override max_position_embeddings");

  CLI11_PARSE(app, argc, argv);

  // One cluster secret for whichever command runs.
  absl::StatusOr<std::string> token = epx::ClusterToken(token_file);
  if (!token.ok()) return Finish(token.status());
  for (epx::RuntimeOptions* rt :
       {&eval.runtime, &gen.runtime, &serve.runtime, &worker.runtime, &batch.runtime})
    rt->cluster_token = *token;

  eval.runtime.comm_timeout = absl::Seconds(eval_timeout_s);
  gen.runtime.comm_timeout = absl::Seconds(gen_timeout_s);
  if (eval_cmd->parsed()) return Finish(epx::RunEval(eval, std::cerr));
  if (gen_cmd->parsed()) {
    if (gen_cmd->count("--seed") > 0) gen.request.seed = gen_seed;
    if (gen_cmd->count("--system") > 0) gen.request.system = gen_system;
    absl::Status flags = CheckHereOrServer(*gen_cmd, gen.runtime.model_dir, "generating");
    if (!flags.ok()) return Finish(flags);
    if (gen_cmd->count("--server") == 0) return Finish(epx::RunGenerate(gen, std::cout, std::cerr));
    remote_gen.request = gen.request;
    return Finish(epx::RunRemoteGenerate(remote_gen, std::cout, std::cerr));
  }
  if (batch_cmd->parsed()) {
    if (batch_progress_flag->count() > 0) batch.progress = batch_progress;
    absl::Status flags = CheckHereOrServer(*batch_cmd, batch.runtime.model_dir, "answering");
    if (!flags.ok()) return Finish(flags);
    batch.remote = batch_cmd->count("--server") > 0;
    batch.runtime.comm_timeout = absl::Seconds(batch_timeout_s);
    return Finish(epx::RunBatch(batch, std::cerr));
  }
  if (health_cmd->parsed())
    return Finish(epx::RunHealth(health, health_service, health_wait, std::cout));
  if (stats_cmd->parsed()) return Finish(epx::RunStats(stats, stats_json, std::cout));
  if (drain_cmd->parsed() && drain_rank > 0)
    return Finish(epx::RunDrainWorker(drain, drain_rank, drain_wait, std::cout));
  if (drain_cmd->parsed()) return Finish(epx::RunDrain(drain, drain_wait, std::cout));
  if (placement_cmd->parsed())
    return Finish(epx::RunPlacement(placement_client, placement_set, placement_wait, std::cout));
  if (shutdown_cmd->parsed()) return Finish(epx::RunShutdown(shutdown, shutdown_drain, std::cout));
  if (model_info_cmd->parsed()) return Finish(epx::RunModelInfo(model_info, std::cout));
  if (bench_serve_cmd->parsed()) return Finish(epx::RunBenchServe(bench_serve, std::cout));
  if (bench_decode_cmd->parsed()) {
    bench_decode.runtime.comm_timeout = absl::Seconds(bench_decode_timeout_s);
    return Finish(epx::RunBenchDecode(bench_decode, std::cout, std::cerr));
  }
  if (serve_cmd->parsed()) {
    serve.runtime.comm_timeout = absl::Seconds(serve_timeout_s);
    serve.runtime.engine.kv_cache_bytes = kv_cache_mib << 20;
    serve.runtime.membership.heartbeat_interval = absl::Milliseconds(heartbeat_ms);
    serve.runtime.membership.heartbeat_timeout = absl::Milliseconds(heartbeat_timeout_ms);
    serve.failure_grace = absl::Seconds(failure_grace_s);
    return Finish(epx::RunServe(serve, std::cerr));
  }
  if (worker_cmd->parsed()) {
    worker.runtime.register_timeout = absl::Seconds(register_timeout_s);
    return Finish(epx::RunWorker(worker, std::cerr));
  }
  if (mm_cmd->parsed()) {
    absl::StatusOr<epx::DType> parsed = epx::ParseWeightDType(dtype);
    if (!parsed.ok()) return Finish(parsed.status());
    mm.dtype = *parsed;
    return Finish(epx::RunMakeModel(mm, std::cerr));
  }
  return 2;
}
