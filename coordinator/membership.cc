#include "coordinator/membership.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status.h"

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

// What identifies a process once it is gone.
std::string ProcessKey(const WorkerInfo& info) {
  return info.instance.empty() ? absl::StrCat(info.host, ":", info.pid) : info.instance;
}

constexpr size_t kMaxEvents = 256;

}  // namespace

int ClusterEpoch::DataPlaneRank(int rank) const {
  for (size_t i = 1; i < members.size(); ++i)
    if (members[i] == rank) return static_cast<int>(i);
  return -1;
}

Membership::Membership(const Placement* placement, ClusterIdentity identity,
                       const MembershipOptions& options)
    : placement_(placement),
      identity_(std::move(identity)),
      options_(options),
      workers_(placement == nullptr ? 1 : placement->num_workers() + 1) {
  for (int r = 1; r < static_cast<int>(workers_.size()); ++r)
    workers_[r].target = placement->experts_of(r);
}

int Membership::num_workers() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(workers_.size()) - 1;
}

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
  absl::MutexLock lock(&mu_);
  const int num_workers = static_cast<int>(workers_.size()) - 1;
  if (info.rank < 0 || info.rank > std::max(num_workers, max_workers_) ||
      (info.rank == 0 && num_workers == 0))
    return absl::InvalidArgumentError(absl::StrCat("rank ", info.rank,
                                                   " is not a worker of this job (ranks 1..",
                                                   std::max(num_workers, max_workers_), ")"));
  // A growing cluster makes room for the rank asked for.
  if (info.rank > num_workers) workers_.resize(info.rank + 1);
  for (const Removed& r : removed_)
    if (r.key == ProcessKey(info))
      return absl::FailedPreconditionError(absl::StrCat(Name(info),
                                                        " was removed from the cluster (", r.why,
                                                        "); start a new worker to take its place"));
  int rank = 0;
  for (int r = 1; r < static_cast<int>(workers_.size()); ++r) {
    const Entry& e = workers_[r];
    if (e.registered && SameProcess(e.info, info)) rank = r;
  }
  if (rank != 0 && info.rank != 0 && info.rank != rank)
    return absl::AlreadyExistsError(absl::StrCat("the process on ", info.host, " (pid ", info.pid,
                                                 ") is already worker ", rank,
                                                 "; it cannot also be worker ", info.rank));
  const int slots = static_cast<int>(workers_.size()) - 1;
  if (rank == 0 && info.rank != 0) {
    const Entry& held = workers_[info.rank];
    if (held.registered)
      return absl::AlreadyExistsError(absl::StrCat(
          "rank ", info.rank, " is already held by worker ", info.rank, " (", held.info.host,
          " pid ", held.info.pid, "): give each worker its own --rank, or none"));
    rank = info.rank;
  }
  if (rank == 0) {
    for (int r = 1; r <= slots && rank == 0; ++r)
      if (!workers_[r].registered) rank = r;
    // A growing cluster (one that formed) gives a worker beyond its slots a new one.
    if (rank == 0 && slots < max_workers_) {
      workers_.emplace_back();
      rank = slots + 1;
    }
    if (rank == 0)
      return absl::ResourceExhaustedError(absl::StrCat(
          "the cluster already has its ", num_workers, " workers (the coordinator's --workers ",
          num_workers, "): ", Name(info), " is one too many"));
  }
  Entry& e = workers_[rank];
  if (!info.experts.empty() && placement_ != nullptr && info.experts != e.target)
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", rank, " holds experts [", absl::StrJoin(info.experts, ","),
                     "] but the placement gives it [", absl::StrJoin(e.target, ","), "]"));
  if (!e.registered || !SameProcess(e.info, info)) {
    e.back_after = -1;
    e.joined = 0;
    e.reported = false;
    e.loaded.clear();
  }
  e.info = info;
  e.info.rank = rank;
  if (e.info.experts.empty()) e.info.experts = e.target;
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

absl::StatusOr<ClusterEpoch> Membership::AwaitEpoch(int rank, const std::string& instance,
                                                    int64_t after, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto held = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return rank >= 1 && rank < static_cast<int>(workers_.size()) && workers_[rank].registered &&
           (instance.empty() || workers_[rank].info.instance == instance);
  };
  auto removed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> const Removed* {
    for (const Removed& r : removed_)
      if (r.key == instance) return &r;
    return nullptr;
  };
  auto refusal = [&](const Removed& r) {
    if (r.released) return absl::CancelledError(absl::StrCat("worker ", rank, " leaves: ", r.why));
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", rank, " was removed from the cluster (", r.why, ")"));
  };
  if (const Removed* r = removed(); r != nullptr) return refusal(*r);
  if (!held())
    return absl::NotFoundError(absl::StrCat("rank ", rank, " is not registered to this process"));
  workers_[rank].back_after = std::max(workers_[rank].back_after, after);
  auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !held() || (epoch_.number > after && workers_[rank].joined == epoch_.number);
  };
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  if (const Removed* r = removed(); r != nullptr) return refusal(*r);
  if (!held())
    return absl::NotFoundError(absl::StrCat("rank ", rank, " is not registered to this process"));
  if (!ready())
    return absl::UnavailableError(absl::StrCat("no data plane after epoch ", after,
                                               " has formed with worker ", rank, " yet"));
  return epoch_;
}

bool Membership::WaitingLocked(int rank) const {
  const Entry& e = workers_[rank];
  return e.registered && e.back_after >= e.joined;
}

std::vector<int> Membership::AwaitWaiting(const std::vector<int>& ranks,
                                          absl::Duration timeout) const {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  auto count = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return std::count_if(ranks.begin(), ranks.end(), [&](int r) { return WaitingLocked(r); });
  };
  while (true) {
    const absl::Time now = absl::Now();
    bool pending = false;
    for (int r : ranks)
      if (!WaitingLocked(r) && workers_[r].registered &&
          now - workers_[r].last_heartbeat <= options_.heartbeat_timeout)
        pending = true;
    if (!pending || now >= deadline) break;
    // Woken by AwaitEpoch; the heartbeat ages are looked at again at least every 100 ms.
    const auto before = count();
    auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return count() != before; };
    mu_.AwaitWithTimeout(absl::Condition(&changed),
                         std::min(absl::Milliseconds(100), deadline - now));
  }
  std::vector<int> out;
  for (int r : ranks)
    if (WaitingLocked(r)) out.push_back(r);
  return out;
}

void Membership::MarkLost(int rank, const std::string& reason, absl::Time now) {
  absl::MutexLock lock(&mu_);
  RemoveLocked(rank, reason, false, now);
}

void Membership::Release(int rank, const std::string& reason, absl::Time now) {
  absl::MutexLock lock(&mu_);
  RemoveLocked(rank, reason, true, now);
}

void Membership::RemoveLocked(int rank, const std::string& reason, bool released, absl::Time now) {
  if (rank < 1 || rank >= static_cast<int>(workers_.size())) return;
  Entry& e = workers_[rank];
  if (e.registered) removed_.push_back({ProcessKey(e.info), reason, released});
  e.registered = false;
  e.back_after = -1;
  e.joined = 0;
  e.reported = false;
  e.loaded.clear();
  RecordLocked({now, released ? "left" : "lost", rank,
                absl::StrCat("worker ", rank, " (", e.info.host, " pid ", e.info.pid,
                             released ? ") left: " : ") lost: ", reason)});
}

void Membership::PublishEpoch(ClusterEpoch epoch, absl::Time now) {
  absl::MutexLock lock(&mu_);
  std::vector<int> workers(epoch.members.begin() + 1, epoch.members.end());
  for (int r : workers) {
    Entry& e = workers_[r];
    if (e.joined == 0 && epoch.number > 1)
      RecordLocked(
          {now, "joined", r,
           absl::StrCat("worker ", r, " (", e.info.host, " pid ", e.info.pid, ") joined")});
    e.joined = epoch.number;
  }
  epoch_ = std::move(epoch);
  if (epoch_.number > 1)
    RecordLocked({now, "re-formed", 0,
                  absl::StrCat("epoch ", epoch_.number, ": the data plane re-formed with worker",
                               workers.size() == 1 ? " " : "s ", absl::StrJoin(workers, ", "))});
}

ClusterEpoch Membership::epoch() const {
  absl::MutexLock lock(&mu_);
  return epoch_;
}

std::vector<int> Membership::Joiners() const {
  absl::MutexLock lock(&mu_);
  std::vector<int> out;
  for (int r = 1; r < static_cast<int>(workers_.size()); ++r)
    if (workers_[r].registered && workers_[r].joined == 0) out.push_back(r);
  return out;
}

std::vector<int> Membership::Registered() const {
  absl::MutexLock lock(&mu_);
  std::vector<int> out;
  for (int r = 1; r < static_cast<int>(workers_.size()); ++r)
    if (workers_[r].registered) out.push_back(r);
  return out;
}

void Membership::LeftEpoch(int64_t number) {
  absl::MutexLock lock(&mu_);
  left_epoch_ = std::max(left_epoch_, number);
}

int64_t Membership::left_epoch() const {
  absl::MutexLock lock(&mu_);
  return left_epoch_;
}

void Membership::SetNotServing(const std::string& reason, absl::Time now) {
  absl::MutexLock lock(&mu_);
  if (reason == not_serving_) return;
  not_serving_ = reason;
  if (!reason.empty()) RecordLocked({now, "not serving", 0, reason});
}

void Membership::Record(ClusterEvent event) {
  absl::MutexLock lock(&mu_);
  RecordLocked(std::move(event));
}

void Membership::RecordLocked(ClusterEvent event) {
  EPX_LOG(Info) << "cluster: " << event.message;
  events_.push_back(std::move(event));
  if (events_.size() > kMaxEvents) events_.erase(events_.begin());
}

std::vector<ClusterEvent> Membership::events() const {
  absl::MutexLock lock(&mu_);
  return events_;
}

absl::StatusOr<ExpertTarget> Membership::Heartbeat(int rank, const std::string& instance,
                                                   const std::vector<int>& loaded, absl::Time now) {
  EPX_RETURN_IF_ERROR(Heartbeat(rank, instance, now));
  absl::MutexLock lock(&mu_);
  Entry& e = workers_[rank];
  e.loaded = loaded;
  e.reported = true;
  return ExpertTarget{target_version_, e.target};
}

std::pair<int64_t, std::string> Membership::target() const {
  absl::MutexLock lock(&mu_);
  return {target_version_, target_text_.empty() ? epoch_.placement_text : target_text_};
}

void Membership::SetTargets(int64_t version, const std::vector<std::vector<int>>& experts_of,
                            const std::string& text) {
  absl::MutexLock lock(&mu_);
  target_version_ = version;
  target_text_ = text;
  if (experts_of.size() > workers_.size()) workers_.resize(experts_of.size());
  for (size_t r = 1; r < workers_.size(); ++r)
    workers_[r].target = r < experts_of.size() ? experts_of[r] : std::vector<int>{};
}

std::optional<std::vector<int>> Membership::Loaded(int rank) const {
  absl::MutexLock lock(&mu_);
  if (rank < 1 || rank >= static_cast<int>(workers_.size()) || !workers_[rank].registered ||
      !workers_[rank].reported)
    return std::nullopt;
  return workers_[rank].loaded;
}

void Membership::AllowGrowth(int max_workers) {
  absl::MutexLock lock(&mu_);
  max_workers_ = max_workers;
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
  if (!not_serving_.empty()) return not_serving_;
  // Before the first formation every slot; then the current epoch's members.
  std::vector<int> expected;
  for (int r = 1; r < static_cast<int>(workers_.size()); ++r)
    if (epoch_.number == 0 || epoch_.DataPlaneRank(r) > 0) expected.push_back(r);
  for (int rank : expected) {
    const Entry& e = workers_[rank];
    if (!e.registered) return absl::StrCat("worker ", rank, " has not registered");
    if (epoch_.number > 0 && e.joined != epoch_.number)
      return absl::StrCat("worker ", rank, " is joining the data plane");
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
    if (!e.registered) s.info.experts = e.target;
    s.registered = e.registered;
    s.heartbeat_age = e.registered ? now - e.last_heartbeat : absl::InfiniteDuration();
    s.alive = e.registered && s.heartbeat_age <= options_.heartbeat_timeout;
    const int dp = epoch_.DataPlaneRank(static_cast<int>(rank));
    s.member = dp > 0 && e.registered && e.joined == epoch_.number;
    if (s.member && dp < static_cast<int>(epoch_.experts.size()))
      s.info.experts = epoch_.experts[dp];
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace epx
