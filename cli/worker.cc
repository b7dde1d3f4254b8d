// `epx worker`: an expert worker of a cluster formed without a launcher.
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "common/logging.h"
#include "common/status.h"

namespace epx {

absl::Status RunWorker(const WorkerOptions& options, std::ostream& log) {
  if (options.runtime.coordinator.empty())
    return absl::InvalidArgumentError("epx worker needs --coordinator HOST:PORT");
  EPX_ASSIGN_OR_RETURN(std::unique_ptr<Runtime> runtime, Runtime::Start(options.runtime));
  log << "epx worker: rank " << runtime->rank() << " of " << runtime->world_size() << " on "
      << runtime->device() << ", experts "
      << absl::StrJoin(runtime->placement()->experts_of(runtime->rank()), ",") << std::endl;
  absl::Status served = runtime->ServeAsWorker();
  if (served.ok()) log << "epx worker: the coordinator ended the job" << std::endl;
  return served;
}

}  // namespace epx
