#include "coordinator/membership.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace epx {
namespace {

// "worker 2 (host pid 123)" once a rank is known, else "the worker on host (pid 123)".
std::string Name(const WorkerInfo& info) {
  if (info.rank > 0) return absl::StrCat("worker ", info.rank, " (", info.host, " pid ", info.pid, ")");
  return absl::StrCat("the worker on ", info.host, " (pid ", info.pid, ")");
}

// The same process registering again (a retried or restarted call).
bool SameProcess(const WorkerInfo& a, const WorkerInfo& b) {
  if (!a.instance.empty() || !b.instance.empty()) return a.instance == b.instance;
  return a.host == b.host && a.pid == b.pid;
}

}  // namespace

Membership::Membership(const Placement* placement, ClusterIdentity identity,
                       const MembershipOptions& options)
    : placement_(placement),
      identity_(std::move(identity)),
      options_(options),
      workers_(placement == nullptr ? 1 : placement->num_workers() + 1) {}

absl::Status Membership::CheckIdentity(const WorkerInfo& info) const {
  if (info.build_id != identity_.build_id)
    return absl::FailedPreconditionError(absl::StrCat(Name(info), " runs build ", info.build_id,
                                                      " but the coordinator runs ",
                                                      identity_.build_id));
  if (info.config_hash != identity_.config_hash)
    return absl::FailedPreconditionError(absl::StrCat(
        Name(info), " loaded a model config with hash ", absl::Hex(info.config_hash),
        " but the coordinator's is ", absl::Hex(identity_.config_hash),
        ": every process must read the same config.json"));
  if (info.data_plane != identity_.data_plane)
    return absl::FailedPreconditionError(absl::StrCat(
        Name(info), " uses data plane \"", info.data_plane, "\" but the coordinator uses \"",
        identity_.data_plane, "\": give every process the same --data-plane"));
  return absl::OkStatus();
}

absl::StatusOr<int> Membership::Register(const WorkerInfo& info, absl::Time now) {
  if (absl::Status s = CheckIdentity(info); !s.ok()) return s;
  const int num_workers = this->num_workers();
  if (info.rank < 0 || info.rank > num_workers || (info.rank == 0 && num_workers == 0))
    return absl::InvalidArgumentError(absl::StrCat("rank ", info.rank,
                                                   " is not a worker of this job (ranks 1..",
                                                   num_workers, ")"));
  absl::MutexLock lock(&mu_);
  int rank = 0;
  for (int r = 1; r <= num_workers; ++r) {
    const Entry& e = workers_[r];
    if (e.registered && SameProcess(e.info, info)) rank = r;
  }
  if (rank != 0 && info.rank != 0 && info.rank != rank)
    return absl::AlreadyExistsError(absl::StrCat("the process on ", info.host, " (pid ", info.pid,
                                                 ") is already worker ", rank,
                                                 "; it cannot also be worker ", info.rank));
  if (rank == 0 && info.rank != 0) {
    const Entry& held = workers_[info.rank];
    if (held.registered)
      return absl::AlreadyExistsError(absl::StrCat(
          "rank ", info.rank, " is already held by worker ", info.rank, " (", held.info.host,
          " pid ", held.info.pid, "): give each worker its own --rank, or none"));
    rank = info.rank;
  }
  if (rank == 0) {
    for (int r = 1; r <= num_workers && rank == 0; ++r)
      if (!workers_[r].registered) rank = r;
    if (rank == 0)
      return absl::ResourceExhaustedError(absl::StrCat(
          "the cluster already has its ", num_workers, " workers (the coordinator's --workers ",
          num_workers, "): ", Name(info), " is one too many"));
  }
  if (!info.experts.empty() && placement_ != nullptr && info.experts != placement_->experts_of(rank))
    return absl::FailedPreconditionError(absl::StrCat(
        "worker ", rank, " holds experts [", absl::StrJoin(info.experts, ","),
        "] but the placement gives it [", absl::StrJoin(placement_->experts_of(rank), ","), "]"));
  Entry& e = workers_[rank];
  e.info = info;
  e.info.rank = rank;
  if (e.info.experts.empty() && placement_ != nullptr) e.info.experts = placement_->experts_of(rank);
  e.registered = true;
  e.last_heartbeat = now;
  return rank;
}

absl::Status Membership::Heartbeat(int rank, const std::string& instance, absl::Time now) {
  absl::MutexLock lock(&mu_);
  if (rank < 1 || rank >= static_cast<int>(workers_.size()) || !workers_[rank].registered)
    return absl::NotFoundError(absl::StrCat("rank ", rank, " has not registered"));
  if (!instance.empty() && instance != workers_[rank].info.instance)
    return absl::NotFoundError(
        absl::StrCat("rank ", rank, " is registered to another process"));
  workers_[rank].last_heartbeat = now;
  return absl::OkStatus();
}

void Membership::MarkFailed(const absl::Status& cause) {
  absl::MutexLock lock(&mu_);
  if (failure_.ok()) failure_ = cause;
}

bool Membership::AwaitAllRegistered(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  auto all = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (size_t r = 1; r < workers_.size(); ++r)
      if (!workers_[r].registered) return false;
    return true;
  };
  return mu_.AwaitWithTimeout(absl::Condition(&all), timeout);
}

int Membership::num_registered() const {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (size_t r = 1; r < workers_.size(); ++r) n += workers_[r].registered;
  return n;
}

std::string Membership::NotReadyReason(absl::Time now) const {
  absl::MutexLock lock(&mu_);
  if (!failure_.ok()) return absl::StrCat("data plane failed: ", failure_.message());
  for (size_t rank = 1; rank < workers_.size(); ++rank) {
    const Entry& e = workers_[rank];
    if (!e.registered) return absl::StrCat("worker ", rank, " has not registered");
    if (now - e.last_heartbeat > options_.heartbeat_timeout)
      return absl::StrCat("worker ", rank, " (", e.info.host, ") silent for ",
                          absl::FormatDuration(absl::Trunc(now - e.last_heartbeat,
                                                           absl::Milliseconds(100))),
                          " (timeout ", absl::FormatDuration(options_.heartbeat_timeout), ")");
  }
  return "";
}

std::vector<WorkerState> Membership::Workers(absl::Time now) const {
  absl::MutexLock lock(&mu_);
  std::vector<WorkerState> out;
  for (size_t rank = 1; rank < workers_.size(); ++rank) {
    const Entry& e = workers_[rank];
    WorkerState s;
    s.info = e.info;
    s.info.rank = static_cast<int>(rank);
    if (!e.registered && placement_ != nullptr) s.info.experts = placement_->experts_of(rank);
    s.registered = e.registered;
    s.heartbeat_age = e.registered ? now - e.last_heartbeat : absl::InfiniteDuration();
    s.alive = e.registered && s.heartbeat_age <= options_.heartbeat_timeout;
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace epx
