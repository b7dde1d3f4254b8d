#include "comm/communicator.h"

#include <cstdlib>

#include "comm/mpi_communicator.h"

namespace epx::comm {

const char* TagName(Tag tag) {
  switch (tag) {
    case Tag::kHandshake:
      return "handshake";
    case Tag::kStepHeader:
      return "step header";
    case Tag::kCounts:
      return "counts";
    case Tag::kDispatch:
      return "dispatch";
    case Tag::kCombine:
      return "combine";
    case Tag::kReady:
      return "ready";
    case Tag::kControlPlane:
      return "control plane";
  }
  return "?";
}

bool LaunchedByMpi() {
  // Open MPI, PMI-1/2 (MPICH, Slurm), PMIx.
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

}  // namespace epx::comm
