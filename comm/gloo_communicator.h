// The gloo backend of Communicator: the CPU data plane of a cluster formed without a launcher
// (workers started on their own, joined through the coordinator's Register). gloo's TCP
// transport connects every pair of ranks; the peers find each other's addresses in a
// KeyValueStore (the coordinator's, over the control plane).
//
// Exchanges are point-to-point gloo messages (unbound buffers: one per peer and direction,
// zero-byte entries skipped), waited on against the call's deadline, so a rank that stops
// answering is DeadlineExceeded naming it and one that died (its connection closed) Unavailable
// naming it; the exceptions gloo throws on the calling thread never leave this file. A failed
// call leaves the communicator unusable (gloo closes every pair), as the interface says.
//
// gloo trusts its peers on message sizes: both sides take them from the protocol
// (comm::ExpertWire), and a peer that sent more bytes than were posted would end this process
// on gloo's event-loop thread. The data-plane ports take only gloo's own handshake; keep them,
// like the control plane, on the cluster's network.
//
// Thread-compatible: one thread per communicator.
#ifndef EPX_COMM_GLOO_COMMUNICATOR_H_
#define EPX_COMM_GLOO_COMMUNICATOR_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "comm/key_value_store.h"

namespace epx::comm {

struct GlooOptions {
  int rank = 0;
  int world_size = 1;
  // Where the ranks publish and find their addresses; only used during Create. Not owned.
  KeyValueStore* store = nullptr;
  // Prefix of this data plane's keys (one per cluster epoch).
  std::string store_prefix = "gloo/";
  // The address this rank listens on and advertises (a host name or IP). Empty: the address
  // this host's name resolves to. IPv4 unless it is an IPv6 literal.
  std::string host;
  // Limit on the rendezvous: every peer must have published its address and connected by then.
  absl::Duration connect_timeout = absl::Seconds(30);
};

// Connects all ranks (blocks until every rank called it, or connect_timeout). Errors:
// InvalidArgument for bad options, DeadlineExceeded naming the ranks that did not appear,
// Unavailable for a transport failure (with gloo's message).
absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(const GlooOptions& options);

}  // namespace epx::comm

#endif  // EPX_COMM_GLOO_COMMUNICATOR_H_
