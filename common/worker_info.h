// What an expert worker says of itself when it joins a job's control plane; shared by the
// worker's control client and the coordinator's membership view.
#ifndef EPX_COMMON_WORKER_INFO_H_
#define EPX_COMMON_WORKER_INFO_H_

#include <cstdint>
#include <string>
#include <vector>

namespace epx {

struct WorkerInfo {
  int rank = 0;  // asked for at registration (0: any), then the one assigned
  std::string host;
  std::string device;  // "cpu", or the GPU's name
  int pid = 0;
  std::string build_id;
  uint64_t config_hash = 0;
  std::vector<int> experts;  // ascending; empty at registration when the coordinator assigns them
  std::string data_plane;    // resolved: "mpi", "gloo" or "nccl"
  std::string instance;      // random, once per process (empty: host and pid identify it)
};

}  // namespace epx

#endif  // EPX_COMMON_WORKER_INFO_H_
