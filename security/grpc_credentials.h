// gRPC credentials of the TLS files security/auth.h reads. Thread-safe.
#ifndef EPX_SECURITY_GRPC_CREDENTIALS_H_
#define EPX_SECURITY_GRPC_CREDENTIALS_H_

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include <memory>

#include "security/auth.h"

namespace epx {

// TLS (requiring a client certificate when tls.mutual()), or insecure without TLS.
std::shared_ptr<grpc::ServerCredentials> GrpcServerCredentials(const ServerTls& tls);
// TLS that checks the server against tls.ca_pem (the system's CAs when empty) and presents the
// client's certificate if it has one; insecure without TLS.
std::shared_ptr<grpc::ChannelCredentials> GrpcChannelCredentials(const ClientTls& tls);

}  // namespace epx

#endif  // EPX_SECURITY_GRPC_CREDENTIALS_H_
