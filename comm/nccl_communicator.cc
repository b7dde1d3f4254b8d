#include "comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/device_communicator.h"
#include "comm/exchange.h"
#include "comm/watchdog.h"
#include "common/status.h"
#include "kernels/cuda/cuda_check.h"

namespace epx::comm {
namespace {

absl::StatusCode CodeOf(ncclResult_t result) {
  switch (result) {
    case ncclInvalidArgument:
    case ncclInvalidUsage:
      return absl::StatusCode::kInvalidArgument;
    case ncclRemoteError:
    case ncclSystemError:
      return absl::StatusCode::kUnavailable;
    default:
      return absl::StatusCode::kInternal;
  }
}

absl::Status NcclError(ncclResult_t result, const char* expr, const char* file, int line,
                       ncclComm_t comm) {
  const char* last = ncclGetLastError(comm);
  return absl::Status(
      CodeOf(result),
      absl::StrCat("NCCL error ", static_cast<int>(result), " (", ncclGetErrorString(result),
                   ") in ", expr, " at ", file, ":", line,
                   last != nullptr && *last != 0 ? ": " : "", last != nullptr ? last : ""));
}

}  // namespace
}  // namespace epx::comm

// In non-blocking mode a call may answer ncclInProgress: not an error, the caller then waits for
// the communicator to settle (NcclCommunicator::Settle).
#define EPX_NCCL_RETURN_IF_ERROR(expr, handle)                                              \
  do {                                                                                      \
    const ncclResult_t epx_nccl_result_ = (expr);                                           \
    if (epx_nccl_result_ != ncclSuccess && epx_nccl_result_ != ncclInProgress)              \
      return ::epx::comm::NcclError(epx_nccl_result_, #expr, __FILE__, __LINE__, (handle)); \
  } while (0)

namespace epx::comm {
namespace {

constexpr int64_t kMaxMessageBytes = int64_t{1} << 40;

// What the watchdog polls: the communicator's asynchronous error, and the stream (or, for a
// stream of null, whether the communicator has left ncclInProgress).
class NcclProbe final : public WatchProbe {
 public:
  NcclProbe(ncclComm_t comm, cudaStream_t stream, bool* aborted,
            const std::atomic<bool>* interrupted)
      : comm_(comm), stream_(stream), aborted_(aborted), interrupted_(interrupted) {}
  absl::StatusOr<bool> Poll() override {
    if (interrupted_->load(std::memory_order_acquire))
      return absl::UnavailableError("interrupted: the cluster re-forms its data plane");
    ncclResult_t async = ncclSuccess;
    const ncclResult_t got = ncclCommGetAsyncError(comm_, &async);
    if (got != ncclSuccess)
      return NcclError(got, "ncclCommGetAsyncError", __FILE__, __LINE__, comm_);
    if (async != ncclSuccess && async != ncclInProgress)
      return NcclError(async, "an NCCL operation", __FILE__, __LINE__, comm_);
    if (stream_ == nullptr) return async == ncclSuccess;
    const cudaError_t query = cudaStreamQuery(stream_);
    if (query == cudaSuccess) return true;
    if (query == cudaErrorNotReady) return false;
    return cuda::CudaError(query, "cudaStreamQuery", __FILE__, __LINE__);
  }
  void Abort() override {
    if (*aborted_) return;
    *aborted_ = true;
    ncclCommAbort(comm_);
  }

 private:
  ncclComm_t comm_;
  cudaStream_t stream_;
  bool* aborted_;
  const std::atomic<bool>* interrupted_;
};

class NcclCommunicator final : public Communicator, public DeviceCommunicator {
 public:
  explicit NcclCommunicator(NcclOptions options) : options_(std::move(options)) {}

  ~NcclCommunicator() override {
    if (comm_ != nullptr && !aborted_ && interrupted_.load()) {
      // Left for a re-formed data plane: its peers may be gone.
      aborted_ = true;
      ncclCommAbort(comm_);
    }
    if (comm_ != nullptr && !aborted_) {
      // Finalize flushes what is queued; a peer that died meanwhile would keep it waiting, so
      // the wait is bounded and falls back to an abort.
      const ncclResult_t finalize = ncclCommFinalize(comm_);
      const std::atomic<bool> not_interrupted{false};
      NcclProbe settle(comm_, nullptr, &aborted_, &not_interrupted);
      if ((finalize == ncclSuccess || finalize == ncclInProgress) &&
          WaitWithWatchdog(settle, SystemWatchClock(), absl::Seconds(10), Others(), "finalize")
              .ok())
        ncclCommDestroy(comm_);
      else if (!aborted_)
        ncclCommAbort(comm_);
    }
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (device_ != nullptr) cudaFree(device_);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
  }

  absl::Status Init() {
    const NcclOptions& o = options_;
    if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size)
      return absl::InvalidArgumentError(
          absl::StrCat("NCCL rank ", o.rank, " of ", o.world_size, " ranks"));
    if (o.unique_id.size() != sizeof(ncclUniqueId))
      return absl::InvalidArgumentError(absl::StrCat("an NCCL unique id has ", sizeof(ncclUniqueId),
                                                     " bytes, got ", o.unique_id.size()));
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
      return absl::FailedPreconditionError(
          "--data-plane nccl needs a CUDA device on every rank, and this one sees none");
    if (o.cuda_device < 0 || o.cuda_device >= devices)
      return absl::InvalidArgumentError(absl::StrCat("--cuda-device ", o.cuda_device,
                                                     ": this rank sees ", devices, " device(s)"));
    EPX_CUDA_RETURN_IF_ERROR(cudaSetDevice(o.cuda_device));
    EPX_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ncclUniqueId id;
    std::memcpy(&id, o.unique_id.data(), sizeof(id));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    EPX_NCCL_RETURN_IF_ERROR(ncclCommInitRankConfig(&comm_, o.world_size, id, o.rank, &config),
                             comm_);
    return Settle(Others(), "joining the NCCL communicator");
  }

  int rank() const override { return options_.rank; }
  int world_size() const override { return options_.world_size; }
  DeviceCommunicator* device() override { return this; }

  // ---- device exchanges ----

  absl::Status Post(absl::Span<const Transfer> transfers, CUstream_st* stream,
                    const std::string& what) override {
    EPX_RETURN_IF_ERROR(Usable(what));
    for (const Transfer& t : transfers) {
      if (t.peer < 0 || t.peer >= world_size() || t.bytes < 0 || t.bytes > kMaxMessageBytes ||
          (t.bytes > 0 && t.data == nullptr))
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": a transfer of ", t.bytes, " bytes with rank ", t.peer));
    }
    EPX_NCCL_RETURN_IF_ERROR(ncclGroupStart(), comm_);
    for (const Transfer& t : transfers) {
      if (t.bytes == 0) continue;
      const size_t n = static_cast<size_t>(t.bytes);
      const ncclResult_t posted = t.is_send ? ncclSend(t.data, n, ncclUint8, t.peer, comm_, stream)
                                            : ncclRecv(t.data, n, ncclUint8, t.peer, comm_, stream);
      if (posted != ncclSuccess && posted != ncclInProgress) {
        ncclGroupEnd();
        return NcclError(posted, t.is_send ? "ncclSend" : "ncclRecv", __FILE__, __LINE__, comm_);
      }
    }
    EPX_NCCL_RETURN_IF_ERROR(ncclGroupEnd(), comm_);
    // Queuing may still be under way (the first transfer to a peer connects to it).
    return Settle(PeersOf(transfers), what);
  }

  absl::Status Synchronize(CUstream_st* stream, absl::Duration timeout,
                           const std::vector<int>& peers, const std::string& what) override {
    EPX_RETURN_IF_ERROR(Usable(what));
    NcclProbe probe(comm_, stream, &aborted_, &interrupted_);
    return WaitWithWatchdog(probe, SystemWatchClock(), timeout, peers, what);
  }

  // ---- host calls, staged through pinned memory and the communicator's stream ----

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_bytes, void* recv,
                         absl::Span<const int64_t> recv_bytes, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    EPX_RETURN_IF_ERROR(
        CheckAllToAllV(rank(), world_size(), send_bytes, recv_bytes, kMaxMessageBytes, what));
    const int64_t out = std::accumulate(send_bytes.begin(), send_bytes.end(), int64_t{0});
    const int64_t in = std::accumulate(recv_bytes.begin(), recv_bytes.end(), int64_t{0});
    EPX_RETURN_IF_ERROR(Stage(out + in));
    if (out > 0) std::memcpy(pinned_, send, static_cast<size_t>(out));
    EPX_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_, pinned_, static_cast<size_t>(out),
                                             cudaMemcpyHostToDevice, stream_));
    std::vector<Transfer> transfers;
    int64_t send_at = 0, recv_at = out;
    for (int p = 0; p < world_size(); ++p) {
      transfers.push_back(
          {.is_send = false, .peer = p, .data = device_ + recv_at, .bytes = recv_bytes[p]});
      transfers.push_back(
          {.is_send = true, .peer = p, .data = device_ + send_at, .bytes = send_bytes[p]});
      send_at += send_bytes[p];
      recv_at += recv_bytes[p];
    }
    EPX_RETURN_IF_ERROR(Post(transfers, stream_, what));
    EPX_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(pinned_ + out, device_ + out, static_cast<size_t>(in),
                                             cudaMemcpyDeviceToHost, stream_));
    EPX_RETURN_IF_ERROR(Synchronize(stream_, timeout, PeersOf(transfers), what));
    if (in > 0) std::memcpy(recv, pinned_ + out, static_cast<size_t>(in));
    return absl::OkStatus();
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root, Tag tag, absl::Duration timeout,
                         const std::string& what) override {
    if (root < 0 || root >= world_size() || bytes < 0)
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": broadcast of ", bytes, " bytes from rank ", root));
    EPX_RETURN_IF_ERROR(Usable(what));
    EPX_RETURN_IF_ERROR(Stage(bytes));
    const size_t n = static_cast<size_t>(bytes);
    if (rank() == root) {
      std::memcpy(pinned_, data, n);
      EPX_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(device_, pinned_, n, cudaMemcpyHostToDevice, stream_));
    }
    EPX_NCCL_RETURN_IF_ERROR(ncclBroadcast(device_, device_, n, ncclUint8, root, comm_, stream_),
                             comm_);
    const std::vector<int> peers = rank() == root ? Others() : std::vector<int>{root};
    EPX_RETURN_IF_ERROR(Settle(peers, what));
    if (rank() != root)
      EPX_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(pinned_, device_, n, cudaMemcpyDeviceToHost, stream_));
    EPX_RETURN_IF_ERROR(Synchronize(stream_, timeout, peers, what));
    if (rank() != root) std::memcpy(data, pinned_, n);
    return absl::OkStatus();
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv, Tag tag,
                         absl::Duration timeout, const std::string& what) override {
    if (bytes < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": ", bytes, " bytes"));
    EPX_RETURN_IF_ERROR(Usable(what));
    const int64_t all = bytes * world_size();
    EPX_RETURN_IF_ERROR(Stage(bytes + all));
    const size_t n = static_cast<size_t>(bytes);
    std::memcpy(pinned_, send, n);
    EPX_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_, pinned_, n, cudaMemcpyHostToDevice, stream_));
    EPX_NCCL_RETURN_IF_ERROR(ncclAllGather(device_, device_ + bytes, n, ncclUint8, comm_, stream_),
                             comm_);
    EPX_RETURN_IF_ERROR(Settle(Others(), what));
    EPX_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(pinned_ + bytes, device_ + bytes,
                                             static_cast<size_t>(all), cudaMemcpyDeviceToHost,
                                             stream_));
    EPX_RETURN_IF_ERROR(Synchronize(stream_, timeout, Others(), what));
    std::memcpy(recv, pinned_ + bytes, static_cast<size_t>(all));
    return absl::OkStatus();
  }

  void Interrupt() override { interrupted_.store(true, std::memory_order_release); }

  void Abort(int code, const std::string& message) override {
    if (options_.launcher != nullptr) options_.launcher->Abort(code, message);
    std::fprintf(stderr, "epx: rank %d aborting the job: %s\n", rank(), message.c_str());
    std::fflush(stderr);
    if (comm_ != nullptr && !aborted_) {
      aborted_ = true;
      ncclCommAbort(comm_);
    }
    std::_Exit(code);
  }

 private:
  // The other ranks that `transfers` move bytes with, in first-seen order.
  std::vector<int> PeersOf(absl::Span<const Transfer> transfers) const {
    std::vector<int> peers;
    for (const Transfer& t : transfers)
      if (t.bytes > 0 && t.peer != rank() &&
          std::find(peers.begin(), peers.end(), t.peer) == peers.end())
        peers.push_back(t.peer);
    return peers;
  }

  std::vector<int> Others() const {
    std::vector<int> peers;
    for (int p = 0; p < world_size(); ++p)
      if (p != rank()) peers.push_back(p);
    return peers;
  }

  absl::Status Usable(const std::string& what) const {
    if (aborted_)
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": the NCCL communicator was aborted after an earlier failure"));
    return absl::OkStatus();
  }

  // Waits until the communicator has left ncclInProgress (init, or a group being queued).
  absl::Status Settle(const std::vector<int>& peers, const std::string& what) {
    NcclProbe probe(comm_, nullptr, &aborted_, &interrupted_);
    return WaitWithWatchdog(probe, SystemWatchClock(), options_.timeout, peers, what);
  }

  // Staging room for `bytes` on both sides (waits for the stream before it lets memory go).
  absl::Status Stage(int64_t bytes) {
    if (bytes <= capacity_) return absl::OkStatus();
    EPX_RETURN_IF_ERROR(Synchronize(stream_, options_.timeout, Others(), "staging"));
    const int64_t want = std::max<int64_t>(bytes, std::max<int64_t>(2 * capacity_, 4096));
    if (device_ != nullptr) cudaFree(device_);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    device_ = nullptr;
    pinned_ = nullptr;
    capacity_ = 0;
    EPX_CUDA_RETURN_IF_ERROR(cudaMalloc(&device_, static_cast<size_t>(want)));
    EPX_CUDA_RETURN_IF_ERROR(cudaMallocHost(&pinned_, static_cast<size_t>(want)));
    capacity_ = want;
    return absl::OkStatus();
  }

  NcclOptions options_;
  ncclComm_t comm_ = nullptr;
  bool aborted_ = false;
  std::atomic<bool> interrupted_{false};  // set from another thread (Interrupt)
  cudaStream_t stream_ = nullptr;
  uint8_t* device_ = nullptr;  // host calls' staging, capacity_ bytes each
  uint8_t* pinned_ = nullptr;
  int64_t capacity_ = 0;
};

}  // namespace

bool NcclBuilt() { return true; }

absl::StatusOr<std::string> NewNcclUniqueId() {
  ncclUniqueId id;
  EPX_NCCL_RETURN_IF_ERROR(ncclGetUniqueId(&id), nullptr);
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(NcclOptions options) {
  auto comm = std::make_unique<NcclCommunicator>(std::move(options));
  EPX_RETURN_IF_ERROR(comm->Init());
  return std::unique_ptr<Communicator>(std::move(comm));
}

}  // namespace epx::comm
