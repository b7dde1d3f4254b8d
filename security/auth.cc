#include "security/auth.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/json.h"
#include "common/status.h"

namespace epx {
namespace {

// *pem = the file's text if it holds a PEM block whose label contains `kind` ("CERTIFICATE",
// "PRIVATE KEY"); nothing for an empty path (the flag was not given).
absl::Status ReadPem(const std::string& path, absl::string_view flag, absl::string_view kind,
                     std::string* pem) {
  if (path.empty()) return absl::OkStatus();
  absl::StatusOr<std::string> text = ReadTextFile(path);
  if (!text.ok())
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": cannot be read (", text.status().message(), ")"));
  const size_t begin = text->find("-----BEGIN ");
  const size_t end = begin == std::string::npos ? begin : text->find("-----", begin + 11);
  if (begin == std::string::npos || end == std::string::npos ||
      !absl::StrContains(absl::string_view(*text).substr(begin, end - begin), kind))
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": not a PEM file with a ", kind, " block"));
  *pem = *std::move(text);
  return absl::OkStatus();
}

// A server's or client's certificate and key: both or neither (`who` names which).
absl::Status LoadPair(const std::string& cert_file, const std::string& key_file,
                      absl::string_view who, std::string* cert_pem, std::string* key_pem) {
  if (cert_file.empty() != key_file.empty())
    return absl::InvalidArgumentError(
        absl::StrCat(who,
                     ": --tls-cert and --tls-key go together (one was given without the "
                     "other)"));
  EPX_RETURN_IF_ERROR(ReadPem(cert_file, "--tls-cert", "CERTIFICATE", cert_pem));
  return ReadPem(key_file, "--tls-key", "PRIVATE KEY", key_pem);
}

// Equal in time that depends only on the lengths, not on where the first difference is.
bool ConstantTimeEqual(absl::string_view a, absl::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

absl::StatusOr<ServerTls> LoadServerTls(const ServerTlsOptions& options) {
  ServerTls tls;
  EPX_RETURN_IF_ERROR(
      LoadPair(options.cert_file, options.key_file, "the server", &tls.cert_pem, &tls.key_pem));
  if (!options.client_ca_file.empty() && options.cert_file.empty())
    return absl::InvalidArgumentError(
        "--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked only "
        "over TLS");
  EPX_RETURN_IF_ERROR(
      ReadPem(options.client_ca_file, "--tls-client-ca", "CERTIFICATE", &tls.client_ca_pem));
  return tls;
}

absl::StatusOr<ClientTls> LoadClientTls(const ClientTlsOptions& options) {
  ClientTls tls;
  tls.enabled = options.enabled();
  EPX_RETURN_IF_ERROR(
      LoadPair(options.cert_file, options.key_file, "the client", &tls.cert_pem, &tls.key_pem));
  // Without --tls-ca the server is checked against the system's CAs.
  EPX_RETURN_IF_ERROR(ReadPem(options.ca_file, "--tls-ca", "CERTIFICATE", &tls.ca_pem));
  return tls;
}

absl::Status CheckBearer(const ApiKeys& keys, absl::string_view authorization, Access access) {
  // Client calls are open without an API key; admin calls without either key. The admin key
  // grants every call; the API key every call but admin ones on a server that has an admin key.
  const bool open = access == Access::kClient ? keys.api_key.empty() : !keys.any();
  if (open) return absl::OkStatus();
  const bool api_key_grants = access == Access::kClient || keys.admin_key.empty();
  const char* const needed = api_key_grants && !keys.api_key.empty()
                                 ? "an API key (epx: --api-key or EPX_API_KEY)"
                                 : "the admin key (epx: --admin-key or EPX_ADMIN_KEY)";
  absl::string_view value = authorization;
  if (value.empty())
    return absl::UnauthenticatedError(absl::StrCat(
        "this server needs ", needed, ": send the header \"authorization: Bearer <key>\""));
  if (!absl::ConsumePrefix(&value, "Bearer ") && !absl::ConsumePrefix(&value, "bearer "))
    return absl::UnauthenticatedError(absl::StrCat(
        "the authorization header is not \"Bearer <key>\"; this server needs ", needed));
  const bool granted =
      (!keys.admin_key.empty() && ConstantTimeEqual(value, keys.admin_key)) ||
      (api_key_grants && !keys.api_key.empty() && ConstantTimeEqual(value, keys.api_key));
  if (granted) return absl::OkStatus();
  return absl::UnauthenticatedError(
      absl::StrCat("the key is not valid for this call: it needs ", needed));
}

std::string BearerHeader(absl::string_view key) {
  return key.empty() ? std::string() : absl::StrCat("Bearer ", key);
}

}  // namespace epx
