#include "coordinator/http_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "common/json.h"
#include "common/logging.h"
#include "common/status.h"
#include "coordinator/dashboard/assets.h"

namespace epx {

using nlohmann::json;

namespace openai {
namespace {

absl::Status Bad(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("\"", field, "\" ", what));
}

absl::StatusOr<double> Number(const json& v, absl::string_view field) {
  if (!v.is_number()) return Bad(field, "must be a number");
  return v.get<double>();
}

absl::StatusOr<int64_t> Integer(const json& v, absl::string_view field) {
  if (v.is_number_unsigned()) {
    if (v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) return Bad(field, "is too large");
    return static_cast<int64_t>(v.get<uint64_t>());
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float() &&
      v.get<double>() == static_cast<double>(static_cast<int64_t>(v.get<double>())))
    return static_cast<int64_t>(v.get<double>());
  return Bad(field, "must be an integer");
}

absl::StatusOr<bool> Bool(const json& v, absl::string_view field) {
  if (!v.is_boolean()) return Bad(field, "must be true or false");
  return v.get<bool>();
}

absl::StatusOr<std::vector<int32_t>> TokenIds(const json& v, absl::string_view field) {
  std::vector<int32_t> ids;
  for (const json& id : v) {
    EPX_ASSIGN_OR_RETURN(int64_t i, Integer(id, field));
    if (i < 0 || i > INT32_MAX)
      return Bad(field, absl::StrCat("has token id ", i, " out of range"));
    ids.push_back(static_cast<int32_t>(i));
  }
  return ids;
}

absl::Status ReadPrompt(const json& v, GenerationParams& p) {
  // A string, a list of token ids, or a list of one of either (a batch of one).
  const json* one = &v;
  if (v.is_array() && v.size() == 1 && (v[0].is_string() || v[0].is_array())) one = &v[0];
  if (one->is_string()) {
    p.text = one->get<std::string>();
    return absl::OkStatus();
  }
  if (one->is_array() && !one->empty() && (*one)[0].is_number()) {
    EPX_ASSIGN_OR_RETURN(p.token_ids, TokenIds(*one, "prompt"));
    return absl::OkStatus();
  }
  if (v.is_array() && v.size() > 1 && (v[0].is_string() || v[0].is_array()))
    return Bad("prompt", "holds several prompts; this server takes one per request");
  return Bad("prompt", "must be a string or a list of token ids");
}

absl::Status ReadMessages(const json& v, GenerationParams& p) {
  if (!v.is_array() || v.empty()) return Bad("messages", "must be a non-empty list");
  p.chat.emplace();
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string field = absl::StrCat("messages[", i, "]");
    const json& m = v[i];
    if (!m.is_object()) return Bad(field, "must be an object");
    ChatMessage message;
    for (const auto& [key, value] : m.items()) {
      if (key == "role") {
        if (!value.is_string()) return Bad(field + ".role", "must be a string");
        message.role = value.get<std::string>();
      } else if (key == "content") {
        if (value.is_string()) {
          message.content = value.get<std::string>();
        } else if (value.is_array()) {
          for (const json& part : value) {
            if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
                !part["text"].is_string())
              return Bad(field + ".content", "parts must be {\"type\": \"text\", \"text\": ...}");
            message.content += part["text"].get<std::string>();
          }
        } else {
          return Bad(field + ".content", "must be a string or a list of text parts");
        }
      } else if (key == "name") {
        if (!value.is_string()) return Bad(field + ".name", "must be a string");
      } else {
        return Bad(absl::StrCat(field, ".", key), "is not supported");
      }
    }
    if (message.role.empty()) return Bad(field + ".role", "is missing");
    p.chat->push_back(std::move(message));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ParsedRequest> ParseRequest(const json& body, bool chat) {
  if (!body.is_object())
    return absl::InvalidArgumentError("the request body must be a JSON object");
  ParsedRequest r;
  GenerationParams& p = r.params;
  p.max_tokens_to_context = chat;
  bool has_prompt = false;
  for (const auto& [key, v] : body.items()) {
    // null is "not given" for every optional field, as OpenAI's clients send it.
    if (v.is_null() && key != "prompt" && key != "messages") continue;
    if (key == "model") {
      if (!v.is_string()) return Bad(key, "must be a string");
      r.model = v.get<std::string>();
    } else if (!chat && key == "prompt") {
      EPX_RETURN_IF_ERROR(ReadPrompt(v, p));
      has_prompt = true;
    } else if (chat && key == "messages") {
      EPX_RETURN_IF_ERROR(ReadMessages(v, p));
      has_prompt = true;
    } else if (key == "max_tokens" || (chat && key == "max_completion_tokens")) {
      EPX_ASSIGN_OR_RETURN(int64_t n, Integer(v, key));
      if (n < 1) return Bad(key, absl::StrCat("must be at least 1 (got ", n, ")"));
      p.max_tokens = n;
    } else if (key == "temperature") {
      EPX_ASSIGN_OR_RETURN(double t, Number(v, key));
      p.temperature = static_cast<float>(t);
    } else if (key == "top_p") {
      EPX_ASSIGN_OR_RETURN(double t, Number(v, key));
      p.top_p = static_cast<float>(t);
    } else if (key == "top_k") {
      EPX_ASSIGN_OR_RETURN(int64_t k, Integer(v, key));
      if (k < -1 || k > INT32_MAX) return Bad(key, "must be -1, 0 (all tokens) or positive");
      p.top_k = static_cast<int32_t>(k);
    } else if (key == "repetition_penalty") {
      EPX_ASSIGN_OR_RETURN(double t, Number(v, key));
      p.repetition_penalty = static_cast<float>(t);
    } else if (key == "seed") {
      EPX_ASSIGN_OR_RETURN(int64_t s, Integer(v, key));
      p.seed = static_cast<uint64_t>(s);
    } else if (key == "stop") {
      if (v.is_string()) {
        p.stop.push_back(v.get<std::string>());
      } else if (v.is_array()) {
        for (const json& s : v) {
          if (!s.is_string()) return Bad(key, "must be a string or a list of strings");
          p.stop.push_back(s.get<std::string>());
        }
      } else {
        return Bad(key, "must be a string or a list of strings");
      }
    } else if (key == "stop_token_ids") {
      if (!v.is_array()) return Bad(key, "must be a list of token ids");
      EPX_ASSIGN_OR_RETURN(p.stop_token_ids, TokenIds(v, key));
    } else if (key == "ignore_eos") {
      EPX_ASSIGN_OR_RETURN(p.ignore_eos, Bool(v, key));
    } else if (key == "n") {
      EPX_ASSIGN_OR_RETURN(int64_t n, Integer(v, key));
      if (n != 1) return Bad(key, absl::StrCat("must be 1 (got ", n, "): one choice per request"));
    } else if (key == "user") {
      if (!v.is_string()) return Bad(key, "must be a string");
    } else if (key == "stream") {
      EPX_ASSIGN_OR_RETURN(r.stream, Bool(v, key));
    } else if (key == "stream_options") {
      if (!v.is_object()) return Bad(key, "must be an object");
      for (const auto& [option, value] : v.items()) {
        if (option != "include_usage") return Bad("stream_options." + option, "is not supported");
        EPX_ASSIGN_OR_RETURN(r.include_usage, Bool(value, "stream_options.include_usage"));
      }
    } else if (key == "presence_penalty" || key == "frequency_penalty") {
      EPX_ASSIGN_OR_RETURN(double x, Number(v, key));
      if (x != 0) return Bad(key, "is not supported (only 0); use repetition_penalty");
    } else if (key == "logprobs" || key == "echo") {
      if (!(v.is_boolean() && !v.get<bool>()) && !(v.is_number() && v.get<double>() == 0))
        return Bad(key, "is not supported");
    } else {
      return Bad(key, "is not supported");
    }
  }
  if (!has_prompt) return Bad(chat ? "messages" : "prompt", "is missing");
  if (r.include_usage && !r.stream) return Bad("stream_options", "needs \"stream\": true");
  return r;
}

nlohmann::json ErrorBody(const absl::Status& status) {
  std::string type = "invalid_request_error";
  if (HttpStatus(status) >= 500) type = "server_error";
  if (absl::IsUnauthenticated(status)) type = "authentication_error";
  json param = nullptr;
  const absl::string_view m = status.message();
  if (absl::IsInvalidArgument(status) && m.size() > 1 && m[0] == '"') {
    const size_t end = m.find('"', 1);
    if (end != absl::string_view::npos) param = std::string(m.substr(1, end - 1));
  }
  return {{"error",
           {{"message", std::string(m)},
            {"type", type},
            {"param", param},
            {"code", absl::StatusCodeToString(status.code())}}}};
}

int HttpStatus(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    case absl::StatusCode::kCancelled:
      return 499;
    default:
      return 500;
  }
}

const char* FinishReasonText(FinishReason finish) {
  return finish == FinishReason::kLength ? "length" : "stop";
}

nlohmann::json CompletionBody(bool chat, const std::string& id, const std::string& model,
                              int64_t created, const std::string& text, FinishReason finish,
                              int64_t prompt_tokens, int64_t completion_tokens) {
  json choice = {{"index", 0}, {"finish_reason", FinishReasonText(finish)}, {"logprobs", nullptr}};
  if (chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  return {{"id", id},
          {"object", chat ? "chat.completion" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array({choice})},
          {"usage",
           {{"prompt_tokens", prompt_tokens},
            {"completion_tokens", completion_tokens},
            {"total_tokens", prompt_tokens + completion_tokens}}}};
}

absl::Status CheckModel(const std::string& asked, const std::string& served) {
  if (asked.empty() || asked == served) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat(
      "the model \"", asked, "\" does not exist; this server serves \"", served, "\""));
}

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string ModelName(const std::string& model_dir) {
  const std::filesystem::path dir = std::filesystem::absolute(model_dir);
  const std::string name = dir.filename().string();
  return name.empty() ? dir.parent_path().filename().string() : name;
}

}  // namespace openai

absl::StatusOr<HttpAddress> ParseHttpAddress(const std::string& address, absl::string_view flag) {
  const size_t colon = address.rfind(':');
  HttpAddress a;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &a.port) ||
      a.port < 0 || a.port > 65535)
    return absl::InvalidArgumentError(absl::StrCat(flag, " \"", address, "\" is not HOST:PORT"));
  a.host = address.substr(0, colon);
  if (a.host.size() > 1 && a.host.front() == '[' && a.host.back() == ']')
    a.host = a.host.substr(1, a.host.size() - 2);
  return a;
}

namespace {

using openai::Dump;

void SendError(httplib::Response& res, const absl::Status& status) {
  res.status = openai::HttpStatus(status);
  res.set_content(Dump(openai::ErrorBody(status)), "application/json");
}

std::string SseEvent(const json& j) { return absl::StrCat("data: ", Dump(j), "\n\n"); }

}  // namespace

class HttpServer::Impl {
 public:
  Impl(const HttpServerOptions& options, const HttpBackends& backends)
      : options_(options), backends_(backends) {}

  absl::Status Start() {
    EPX_ASSIGN_OR_RETURN(HttpAddress address, ParseHttpAddress(options_.listen, "--http-listen"));
    const std::string& host = address.host;
    const int port = address.port;
    const int threads = std::max(1, options_.threads);
    if (options_.tls.enabled()) {
      const std::string& ca = options_.tls.client_ca_file;
      auto ssl = std::make_unique<httplib::SSLServer>(options_.tls.cert_file.c_str(),
                                                      options_.tls.key_file.c_str(),
                                                      ca.empty() ? nullptr : ca.c_str());
      if (!ssl->is_valid())
        return absl::InvalidArgumentError(absl::StrCat(
            "HTTPS: the certificate ", options_.tls.cert_file, " and key ", options_.tls.key_file,
            " do not make a usable TLS context (a key that does not match the certificate?)"));
      server_ = std::move(ssl);
    } else {
      server_ = std::make_unique<httplib::Server>();
    }
    server_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    // The listening socket, to raise its backlog once bound (below).
    server_->set_socket_options([this](auto sock) {
      httplib::default_socket_options(sock);
      listen_fd_ = sock;
    });
    server_->set_payload_max_length(static_cast<size_t>(options_.max_request_bytes));
    server_->set_keep_alive_max_count(1000);
    Routes();
    port_ = port == 0 ? server_->bind_to_any_port(host)
                      : (server_->bind_to_port(host, port) ? port : -1);
    // Debian's libcpp-httplib listens with a backlog of 5, so a burst of clients overflows the
    // accept queue and sees resets. Listening again on the bound socket raises it.
    if (port_ > 0 && listen_fd_ >= 0) ::listen(listen_fd_, kListenBacklog);
    if (port_ <= 0)
      return absl::UnavailableError(absl::StrCat("cannot listen on ", options_.listen,
                                                 " for HTTP (address in use or not valid)"));
    thread_ = std::thread([this] { server_->listen_after_bind(); });
    return absl::OkStatus();
  }

  void Shutdown() {
    if (stopping_.exchange(true)) return;
    server_->stop();
    if (thread_.joinable()) thread_.join();
  }

  int port_ = 0;

 private:
  static constexpr int kListenBacklog = 4096;  // the kernel caps it at net.core.somaxconn
  int listen_fd_ = -1;
  void Routes() {
    // The API key guards the API; health, readiness, metrics and the dashboard's files are open.
    server_->set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (!options_.keys.any() || !absl::StartsWith(req.path, "/v1/"))
        return httplib::Server::HandlerResponse::Unhandled;
      const absl::Status s =
          CheckBearer(options_.keys, req.get_header_value("Authorization"), Access::kClient);
      if (s.ok()) return httplib::Server::HandlerResponse::Unhandled;
      EPX_LOG(Warning) << "refused " << req.method << " " << req.path << " from " << req.remote_addr
                       << ": " << s.message();
      SendError(res, s);
      res.set_header("WWW-Authenticate", "Bearer");
      return httplib::Server::HandlerResponse::Handled;
    });
    server_->Get("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("{\"status\": \"ok\"}", "application/json");
    });
    server_->Get("/ready", [this](const httplib::Request&, httplib::Response& res) {
      const std::string reason = backends_.not_ready_reason();
      res.status = reason.empty() ? 200 : 503;
      res.set_content(Dump({{"ready", reason.empty()}, {"reason", reason}}), "application/json");
    });
    server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(backends_.metrics_text(), "text/plain; version=0.0.4; charset=utf-8");
    });
    // The dashboard: its files (open), and the stats it polls (under the API key, as /v1/ is).
    auto asset = [this](const char* path, const uint8_t* data, size_t size, const char* type) {
      server_->Get(path, [data, size, type](const httplib::Request&, httplib::Response& res) {
        res.set_content(reinterpret_cast<const char*>(data), size, type);
        res.set_header("Cache-Control", "no-cache");
      });
    };
    asset("/", kDashboardHtml, kDashboardHtmlSize, "text/html; charset=utf-8");
    asset("/dashboard.js", kDashboardJs, kDashboardJsSize, "text/javascript; charset=utf-8");
    asset("/dashboard.css", kDashboardCss, kDashboardCssSize, "text/css; charset=utf-8");
    server_->Get("/v1/epx/stats", [this](const httplib::Request&, httplib::Response& res) {
      absl::StatusOr<std::string> stats = backends_.stats_json();
      if (!stats.ok()) return SendError(res, stats.status());
      res.set_content(*stats, "application/json");
    });
    server_->Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      json model = {{"id", options_.model_name},
                    {"object", "model"},
                    {"created", created_},
                    {"owned_by", "epx"},
                    {"root", options_.model_name}};
      std::string why_not;
      if (Scheduler* s = backends_.scheduler(&why_not); s != nullptr)
        model["max_model_len"] = s->max_context();
      if (backends_.tokenizer != nullptr) {  // epx's own: what a load generator needs
        model["vocab_size"] = backends_.tokenizer->vocab_size();
        model["bos_token_id"] = backends_.tokenizer->bos_id();
        model["eos_token_id"] = backends_.tokenizer->eos_id();
      }
      res.set_content(Dump({{"object", "list"}, {"data", json::array({model})}}),
                      "application/json");
    });
    server_->Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      Generate(req, res, false);
    });
    server_->Post(
        "/v1/chat/completions",
        [this](const httplib::Request& req, httplib::Response& res) { Generate(req, res, true); });
    server_->set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      absl::Status status =
          res.status == 404
              ? absl::NotFoundError(absl::StrCat("no route ", req.method, " ", req.path))
              : absl::InvalidArgumentError(absl::StrCat("HTTP ", res.status));
      if (res.status == 413)
        status = absl::InvalidArgumentError("the request body is larger than --max-request-bytes");
      const int code = res.status;
      SendError(res, status);
      res.status = code;
    });
  }

  void Generate(const httplib::Request& req, httplib::Response& res, bool chat) {
    absl::StatusOr<json> body = ParseJson(req.body, "the request body");
    if (!body.ok()) return SendError(res, body.status());
    absl::StatusOr<openai::ParsedRequest> parsed = openai::ParseRequest(*body, chat);
    if (!parsed.ok()) return SendError(res, parsed.status());
    if (absl::Status model = openai::CheckModel(parsed->model, options_.model_name); !model.ok())
      return SendError(res, model);
    std::string why_not;
    Scheduler* scheduler = backends_.scheduler(&why_not);
    if (scheduler == nullptr)
      return SendError(res, absl::UnavailableError(absl::StrCat("not serving yet: ", why_not)));
    absl::StatusOr<GenerationRequest> request =
        BuildRequest(parsed->params, *backends_.tokenizer, scheduler->max_context());
    if (!request.ok()) return SendError(res, request.status());
    const std::string id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", next_id_.fetch_add(1));
    request->request_id = id;
    absl::StatusOr<std::shared_ptr<RequestStream>> submitted =
        scheduler->Submit(*std::move(request));
    if (!submitted.ok()) return SendError(res, submitted.status());
    std::shared_ptr<RequestStream> stream = *std::move(submitted);
    const int64_t created = absl::ToUnixSeconds(absl::Now());

    if (!parsed->stream) {
      absl::StatusOr<Completion> done = Collect(*stream, [this] { return stopping_.load(); });
      if (!done.ok()) return SendError(res, done.status());
      if (done->finish == FinishReason::kCancelled)
        return SendError(
            res, absl::UnavailableError("the server shut down before the request finished"));
      res.set_content(
          Dump(openai::CompletionBody(chat, id, options_.model_name, created, done->text,
                                      done->finish, done->prompt_tokens, done->completion_tokens)),
          "application/json");
      return;
    }

    // Server-sent events: one chunk per event, then the usage chunk if asked, then [DONE].
    const bool include_usage = parsed->include_usage;
    const std::string model = options_.model_name;
    auto chunk = [chat, id, model, created](const std::string& text, const json& finish) {
      json choice = {{"index", 0}, {"finish_reason", finish}, {"logprobs", nullptr}};
      if (chat) {
        choice["delta"] = {{"content", text}};
      } else {
        choice["text"] = text;
      }
      return json{{"id", id},
                  {"object", chat ? "chat.completion.chunk" : "text_completion"},
                  {"created", created},
                  {"model", model},
                  {"choices", json::array({choice})}};
    };
    auto first = std::make_shared<bool>(true);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, stream, chunk, first, chat, id, model, created, include_usage](
            size_t, httplib::DataSink& sink) {
          if (*first && chat) {
            json role = chunk("", nullptr);
            role["choices"][0]["delta"] = {{"role", "assistant"}, {"content", ""}};
            if (!sink.write(SseEvent(role).data(), SseEvent(role).size())) {
              stream->Cancel();
              return false;
            }
          }
          *first = false;
          GenerationEvent event;
          if (stopping_.load()) stream->Cancel();  // a busy stream never lets Next time out
          if (!stream->Next(&event, absl::Milliseconds(200))) {
            if (!sink.is_writable()) stream->Cancel();
            return true;
          }
          std::string out;
          bool done = false;
          while (true) {
            if (!event.error.ok()) {
              out += SseEvent(openai::ErrorBody(event.error));
              done = true;
              break;
            }
            const bool last = event.last();
            if (!event.text.empty() || last)
              out += SseEvent(chunk(
                  event.text, last ? json(openai::FinishReasonText(event.finish)) : json(nullptr)));
            if (last) {
              if (include_usage) {
                out +=
                    SseEvent({{"id", id},
                              {"object", chat ? "chat.completion.chunk" : "text_completion"},
                              {"created", created},
                              {"model", model},
                              {"choices", json::array()},
                              {"usage",
                               {{"prompt_tokens", event.prompt_tokens},
                                {"completion_tokens", event.completion_tokens},
                                {"total_tokens", event.prompt_tokens + event.completion_tokens}}}});
              }
              done = true;
              break;
            }
            if (!stream->Next(&event, absl::ZeroDuration())) break;
          }
          if (done) out += "data: [DONE]\n\n";
          if (!out.empty() && !sink.write(out.data(), out.size())) {
            stream->Cancel();
            return false;
          }
          if (done) sink.done();
          return true;
        },
        [stream](bool success) {
          if (!success) stream->Cancel();
        });
  }

  const HttpServerOptions options_;
  const HttpBackends backends_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> next_id_{0};
  const int64_t created_ = absl::ToUnixSeconds(absl::Now());
};

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpServerOptions& options,
                                                              const HttpBackends& backends) {
  auto impl = std::make_unique<Impl>(options, backends);
  EPX_RETURN_IF_ERROR(impl->Start());
  EPX_LOG(Info) << "OpenAI-compatible HTTP on "
                << options.listen.substr(0, options.listen.rfind(':')) << ":" << impl->port_
                << " (model \"" << options.model_name << "\")";
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpServer::~HttpServer() { Shutdown(); }
int HttpServer::port() const { return impl_->port_; }
void HttpServer::Shutdown() { impl_->Shutdown(); }

}  // namespace epx
