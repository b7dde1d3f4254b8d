#include "coordinator/membership.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace epx {

Membership::Membership(const Placement* placement, std::string build_id, uint64_t config_hash,
                       const MembershipOptions& options)
    : placement_(placement),
      build_id_(std::move(build_id)),
      config_hash_(config_hash),
      options_(options),
      workers_(placement == nullptr ? 1 : placement->num_workers() + 1) {}

absl::Status Membership::Register(const WorkerInfo& info, absl::Time now) {
  const int num_workers = placement_ == nullptr ? 0 : placement_->num_workers();
  if (info.rank < 1 || info.rank > num_workers)
    return absl::InvalidArgumentError(absl::StrCat("rank ", info.rank,
                                                   " is not a worker of this job (ranks 1..",
                                                   num_workers, ")"));
  if (info.build_id != build_id_)
    return absl::FailedPreconditionError(absl::StrCat("worker ", info.rank, " runs build ",
                                                      info.build_id, " but the coordinator runs ",
                                                      build_id_));
  if (info.config_hash != config_hash_)
    return absl::FailedPreconditionError(absl::StrCat(
        "worker ", info.rank, " loaded a model config with hash ", absl::Hex(info.config_hash),
        " but the coordinator's is ", absl::Hex(config_hash_)));
  const std::vector<int>& expected = placement_->experts_of(info.rank);
  if (info.experts != expected)
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", info.rank, " holds experts [", absl::StrJoin(info.experts, ","),
                     "] but the placement gives it [", absl::StrJoin(expected, ","), "]"));
  absl::MutexLock lock(&mu_);
  Entry& e = workers_[info.rank];
  e.info = info;
  e.registered = true;
  e.last_heartbeat = now;
  return absl::OkStatus();
}

absl::Status Membership::Heartbeat(int rank, absl::Time now) {
  absl::MutexLock lock(&mu_);
  if (rank < 1 || rank >= static_cast<int>(workers_.size()) || !workers_[rank].registered)
    return absl::NotFoundError(absl::StrCat("rank ", rank, " has not registered"));
  workers_[rank].last_heartbeat = now;
  return absl::OkStatus();
}

void Membership::MarkFailed(const absl::Status& cause) {
  absl::MutexLock lock(&mu_);
  if (failure_.ok()) failure_ = cause;
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
