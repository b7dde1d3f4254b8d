#include "comm/gloo_communicator.h"

#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "comm/exchange.h"
#include "common/status.h"

namespace epx::comm {
namespace {

// gloo waits take milliseconds; an infinite wait (an idle worker) becomes a year.
std::chrono::milliseconds ToMillis(absl::Duration d) {
  if (d == absl::InfiniteDuration() || d > absl::Hours(24 * 365)) return std::chrono::hours(24 * 365);
  return std::chrono::milliseconds(std::max<int64_t>(1, absl::ToInt64Milliseconds(d)));
}

// gloo's Store over ours. gloo calls it inside connectFullMesh and knows only exceptions, so a
// failure is kept as a Status and surfaces as an exception that Create turns back into it.
class StoreAdapter : public gloo::rendezvous::Store {
 public:
  StoreAdapter(KeyValueStore* store, std::string prefix, absl::Duration timeout)
      : store_(store), prefix_(std::move(prefix)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    Check(store_->Set(prefix_ + key, std::string(data.begin(), data.end())), key);
  }
  std::vector<char> get(const std::string& key) override {
    absl::StatusOr<std::string> value = store_->Get(prefix_ + key, timeout_);
    Check(value.status(), key);
    return std::vector<char>(value->begin(), value->end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, ToMillis(timeout_)); }
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    const absl::Time deadline = absl::Now() + absl::FromChrono(timeout);
    for (const std::string& key : keys)
      Check(store_->Get(prefix_ + key, std::max(deadline - absl::Now(), absl::ZeroDuration()))
                .status(),
            key);
  }

  const absl::Status& error() const { return error_; }

 private:
  // gloo's keys are the ranks' numbers: the error names the rank.
  void Check(const absl::Status& status, const std::string& key) {
    if (status.ok()) return;
    int rank = -1;
    const std::string digits = absl::StartsWith(key, "rank_") ? key.substr(5) : key;
    if (status.code() == absl::StatusCode::kDeadlineExceeded && absl::SimpleAtoi(digits, &rank)) {
      error_ = absl::DeadlineExceededError(absl::StrCat(
          "data plane rendezvous: rank ", rank, " did not join within ",
          absl::FormatDuration(timeout_)));
    } else {
      error_ = absl::Status(status.code(),
                            absl::StrCat("data plane rendezvous: ", status.message()));
    }
    throw std::runtime_error(std::string(error_.message()));
  }

  KeyValueStore* store_;
  const std::string prefix_;
  const absl::Duration timeout_;
  absl::Status error_;
};

// One posted message: its buffer and peer.
struct Posted {
  std::unique_ptr<gloo::transport::UnboundBuffer> buffer;
  int peer;
  bool is_send;
};

class GlooCommunicator : public Communicator {
 public:
  explicit GlooCommunicator(std::shared_ptr<gloo::rendezvous::Context> context)
      : context_(std::move(context)) {}

  int rank() const override { return context_->rank; }
  int world_size() const override { return context_->size; }
  std::vector<int> failed_peers() const override { return failed_peers_; }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_bytes, void* recv,
                         absl::Span<const int64_t> recv_bytes, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    EPX_RETURN_IF_ERROR(CheckAllToAllV(rank(), world_size(), send_bytes, recv_bytes,
                                       std::numeric_limits<int64_t>::max(), what));
    if (broken_) return Broken(what);
    std::vector<Posted> posted;
    const absl::Time deadline = absl::Now() + timeout;
    EPX_RETURN_IF_ERROR(PostAllToAllV(rank(), send, send_bytes, recv, recv_bytes,
                                      [&](bool is_send, void* data, int64_t bytes, int peer) {
                                        return Post(is_send, data, bytes, peer, tag, what, &posted);
                                      }));
    return WaitAll(posted, tag, timeout, deadline, what);
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    const int n = world_size();
    if (bytes < 0) return absl::InvalidArgumentError("Broadcast: negative size");
    if (root < 0 || root >= n) return absl::InvalidArgumentError("Broadcast: root out of range");
    std::vector<int64_t> send_bytes(n, 0), recv_bytes(n, 0);
    if (rank() == root) {
      for (int p = 0; p < n; ++p)
        if (p != root) send_bytes[p] = bytes;
      // The root sends the same bytes to every peer: one buffer, posted once per peer.
      return Fanout(data, bytes, send_bytes, tag, timeout, what);
    }
    recv_bytes[root] = bytes;
    return AllToAllV(nullptr, send_bytes, data, recv_bytes, tag, timeout, what);
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv, Tag tag,
                         absl::Duration timeout, const std::string& what) override {
    return AllGatherByAllToAllV(*this, send, bytes, recv, tag, timeout, what);
  }

  // Not collective: the process ends, its connections close, and every peer waiting on it sees
  // this rank gone.
  void Abort(int code, const std::string& message) override {
    std::fprintf(stderr, "epx: rank %d aborting the job: %s\n", rank(), message.c_str());
    std::fflush(stderr);
    std::_Exit(code);
  }

 private:
  // Posts one message. A pair that already broke (its peer died since the last call) throws
  // here: that peer is the one lost.
  absl::Status Post(bool is_send, void* data, int64_t bytes, int peer, Tag tag,
                    const std::string& what, std::vector<Posted>* posted) {
    try {
      Posted p{context_->createUnboundBuffer(data, static_cast<size_t>(bytes)), peer, is_send};
      const uint64_t slot = static_cast<uint64_t>(tag);
      if (is_send) {
        p.buffer->send(peer, slot);
      } else {
        p.buffer->recv(peer, slot);
      }
      posted->push_back(std::move(p));
    } catch (const std::exception& e) {
      Failed(peer);
      return Lost(what, tag, peer, e.what());
    }
    return absl::OkStatus();
  }

  absl::Status Lost(const std::string& what, Tag tag, int peer, const char* why) const {
    return absl::UnavailableError(absl::StrCat(what, " (", TagName(tag), "): lost rank ", peer,
                                               " (its connection to rank ", rank(),
                                               " failed: ", why, ")"));
  }

  absl::Status Fanout(void* data, int64_t bytes, absl::Span<const int64_t> send_bytes, Tag tag,
                      absl::Duration timeout, const std::string& what) {
    if (broken_) return Broken(what);
    std::vector<Posted> posted;
    const absl::Time deadline = absl::Now() + timeout;
    for (int p = 0; p < world_size(); ++p)
      if (send_bytes[p] > 0) EPX_RETURN_IF_ERROR(Post(true, data, bytes, p, tag, what, &posted));
    return WaitAll(posted, tag, timeout, deadline, what);
  }

  // Waits for every posted message in turn against the deadline. The first one that fails names
  // its peer: past the deadline it did not answer; before it, its connection broke.
  absl::Status WaitAll(std::vector<Posted>& posted, Tag tag, absl::Duration timeout,
                       absl::Time deadline, const std::string& what) {
    for (Posted& p : posted) {
      try {
        const std::chrono::milliseconds left =
            timeout == absl::InfiniteDuration() ? ToMillis(timeout)
                                                : ToMillis(deadline - absl::Now());
        const bool done = p.is_send ? p.buffer->waitSend(nullptr, left)
                                    : p.buffer->waitRecv(nullptr, left);
        if (!done) throw std::runtime_error("the wait was aborted");
      } catch (const std::exception& e) {
        Failed(p.peer);
        if (timeout != absl::InfiniteDuration() && absl::Now() >= deadline)
          return absl::DeadlineExceededError(absl::StrCat(
              what, " (", TagName(tag), "): rank(s) ", p.peer, " did not answer rank ", rank(),
              " within ", absl::FormatDuration(timeout)));
        return Lost(what, tag, p.peer, e.what());
      }
    }
    return absl::OkStatus();
  }

  void Failed(int peer) {
    broken_ = true;
    failed_peers_.push_back(peer);
    std::sort(failed_peers_.begin(), failed_peers_.end());
    failed_peers_.erase(std::unique(failed_peers_.begin(), failed_peers_.end()),
                        failed_peers_.end());
  }

  absl::Status Broken(const std::string& what) const {
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": the data plane failed earlier and cannot be used"));
  }

  std::shared_ptr<gloo::rendezvous::Context> context_;
  bool broken_ = false;
  std::vector<int> failed_peers_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(const GlooOptions& options) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size)
    return absl::InvalidArgumentError(absl::StrCat("gloo data plane: rank ", options.rank,
                                                   " of ", options.world_size));
  if (options.store == nullptr)
    return absl::InvalidArgumentError("gloo data plane: no rendezvous store");
  // A peer that dies mid-send must become an error on this rank, not SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  StoreAdapter store(options.store, options.store_prefix, options.connect_timeout);
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = options.host;
    // Every rank in one address family, or gloo refuses to connect the pair: IPv4 unless the
    // host is an IPv6 literal (a name that resolves to both would otherwise go either way).
    attr.ai_family = options.host.find(':') != std::string::npos ? AF_INET6 : AF_INET;
    std::shared_ptr<gloo::transport::Device> device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(options.rank, options.world_size);
    context->setTimeout(ToMillis(options.connect_timeout));
    context->connectFullMesh(store, device);
    return std::unique_ptr<Communicator>(new GlooCommunicator(std::move(context)));
  } catch (const std::exception& e) {
    if (!store.error().ok()) return store.error();
    return absl::UnavailableError(absl::StrCat("gloo data plane (rank ", options.rank, " on \"",
                                               options.host.empty() ? "this host's name"
                                                                    : options.host,
                                               "\"): ", e.what()));
  }
}

}  // namespace epx::comm
