#include "worker/control_client.h"

#include <grpcpp/grpcpp.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "epx/v1/cluster.grpc.pb.h"

namespace epx {

std::string ControlClient::Endpoint(const std::string& address, const std::string& token) {
  return absl::StrCat(address, " ", token);
}

absl::StatusOr<std::unique_ptr<ControlClient>> ControlClient::Start(const std::string& endpoint,
                                                                    const WorkerInfo& self) {
  const size_t space = endpoint.find(' ');
  if (space == std::string::npos || space == 0 || space + 1 == endpoint.size())
    return absl::InvalidArgumentError(
        absl::StrCat("control-plane endpoint \"", endpoint, "\" is not \"HOST:PORT TOKEN\""));
  auto client = std::unique_ptr<ControlClient>(new ControlClient());
  client->thread_ = std::thread(&ControlClient::Loop, client.get(), endpoint.substr(0, space),
                                endpoint.substr(space + 1), self);
  return client;
}

ControlClient::~ControlClient() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

void ControlClient::Loop(std::string address, std::string token, WorkerInfo self) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = v1::Cluster::NewStub(channel);
  v1::RegisterRequest reg;
  reg.set_cluster_token(token);
  reg.set_rank(self.rank);
  reg.set_host(self.host);
  reg.set_device(self.device);
  reg.set_pid(self.pid);
  reg.set_build_id(self.build_id);
  reg.set_config_hash(self.config_hash);
  reg.mutable_experts()->Add(self.experts.begin(), self.experts.end());
  v1::HeartbeatRequest beat;
  beat.set_cluster_token(token);
  beat.set_rank(self.rank);

  const absl::Duration call_timeout = absl::Seconds(2);
  absl::Duration interval = absl::Milliseconds(200);  // retry pace until registered
  bool registered = false;
  std::string last_error;
  do {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + call_timeout));
    grpc::Status status;
    if (!registered) {
      v1::RegisterResponse reply;
      status = stub->Register(&context, reg, &reply);
      if (status.ok()) {
        registered = true;
        interval = absl::Milliseconds(std::max<uint32_t>(reply.heartbeat_interval_ms(), 10));
        EPX_LOG(Info) << "registered with the coordinator at " << address;
      }
    } else {
      v1::HeartbeatResponse reply;
      status = stub->Heartbeat(&context, beat, &reply);
      if (status.error_code() == grpc::StatusCode::NOT_FOUND) registered = false;
    }
    if (!status.ok() && status.error_message() != last_error) {
      EPX_LOG(Warning) << "control plane (" << address << "): " << status.error_message();
      last_error = status.error_message();
    } else if (status.ok()) {
      last_error.clear();
    }
  } while (!stop_.WaitForNotificationWithTimeout(interval));
}

}  // namespace epx
