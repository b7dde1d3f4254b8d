// `epx batch`: a file of requests in OpenAI's batch format answered line for line, here (--model)
// or by a running server (--server).
//
// Each input line is {"custom_id": "...", "method": "POST", "url": "/v1/completions" or
// "/v1/chat/completions", "body": {...}} with the body of the HTTP API (coordinator/http_server.h
// reads it, so a field the API refuses is refused here too; "stream" is not allowed). Blank lines
// are skipped. Every other line gets exactly one output line, in the input's order:
//   {"id": "batch_req_N", "custom_id": ..., "response": {"status_code": 200, "request_id": ...,
//    "body": <the completion>}, "error": null}
// or, for a line that cannot be answered (not JSON, a missing or repeated custom_id, a bad body,
// a failed request):
//   {"id": ..., "custom_id": ... or null, "response": null,
//    "error": {"message": "line N: ...", "type": ..., "param": ..., "code": ..., "line": N}}
// Lines run `concurrency` at a time; results are written in order as soon as those before them
// are, so a stopped run keeps what it finished. On a terminal (stderr) a progress bar shows
// lines done, errors and the rate.
#ifndef EPX_CLI_BATCH_H_
#define EPX_CLI_BATCH_H_

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "cli/client.h"
#include "runtime/runtime.h"

namespace epx {

struct BatchOptions {
  RuntimeOptions runtime;  // --model: load the model and run the lines here
  ClientOptions client;    // --server: send them to a running `epx serve`
  bool remote = false;
  bool stats = false;  // --model: print the layer times and expert load after
  std::string input;
  std::string output;
  int64_t concurrency = 64;  // lines in flight at once
  // Unset: a progress bar when stderr is a terminal.
  std::optional<bool> progress;
};

// Writes `output` (replacing it) and a summary line to `log`. OK when every line was answered,
// even with errors (they are in the file). Errors: InvalidArgument for bad options; NotFound /
// DataLoss for the files; the model's or the server's error when nothing can run (a missing
// model, an unreachable server); Cancelled when a stop signal ended the run (the lines not run
// are written as cancelled).
absl::Status RunBatch(const BatchOptions& options, std::ostream& log);

}  // namespace epx

#endif  // EPX_CLI_BATCH_H_
