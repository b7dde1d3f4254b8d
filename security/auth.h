// Who may talk to a server: TLS (and mutual TLS) for gRPC and HTTP, and bearer API keys.
//
// TLS: a server given a certificate and key serves gRPC and HTTP over TLS only; with a client CA
// it also requires every client to present a certificate that CA signed (mTLS). Clients (the
// `epx` client commands, workers towards their coordinator) verify the server against a CA
// file and may present a certificate of their own.
//
// API keys (`--api-key` / EPX_API_KEY, `--admin-key` / EPX_ADMIN_KEY): a call carries
// "authorization: Bearer KEY" (gRPC metadata or the HTTP header). Client calls (generation,
// tokenisation, model info, stats) need the API key; admin calls (drain, shutdown, placement)
// need the admin key when there is one, else the API key. The admin key grants client calls
// too. Without keys every call is open. Health, readiness, the metrics and the dashboard's
// static files are always open. Keys are compared in constant time and never logged.
//
// The gRPC credentials of these are in security/grpc_credentials.h. Thread-safe (stateless
// functions, immutable values).
#ifndef EPX_SECURITY_AUTH_H_
#define EPX_SECURITY_AUTH_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace epx {

// A server's TLS files (PEM). Empty cert_file: no TLS.
struct ServerTlsOptions {
  std::string cert_file;       // --tls-cert: the server's certificate (chain)
  std::string key_file;        // --tls-key: its private key
  std::string client_ca_file;  // --tls-client-ca: require client certificates signed by it
  bool enabled() const { return !cert_file.empty(); }
};

// The files' contents, read and checked once at start-up.
struct ServerTls {
  std::string cert_pem, key_pem, client_ca_pem;
  bool enabled() const { return !cert_pem.empty(); }
  bool mutual() const { return !client_ca_pem.empty(); }
};

// InvalidArgument for a key without a certificate (or the reverse), a client CA without TLS, and a
// file that cannot be read or holds no PEM block of the kind it should (naming the flag and
// file).
absl::StatusOr<ServerTls> LoadServerTls(const ServerTlsOptions& options);

// A client's TLS files (PEM). Neither ca_file nor cert_file: plain-text channels.
struct ClientTlsOptions {
  std::string ca_file;    // --tls-ca: the CA that signed the server's certificate
  std::string cert_file;  // --tls-cert: this client's certificate, for a server that asks (mTLS)
  std::string key_file;   // --tls-key
  bool enabled() const { return !ca_file.empty() || !cert_file.empty(); }
};

struct ClientTls {
  std::string ca_pem, cert_pem, key_pem;
  bool enabled = false;
};
// The same checks as LoadServerTls, for the client's flags.
absl::StatusOr<ClientTls> LoadClientTls(const ClientTlsOptions& options);

// What a call may do.
enum class Access {
  kClient,  // Generation/*, Admin/Stats, the OpenAI endpoints, the dashboard's stats
  kAdmin,   // Admin/Drain, Shutdown, GetPlacement, SetPlacement, DrainWorker
};

struct ApiKeys {
  std::string api_key;
  std::string admin_key;
  bool any() const { return !api_key.empty() || !admin_key.empty(); }
};

// OK when `authorization` (the header's value, "Bearer KEY"; empty when absent) grants `access`.
// Unauthenticated otherwise, with a message that says which key the call needs and how to send
// it, and never any key.
absl::Status CheckBearer(const ApiKeys& keys, absl::string_view authorization, Access access);

// "Bearer KEY" for a client's header; empty for an empty key.
std::string BearerHeader(absl::string_view key);

}  // namespace epx

#endif  // EPX_SECURITY_AUTH_H_
