#include "comm/mpi_communicator.h"

#include <mpi.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
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

#define EPX_MPI_CALL(call, what)                                               \
  do {                                                                         \
    const int epx_mpi_rc_ = (call);                                            \
    if (epx_mpi_rc_ != MPI_SUCCESS) return MpiError(epx_mpi_rc_, #call, what); \
  } while (0)

class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &world_size_);
  }
  ~MpiCommunicator() override {
    MPI_Comm_free(&comm_);
    MPI_Finalize();
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_bytes, void* recv,
                         absl::Span<const int64_t> recv_bytes, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    const int n = world_size_;
    if (static_cast<int>(send_bytes.size()) != n || static_cast<int>(recv_bytes.size()) != n)
      return absl::InvalidArgumentError("AllToAllV: one size per rank is needed");
    std::vector<MPI_Request> requests;
    std::vector<int> peers;
    const auto* src = static_cast<const uint8_t*>(send);
    auto* dst = static_cast<uint8_t*>(recv);
    int64_t send_offset = 0, recv_offset = 0;
    for (int p = 0; p < n; ++p) {
      if (send_bytes[p] > INT_MAX || recv_bytes[p] > INT_MAX)
        return absl::ResourceExhaustedError(
            absl::StrCat(what, ": a message of more than 2 GiB between ranks ", rank_, " and ", p));
      if (p == rank_) {
        if (send_bytes[p] != recv_bytes[p])
          return absl::InternalError(absl::StrCat(what, ": rank ", rank_, " sends itself ",
                                                  send_bytes[p], " bytes but expects ",
                                                  recv_bytes[p]));
        std::memcpy(dst + recv_offset, src + send_offset, send_bytes[p]);
      } else {
        if (recv_bytes[p] > 0) {
          requests.emplace_back();
          peers.push_back(p);
          EPX_MPI_CALL(MPI_Irecv(dst + recv_offset, static_cast<int>(recv_bytes[p]), MPI_BYTE, p,
                                 static_cast<int>(tag), comm_, &requests.back()),
                       what);
        }
        if (send_bytes[p] > 0) {
          requests.emplace_back();
          peers.push_back(p);
          EPX_MPI_CALL(MPI_Isend(src + send_offset, static_cast<int>(send_bytes[p]), MPI_BYTE, p,
                                 static_cast<int>(tag), comm_, &requests.back()),
                       what);
        }
      }
      send_offset += send_bytes[p];
      recv_offset += recv_bytes[p];
    }
    return WaitAll(requests, peers, tag, timeout, what);
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    if (bytes > INT_MAX) return absl::InvalidArgumentError("Broadcast: more than 2 GiB");
    std::vector<MPI_Request> requests;
    std::vector<int> peers;
    if (rank_ == root) {
      for (int p = 0; p < world_size_; ++p) {
        if (p == root) continue;
        requests.emplace_back();
        peers.push_back(p);
        EPX_MPI_CALL(MPI_Isend(data, static_cast<int>(bytes), MPI_BYTE, p, static_cast<int>(tag),
                               comm_, &requests.back()),
                     what);
      }
    } else {
      requests.emplace_back();
      peers.push_back(root);
      EPX_MPI_CALL(MPI_Irecv(data, static_cast<int>(bytes), MPI_BYTE, root, static_cast<int>(tag),
                             comm_, &requests.back()),
                   what);
    }
    return WaitAll(requests, peers, tag, timeout, what);
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv, Tag tag,
                         absl::Duration timeout, const std::string& what) override {
    std::vector<int64_t> sizes(world_size_, bytes);
    std::vector<uint8_t> replicated(bytes * world_size_);
    for (int p = 0; p < world_size_; ++p) std::memcpy(replicated.data() + p * bytes, send, bytes);
    return AllToAllV(replicated.data(), sizes, recv, sizes, tag, timeout, what);
  }

  void Abort(int code, const std::string& message) override {
    std::fprintf(stderr, "epx: rank %d aborting the job: %s\n", rank_, message.c_str());
    std::fflush(stderr);
    MPI_Abort(comm_, code);
    std::_Exit(code);
  }

 private:
  // Polls until every request completes or the deadline passes. Spins briefly (latency of a
  // decode step), then backs off to short sleeps (an idle worker waiting for the next step).
  absl::Status WaitAll(std::vector<MPI_Request>& requests, const std::vector<int>& peers, Tag tag,
                       absl::Duration timeout, const std::string& what) {
    if (requests.empty()) return absl::OkStatus();
    const absl::Time start = absl::Now();
    const absl::Time deadline = start + timeout;
    int64_t polls = 0;
    while (true) {
      int done = 0;
      const int rc = MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done,
                                 MPI_STATUSES_IGNORE);
      if (rc != MPI_SUCCESS) return MpiError(rc, "MPI_Testall", what);
      if (done) return absl::OkStatus();
      ++polls;
      if (polls % 256 == 0) {
        const absl::Time now = absl::Now();
        if (now >= deadline) break;
        if (now - start > absl::Milliseconds(2))
          std::this_thread::sleep_for(
              std::chrono::microseconds(now - start > absl::Seconds(1) ? 1000 : 50));
      }
    }
    std::vector<int> missing;
    for (size_t i = 0; i < requests.size(); ++i) {
      int flag = 0;
      MPI_Test(&requests[i], &flag, MPI_STATUS_IGNORE);
      if (!flag && (missing.empty() || missing.back() != peers[i])) missing.push_back(peers[i]);
    }
    return absl::DeadlineExceededError(
        absl::StrCat(what, " (", TagName(tag), "): rank(s) ", absl::StrJoin(missing, ", "),
                     " did not answer rank ", rank_, " within ", absl::FormatDuration(timeout)));
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int world_size_ = 1;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(int* argc, char*** argv) {
  int provided = 0;
  int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  if (rc != MPI_SUCCESS) return MpiError(rc, "MPI_Init_thread", "MPI start-up");
  MPI_Comm comm;
  rc = MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  if (rc != MPI_SUCCESS) return MpiError(rc, "MPI_Comm_dup", "MPI start-up");
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  return std::unique_ptr<Communicator>(new MpiCommunicator(comm));
}

}  // namespace epx::comm
