#include "comm/exchange.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx::comm {

absl::Status CheckAllToAllV(int rank, int world_size, absl::Span<const int64_t> send_bytes,
                            absl::Span<const int64_t> recv_bytes, int64_t max_message_bytes,
                            const std::string& what) {
  if (static_cast<int>(send_bytes.size()) != world_size ||
      static_cast<int>(recv_bytes.size()) != world_size)
    return absl::InvalidArgumentError("AllToAllV: one size per rank is needed");
  for (int p = 0; p < world_size; ++p) {
    if (send_bytes[p] < 0 || recv_bytes[p] < 0 || send_bytes[p] > max_message_bytes ||
        recv_bytes[p] > max_message_bytes)
      return absl::ResourceExhaustedError(absl::StrCat(
          what, ": a message of ", std::max(send_bytes[p], recv_bytes[p]), " bytes between ranks ",
          rank, " and ", p, " (the limit is ", max_message_bytes, " bytes, none negative)"));
  }
  if (send_bytes[rank] != recv_bytes[rank])
    return absl::InternalError(absl::StrCat(what, ": rank ", rank, " sends itself ",
                                            send_bytes[rank], " bytes but expects ",
                                            recv_bytes[rank]));
  return absl::OkStatus();
}

absl::Status PostAllToAllV(int rank, const void* send, absl::Span<const int64_t> send_bytes,
                           void* recv, absl::Span<const int64_t> recv_bytes, const PostFn& post) {
  const auto* src = static_cast<const uint8_t*>(send);
  auto* dst = static_cast<uint8_t*>(recv);
  int64_t send_offset = 0, recv_offset = 0;
  for (int p = 0; p < static_cast<int>(send_bytes.size()); ++p) {
    if (p == rank) {
      if (send_bytes[p] > 0) std::memcpy(dst + recv_offset, src + send_offset, send_bytes[p]);
    } else {
      if (recv_bytes[p] > 0) EPX_RETURN_IF_ERROR(post(false, dst + recv_offset, recv_bytes[p], p));
      if (send_bytes[p] > 0)
        EPX_RETURN_IF_ERROR(
            post(true, const_cast<uint8_t*>(src + send_offset), send_bytes[p], p));
    }
    send_offset += send_bytes[p];
    recv_offset += recv_bytes[p];
  }
  return absl::OkStatus();
}

absl::Status AllGatherByAllToAllV(Communicator& comm, const void* send, int64_t bytes, void* recv,
                                  Tag tag, absl::Duration timeout, const std::string& what) {
  if (bytes < 0) return absl::InvalidArgumentError("AllGather: negative size");
  const int world = comm.world_size();
  std::vector<int64_t> sizes(world, bytes);
  std::vector<uint8_t> replicated(bytes * world);
  for (int p = 0; p < world; ++p) std::memcpy(replicated.data() + p * bytes, send, bytes);
  return comm.AllToAllV(replicated.data(), sizes, recv, sizes, tag, timeout, what);
}

}  // namespace epx::comm
