// What every Communicator backend's exchanges share: the size checks made before anything is
// posted, the walk over the (peer, direction) pairs that carry bytes, and AllGather as an
// AllToAllV. For backends only (comm/*_communicator.cc); callers use comm/communicator.h.
#ifndef EPX_COMM_EXCHANGE_H_
#define EPX_COMM_EXCHANGE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "comm/communicator.h"

namespace epx::comm {

// One size per rank, none negative or above `max_message_bytes` (ResourceExhausted naming the
// pair), and this rank's block to itself the same both ways (Internal).
absl::Status CheckAllToAllV(int rank, int world_size, absl::Span<const int64_t> send_bytes,
                            absl::Span<const int64_t> recv_bytes, int64_t max_message_bytes,
                            const std::string& what);

// Copies this rank's own block, then calls post(is_send, data, bytes, peer) for every other
// peer with bytes to receive (first) or send, in rank order, over the back-to-back layouts of
// AllToAllV. Returns the first error of `post`.
using PostFn = std::function<absl::Status(bool is_send, void* data, int64_t bytes, int peer)>;
absl::Status PostAllToAllV(int rank, const void* send, absl::Span<const int64_t> send_bytes,
                           void* recv, absl::Span<const int64_t> recv_bytes, const PostFn& post);

// `bytes` of this rank to every rank, gathered in rank order into `recv`, through
// comm.AllToAllV.
absl::Status AllGatherByAllToAllV(Communicator& comm, const void* send, int64_t bytes, void* recv,
                                  Tag tag, absl::Duration timeout, const std::string& what);

}  // namespace epx::comm

#endif  // EPX_COMM_EXCHANGE_H_
