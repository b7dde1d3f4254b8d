#include "comm/inproc_communicator.h"

#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/exchange.h"
#include "common/status.h"

namespace epx::comm {

class InProcCommunicator : public Communicator {
 public:
  InProcCommunicator(InProcGroup* group, int rank) : group_(group), rank_(rank) {}

  int rank() const override { return rank_; }
  int world_size() const override { return group_->world_size_; }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_bytes, void* recv,
                         absl::Span<const int64_t> recv_bytes, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    const int n = world_size();
    EPX_RETURN_IF_ERROR(CheckAllToAllV(rank_, n, send_bytes, recv_bytes,
                                       std::numeric_limits<int64_t>::max(), what));
    const auto* src = static_cast<const uint8_t*>(send);
    auto* dst = static_cast<uint8_t*>(recv);
    std::vector<int64_t> recv_offset(n + 1, 0);
    for (int p = 0; p < n; ++p) recv_offset[p + 1] = recv_offset[p] + recv_bytes[p];
    int64_t offset = 0;
    for (int p = 0; p < n; ++p) {
      if (p == rank_) {
        if (send_bytes[p] > 0) std::memcpy(dst + recv_offset[p], src + offset, send_bytes[p]);
      } else if (send_bytes[p] > 0) {
        group_->Send(rank_, p, tag, src + offset, send_bytes[p]);
      }
      offset += send_bytes[p];
    }
    std::vector<int> pending;
    for (int p = 0; p < n; ++p)
      if (p != rank_ && recv_bytes[p] > 0) pending.push_back(p);
    return ReceiveAll(pending, tag, timeout, what, [&](int p, const std::string& msg) {
      if (static_cast<int64_t>(msg.size()) != recv_bytes[p])
        return absl::InternalError(absl::StrCat(what, ": rank ", p, " sent ", msg.size(),
                                                " bytes, rank ", rank_, " expected ",
                                                recv_bytes[p]));
      std::memcpy(dst + recv_offset[p], msg.data(), msg.size());
      return absl::OkStatus();
    });
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    if (rank_ == root) {
      for (int p = 0; p < world_size(); ++p)
        if (p != root) group_->Send(rank_, p, tag, data, bytes);
      return absl::OkStatus();
    }
    return ReceiveAll({root}, tag, timeout, what, [&](int p, const std::string& msg) {
      if (static_cast<int64_t>(msg.size()) != bytes)
        return absl::InternalError(
            absl::StrCat(what, ": broadcast of ", msg.size(), " bytes, expected ", bytes));
      std::memcpy(data, msg.data(), bytes);
      return absl::OkStatus();
    });
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv, Tag tag,
                         absl::Duration timeout, const std::string& what) override {
    return AllGatherByAllToAllV(*this, send, bytes, recv, tag, timeout, what);
  }

  void Abort(int code, const std::string& message) override {
    group_->Abort(absl::StrCat("rank ", rank_, " aborted (code ", code, "): ", message));
  }

 private:
  template <typename F>
  absl::Status ReceiveAll(std::vector<int> pending, Tag tag, absl::Duration timeout,
                          const std::string& what, F&& deliver) {
    const absl::Time deadline = absl::Now() + timeout;
    // Receive in rank order; a peer that never answers is reported with every other one still
    // missing at the deadline.
    for (size_t i = 0; i < pending.size(); ++i) {
      std::string msg;
      absl::Status s = group_->Recv(pending[i], rank_, tag, deadline, &msg);
      if (absl::IsDeadlineExceeded(s)) {
        std::vector<int> missing;
        for (size_t j = i; j < pending.size(); ++j)
          if (!group_->Ready(pending[j], rank_, tag)) missing.push_back(pending[j]);
        return absl::DeadlineExceededError(absl::StrCat(
            what, " (", TagName(tag), "): rank(s) ", absl::StrJoin(missing, ", "),
            " did not answer rank ", rank_, " within ", absl::FormatDuration(timeout)));
      }
      if (!s.ok()) return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
      EPX_RETURN_IF_ERROR(deliver(pending[i], msg));
    }
    return absl::OkStatus();
  }

  InProcGroup* group_;
  int rank_;
};

InProcGroup::InProcGroup(int world_size) : world_size_(world_size) {}

std::unique_ptr<Communicator> InProcGroup::Join(int rank) {
  EPX_CHECK(rank >= 0 && rank < world_size_);
  return std::make_unique<InProcCommunicator>(this, rank);
}

void InProcGroup::Send(int src, int dst, Tag tag, const void* data, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (dead_.count(src) || dead_.count(dst)) return;
  mailboxes_[{src, dst, static_cast<int>(tag)}].emplace_back(static_cast<const char*>(data), bytes);
  cv_.notify_all();
}

bool InProcGroup::Ready(int src, int dst, Tag tag) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = mailboxes_.find({src, dst, static_cast<int>(tag)});
  return it != mailboxes_.end() && !it->second.empty();
}

absl::Status InProcGroup::Recv(int src, int dst, Tag tag, absl::Time deadline, std::string* out) {
  std::unique_lock<std::mutex> lock(mu_);
  const Key key{src, dst, static_cast<int>(tag)};
  while (true) {
    if (aborted_) return absl::AbortedError(abort_message_);
    if (dead_.count(dst)) return absl::UnavailableError(absl::StrCat("rank ", dst, " was killed"));
    if (dead_.count(src)) return absl::UnavailableError(absl::StrCat("rank ", src, " is gone"));
    auto it = mailboxes_.find(key);
    if (it != mailboxes_.end() && !it->second.empty()) {
      *out = std::move(it->second.front());
      it->second.pop_front();
      return absl::OkStatus();
    }
    if (deadline == absl::InfiniteFuture()) {
      cv_.wait(lock);
    } else {
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) return absl::DeadlineExceededError("deadline");
      cv_.wait_for(lock, absl::ToChronoNanoseconds(left));
    }
  }
}

void InProcGroup::Kill(int rank) {
  std::lock_guard<std::mutex> lock(mu_);
  dead_.insert(rank);
  cv_.notify_all();
}

void InProcGroup::Abort(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!aborted_) abort_message_ = message;
  aborted_ = true;
  cv_.notify_all();
}

bool InProcGroup::aborted() const {
  std::lock_guard<std::mutex> lock(mu_);
  return aborted_;
}

std::string InProcGroup::abort_message() const {
  std::lock_guard<std::mutex> lock(mu_);
  return abort_message_;
}

}  // namespace epx::comm
