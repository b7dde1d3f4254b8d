#include "comm/mpi_communicator.h"

#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/exchange.h"
#include "common/status.h"

namespace epx::comm {
namespace {

// An MPI return code as a Status naming the call and the library's message.
absl::Status MpiError(int code, const char* call, const std::string& what) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return absl::UnavailableError(
      absl::StrCat(what, ": ", call, " failed: ", std::string(text, len)));
}

// Posted requests of one exchange: for each, the peer and, for a receive, the bytes expected.
struct Pending {
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  std::vector<int64_t> expect;  // -1 for a send
};

class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &world_size_);
  }
  // After a failed exchange, requests may still be in flight and peers may be mid-protocol:
  // MPI_Finalize could wait forever, so the job is aborted instead.
  ~MpiCommunicator() override {
    if (broken_) {
      std::fflush(stderr);
      MPI_Abort(comm_, 1);
    }
    MPI_Comm_free(&comm_);
    MPI_Finalize();
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_bytes, void* recv,
                         absl::Span<const int64_t> recv_bytes, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    // Every size is checked before anything is posted; MPI counts are ints.
    EPX_RETURN_IF_ERROR(
        CheckAllToAllV(rank_, world_size_, send_bytes, recv_bytes, INT_MAX, what));
    Pending pending;
    EPX_RETURN_IF_ERROR(PostAllToAllV(rank_, send, send_bytes, recv, recv_bytes,
                                      [&](bool is_send, void* data, int64_t bytes, int peer) {
                                        return Post(is_send, data, bytes, peer, tag, what,
                                                    &pending);
                                      }));
    return WaitAll(pending, tag, timeout, what);
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    if (bytes < 0 || bytes > INT_MAX)
      return absl::InvalidArgumentError("Broadcast: size outside [0, 2 GiB]");
    Pending pending;
    if (rank_ == root) {
      for (int p = 0; p < world_size_; ++p)
        if (p != root) EPX_RETURN_IF_ERROR(Post(true, data, bytes, p, tag, what, &pending));
    } else {
      EPX_RETURN_IF_ERROR(Post(false, data, bytes, root, tag, what, &pending));
    }
    return WaitAll(pending, tag, timeout, what);
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv, Tag tag,
                         absl::Duration timeout, const std::string& what) override {
    return AllGatherByAllToAllV(*this, send, bytes, recv, tag, timeout, what);
  }

  void Abort(int code, const std::string& message) override {
    std::fprintf(stderr, "epx: rank %d aborting the job: %s\n", rank_, message.c_str());
    std::fflush(stderr);
    MPI_Abort(comm_, code);
    std::_Exit(code);
  }

 private:
  absl::Status Post(bool is_send, void* buffer, int64_t bytes, int peer, Tag tag,
                    const std::string& what, Pending* pending) {
    MPI_Request request;
    const int rc = is_send ? MPI_Isend(buffer, static_cast<int>(bytes), MPI_BYTE, peer,
                                       static_cast<int>(tag), comm_, &request)
                           : MPI_Irecv(buffer, static_cast<int>(bytes), MPI_BYTE, peer,
                                       static_cast<int>(tag), comm_, &request);
    if (rc != MPI_SUCCESS) {
      broken_ = true;
      return MpiError(rc, is_send ? "MPI_Isend" : "MPI_Irecv", what);
    }
    pending->requests.push_back(request);
    pending->peers.push_back(peer);
    pending->expect.push_back(is_send ? -1 : bytes);
    return absl::OkStatus();
  }

  // Polls until every request completes or the deadline passes: spins briefly (the latency of a
  // decode step), then backs off to short sleeps (an idle worker waiting for the next step).
  // Checks that each receive got exactly the bytes expected.
  absl::Status WaitAll(Pending& pending, Tag tag, absl::Duration timeout,
                       const std::string& what) {
    if (pending.requests.empty()) return absl::OkStatus();
    const int count = static_cast<int>(pending.requests.size());
    std::vector<MPI_Status> statuses(count);
    const absl::Time start = absl::Now();
    const absl::Time deadline = start + timeout;
    for (int64_t polls = 1;; ++polls) {
      int done = 0;
      const int rc = MPI_Testall(count, pending.requests.data(), &done, statuses.data());
      if (rc != MPI_SUCCESS) {
        broken_ = true;
        return MpiError(rc, "MPI_Testall", what);
      }
      if (done) break;
      if (polls % 256 == 0) {
        const absl::Time now = absl::Now();
        if (now >= deadline) {
          broken_ = true;
          std::vector<int> missing;
          for (int i = 0; i < count; ++i) {
            int flag = 0;
            MPI_Test(&pending.requests[i], &flag, MPI_STATUS_IGNORE);
            if (!flag && (missing.empty() || missing.back() != pending.peers[i]))
              missing.push_back(pending.peers[i]);
          }
          return absl::DeadlineExceededError(absl::StrCat(
              what, " (", TagName(tag), "): rank(s) ", absl::StrJoin(missing, ", "),
              " did not answer rank ", rank_, " within ", absl::FormatDuration(timeout)));
        }
        if (now - start > absl::Milliseconds(2))
          std::this_thread::sleep_for(
              std::chrono::microseconds(now - start > absl::Seconds(1) ? 1000 : 50));
      }
    }
    for (int i = 0; i < count; ++i) {
      if (pending.expect[i] < 0) continue;
      int received = 0;
      MPI_Get_count(&statuses[i], MPI_BYTE, &received);
      if (received != pending.expect[i]) {
        broken_ = true;
        return absl::InternalError(absl::StrCat(what, " (", TagName(tag), "): rank ",
                                                pending.peers[i], " sent ", received,
                                                " bytes, rank ", rank_, " expected ",
                                                pending.expect[i], " (a protocol mismatch)"));
      }
    }
    return absl::OkStatus();
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int world_size_ = 1;
  bool broken_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(int* argc, char*** argv) {
  int provided = 0;
  int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  if (rc != MPI_SUCCESS) return MpiError(rc, "MPI_Init_thread", "MPI start-up");
  if (provided < MPI_THREAD_FUNNELED) {
    MPI_Abort(MPI_COMM_WORLD, 1);
    return absl::FailedPreconditionError("the MPI library does not provide MPI_THREAD_FUNNELED");
  }
  MPI_Comm comm;
  rc = MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  if (rc == MPI_SUCCESS) rc = MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  if (rc != MPI_SUCCESS) {
    const absl::Status status = MpiError(rc, "MPI_Comm_dup", "MPI start-up");
    MPI_Abort(MPI_COMM_WORLD, 1);
    return status;
  }
  return std::unique_ptr<Communicator>(new MpiCommunicator(comm));
}

}  // namespace epx::comm
