// `epx bench serve`: loads a running server with concurrent streaming Generate requests and
// reports what a user of it sees: throughput, time to first token, inter-token latency, and
// failures by status code. The numbers include the network and the client; they measure the
// service, not the kernels (bench/ does those).
//
// RunBenchServe is thread-safe as long as the stream is not shared. Over gRPC it keeps
// `concurrency` callback streams open over a few channels; over OpenAI HTTP it runs
// `concurrency` client threads.
#ifndef EPX_CLI_BENCH_SERVE_H_
#define EPX_CLI_BENCH_SERVE_H_

#include <cstdint>
#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "cli/client.h"

namespace epx {

struct BenchServeOptions {
  ClientOptions client;     // timeout_s: the deadline of each request
  int64_t concurrency = 8;  // requests in flight at once (one client thread each)
  int64_t requests = 64;    // in all
  int64_t max_tokens = 64;
  std::string prompt = "Explain expert parallelism in mixture-of-experts models.";
  // > 0: instead of `prompt`, random token-id prompts of this length, one per request, drawn from
  // `seed` and the request's index (the same on every run, whatever the thread timing).
  int64_t prompt_tokens = 0;
  float temperature = 0;
  uint64_t seed = 0;  // request i samples with seed + i
  // Every request generates max_tokens, so that runs compare by the same amount of work.
  bool ignore_eos = true;
  // grpc: epx.v1.Generation/Generate on the callback API (no client thread per stream, so
  // --concurrency 10000 is cheap); openai: streaming POST /v1/completions to --server as the
  // HTTP address (--http-listen), a client thread per stream.
  std::string api = "grpc";
  int64_t connections = 0;  // gRPC channels (connections); 0: one per 500 streams
  std::string csv;  // non-empty: append one line of results (a header first if the file is new)
};

// Asks ModelInfo first (the vocabulary for random prompts, the context limit), then runs the
// requests and prints the report to `out`. Failed requests are counted and reported, not an
// error. Errors: InvalidArgument for bad options; the ModelInfo call's error (server
// unreachable); the first failure when every request failed; the CSV file's error.
absl::Status RunBenchServe(const BenchServeOptions& options, std::ostream& out);

}  // namespace epx

#endif  // EPX_CLI_BENCH_SERVE_H_
