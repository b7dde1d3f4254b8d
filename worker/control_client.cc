#include "worker/control_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "epx/v1/cluster.grpc.pb.h"
#include "security/grpc_credentials.h"

namespace epx {
namespace {

constexpr absl::Duration kCallTimeout = absl::Seconds(5);

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

v1::RegisterRequest ToRequest(const WorkerInfo& self, const std::string& token) {
  v1::RegisterRequest reg;
  reg.set_cluster_token(token);
  reg.set_rank(self.rank);
  reg.set_host(self.host);
  reg.set_device(self.device);
  reg.set_pid(self.pid);
  reg.set_build_id(self.build_id);
  reg.set_config_hash(self.config_hash);
  reg.mutable_experts()->Add(self.experts.begin(), self.experts.end());
  reg.set_data_plane(self.data_plane);
  reg.set_instance(self.instance);
  return reg;
}

}  // namespace

// The channel, stub and token; also the store over StoreSet/StoreGet.
class ControlClient::Stub : public comm::KeyValueStore {
 public:
  Stub(std::string address, std::string token, const ClientTls& tls)
      : address_(std::move(address)),
        token_(std::move(token)),
        stub_(v1::Cluster::NewStub(grpc::CreateChannel(address_, GrpcChannelCredentials(tls)))) {}

  grpc::Status Register(const WorkerInfo& self, v1::RegisterResponse* reply) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
    return stub_->Register(&context, ToRequest(self, token_), reply);
  }
  grpc::Status AwaitEpoch(const WorkerInfo& self, int64_t after, absl::Duration timeout,
                          v1::EpochResponse* reply) {
    v1::AwaitEpochRequest in;
    in.set_cluster_token(token_);
    in.set_rank(self.rank);
    in.set_instance(self.instance);
    in.set_after_epoch(static_cast<uint64_t>(std::max<int64_t>(after, 0)));
    in.set_timeout_ms(
        static_cast<uint32_t>(std::clamp<int64_t>(absl::ToInt64Milliseconds(timeout), 0, 1 << 30)));
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout + kCallTimeout));
    return stub_->AwaitEpoch(&context, in, reply);
  }
  grpc::Status Heartbeat(const WorkerInfo& self, const std::optional<std::vector<int>>& loaded,
                         v1::HeartbeatResponse* reply) {
    v1::HeartbeatRequest beat;
    beat.set_cluster_token(token_);
    beat.set_rank(self.rank);
    beat.set_instance(self.instance);
    if (loaded.has_value()) {
      beat.set_reports_loaded(true);
      beat.mutable_loaded_experts()->Add(loaded->begin(), loaded->end());
    }
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
    return stub_->Heartbeat(&context, beat, reply);
  }

  absl::Status Set(const std::string& key, const std::string& value) override {
    v1::StoreSetRequest in;
    in.set_cluster_token(token_);
    in.set_key(key);
    in.set_value(value);
    v1::StoreSetResponse out;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
    return Named(stub_->StoreSet(&context, in, &out));
  }
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) override {
    const int64_t ms = std::clamp<int64_t>(absl::ToInt64Milliseconds(timeout), 0,
                                           std::numeric_limits<uint32_t>::max() / 2);
    v1::StoreGetRequest in;
    in.set_cluster_token(token_);
    in.set_key(key);
    in.set_timeout_ms(static_cast<uint32_t>(ms));
    v1::StoreGetResponse out;
    grpc::ClientContext context;
    // The coordinator answers by the key's timeout; the call's own deadline is a little later.
    context.set_deadline(
        absl::ToChronoTime(absl::Now() + absl::Milliseconds(ms) + kCallTimeout));
    const grpc::Status s = stub_->StoreGet(&context, in, &out);
    if (!s.ok()) return Named(s);
    return std::string(out.value());
  }

  const std::string& address() const { return address_; }

 private:
  absl::Status Named(const grpc::Status& s) const {
    if (s.ok()) return absl::OkStatus();
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                        absl::StrCat("the coordinator's store at ", address_, ": ",
                                     s.error_message()));
  }

  const std::string address_;
  const std::string token_;
  std::unique_ptr<v1::Cluster::Stub> stub_;
};

ControlClient::ControlClient(std::unique_ptr<Stub> stub) : stub_(std::move(stub)) {}

std::unique_ptr<ControlClient> ControlClient::Create(const std::string& address,
                                                     const std::string& token,
                                                     const ClientTls& tls) {
  return std::unique_ptr<ControlClient>(
      new ControlClient(std::make_unique<Stub>(address, token, tls)));
}

std::string ControlClient::Endpoint(const std::string& address, const std::string& token) {
  return absl::StrCat(address, " ", token);
}

absl::StatusOr<std::unique_ptr<ControlClient>> ControlClient::Start(const std::string& endpoint,
                                                                    const WorkerInfo& self,
                                                                    const ClientTls& tls) {
  const size_t space = endpoint.find(' ');
  if (space == std::string::npos || space == 0 || space + 1 == endpoint.size())
    return absl::InvalidArgumentError(
        absl::StrCat("control-plane endpoint \"", endpoint, "\" is not \"HOST:PORT TOKEN\""));
  std::unique_ptr<ControlClient> client =
      Create(endpoint.substr(0, space), endpoint.substr(space + 1), tls);
  client->thread_ = std::thread(&ControlClient::Loop, client.get(), self,
                                absl::Milliseconds(200), /*registered=*/false,
                                absl::InfiniteDuration(), nullptr);
  return client;
}

ControlClient::~ControlClient() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

comm::KeyValueStore* ControlClient::store() { return stub_.get(); }
const std::string& ControlClient::address() const { return stub_->address(); }

absl::StatusOr<Assignment> ControlClient::Register(const WorkerInfo& self,
                                                   absl::Duration patience) {
  const absl::Time give_up = absl::Now() + patience;
  absl::Duration pause = absl::Milliseconds(100);
  std::string last_error;
  while (true) {
    v1::RegisterResponse reply;
    const grpc::Status s = stub_->Register(self, &reply);
    if (s.ok()) {
      Assignment a;
      a.rank = reply.rank();
      a.world_size = reply.world_size();
      a.placement_json = reply.placement_json();
      a.data_plane = reply.data_plane();
      a.store_prefix = reply.store_prefix();
      a.heartbeat_interval = absl::Milliseconds(std::max<uint32_t>(reply.heartbeat_interval_ms(), 10));
      a.comm_timeout = absl::Milliseconds(reply.comm_timeout_ms());
      EPX_LOG(Info) << "registered with the coordinator at " << address() << " as worker "
                    << a.rank << " of " << a.world_size - 1;
      return a;
    }
    // Not reachable yet (not started, still binding, or restarting): try again. Anything else
    // is the coordinator's answer.
    const bool retry = s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                       s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!retry)
      return absl::Status(FromGrpc(s).code(),
                          absl::StrCat("the coordinator at ", address(),
                                       " refused this worker: ", s.error_message()));
    if (absl::Now() + pause > give_up)
      return absl::DeadlineExceededError(absl::StrCat(
          "no coordinator answered at ", address(), " within ", absl::FormatDuration(patience),
          " (last error: ", s.error_message(), "); start `epx serve --workers W` there, or check "
          "--coordinator"));
    if (s.error_message() != last_error) {
      EPX_LOG(Warning) << "waiting for the coordinator at " << address() << " ("
                       << s.error_message() << "); retrying for up to "
                       << absl::FormatDuration(absl::Trunc(give_up - absl::Now(), absl::Seconds(1)));
      last_error = s.error_message();
    }
    if (stop_.WaitForNotificationWithTimeout(pause))
      return absl::CancelledError("registration stopped");
    pause = std::min(2 * pause, absl::Seconds(2));
  }
}

absl::StatusOr<EpochAssignment> ControlClient::AwaitEpoch(const WorkerInfo& self, int64_t after,
                                                          absl::Duration patience) {
  const absl::Time give_up = absl::Now() + patience;
  std::string last_error;
  while (true) {
    v1::EpochResponse reply;
    const absl::Duration wait =
        std::clamp(give_up - absl::Now(), absl::ZeroDuration(), absl::Seconds(20));
    const absl::Time asked = absl::Now();
    const grpc::Status s = stub_->AwaitEpoch(self, after, wait, &reply);
    if (s.ok()) {
      EpochAssignment a;
      a.epoch = static_cast<int64_t>(reply.epoch());
      a.data_plane_rank = reply.data_plane_rank();
      a.world_size = reply.world_size();
      a.placement_json = reply.placement_json();
      a.store_prefix = reply.store_prefix();
      a.members.assign(reply.members().begin(), reply.members().end());
      return a;
    }
    // No epoch yet (the coordinator is still re-forming, or waits for a worker to replace a lost
    // one), or no answer: ask again.
    const bool retry = s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                       s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!retry)
      return absl::Status(FromGrpc(s).code(),
                          absl::StrCat("the coordinator at ", address(), ": ", s.error_message()));
    if (absl::Now() >= give_up)
      return absl::DeadlineExceededError(
          absl::StrCat("no data plane after epoch ", after, " formed within ",
                       absl::FormatDuration(patience), " (", s.error_message(), ")"));
    if (s.error_message() != last_error) {
      EPX_LOG(Info) << "waiting for the coordinator to form the data plane: " << s.error_message();
      last_error = s.error_message();
    }
    // An answer that comes back at once (an unreachable coordinator) is asked again after a
    // pause; one that waited is asked again now.
    const absl::Duration pause = absl::Now() - asked < absl::Milliseconds(100)
                                     ? absl::Milliseconds(200)
                                     : absl::ZeroDuration();
    if (stop_.WaitForNotificationWithTimeout(pause))
      return absl::CancelledError("stopped waiting for the data plane");
  }
}

void ControlClient::SetLoaded(std::vector<int> experts) {
  absl::MutexLock lock(&loaded_mu_);
  loaded_ = std::move(experts);
}

void ControlClient::StartHeartbeats(const WorkerInfo& self, absl::Duration interval,
                                    absl::Duration lost_after, std::function<void()> on_lost) {
  thread_ = std::thread(&ControlClient::Loop, this, self, interval, /*registered=*/true,
                        lost_after, std::move(on_lost));
}

void ControlClient::Loop(WorkerInfo self, absl::Duration interval, bool registered,
                         absl::Duration lost_after, std::function<void()> on_lost) {
  std::string last_error;
  absl::Time last_answer = absl::Now();
  int64_t target_version = 0, left_epoch = 0;
  do {
    grpc::Status status;
    if (!registered) {
      v1::RegisterResponse reply;
      status = stub_->Register(self, &reply);
      if (status.ok()) {
        registered = true;
        interval = absl::Milliseconds(std::max<uint32_t>(reply.heartbeat_interval_ms(), 10));
        EPX_LOG(Info) << "registered with the coordinator at " << address();
      }
    } else {
      std::optional<std::vector<int>> loaded;
      {
        absl::MutexLock lock(&loaded_mu_);
        loaded = loaded_;
      }
      v1::HeartbeatResponse reply;
      status = stub_->Heartbeat(self, loaded, &reply);
      if (status.error_code() == grpc::StatusCode::NOT_FOUND) registered = false;
      const int64_t version = static_cast<int64_t>(reply.target_version());
      if (status.ok() && loaded.has_value() && on_target_ && version > target_version) {
        target_version = version;
        on_target_(version,
                   std::vector<int>(reply.target_experts().begin(), reply.target_experts().end()));
      }
      const int64_t left = static_cast<int64_t>(reply.left_epoch());
      if (status.ok() && on_left_ && left > left_epoch) {
        left_epoch = left;
        on_left_(left);
      }
    }
    if (!status.ok() && status.error_message() != last_error) {
      EPX_LOG(Warning) << "control plane (" << address() << "): " << status.error_message();
      last_error = status.error_message();
    } else if (status.ok()) {
      last_error.clear();
    }
    // Any answer, even a refusal, shows the coordinator is there.
    const bool answered = status.error_code() != grpc::StatusCode::UNAVAILABLE &&
                          status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED;
    if (answered) last_answer = absl::Now();
    if (on_lost && absl::Now() - last_answer > lost_after) {
      on_lost();
      on_lost = nullptr;
    }
  } while (!stop_.WaitForNotificationWithTimeout(interval));
}

}  // namespace epx
