// `epx serve`: the coordinator's gRPC server over the scheduler, or an expert worker with its
// control-plane client.
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "cli/commands.h"
#include "comm/mpi_communicator.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "coordinator/http_server.h"
#include "runtime/runtime.h"
#include "worker/control_client.h"

namespace epx {
namespace {

// A secret only the job's ranks learn (over MPI): control-plane calls must present it.
std::string NewClusterToken() {
  std::random_device device;
  std::string token;
  for (int i = 0; i < 4; ++i) absl::StrAppend(&token, absl::Hex(device(), absl::kZeroPad8));
  return token;
}

// The address workers dial: the advertised host, else the listen host unless it is a wildcard.
std::string ControlAddress(const ServeOptions& options, const std::string& bound) {
  std::string host = options.advertise_host;
  if (host.empty()) {
    host = bound.substr(0, bound.rfind(':'));
    if (host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::") host = HostName();
  }
  return absl::StrCat(host, ":", bound.substr(bound.rfind(':') + 1));
}

// A worker under mpirun: registers with the control plane whose address rank 0 shares over MPI.
absl::Status ServeWorker(Runtime& runtime, const ClientTls& tls) {
  absl::StatusOr<std::string> endpoint = runtime.ShareControlEndpoint("");
  std::unique_ptr<ControlClient> control;
  if (endpoint.ok() && !endpoint->empty()) {
    absl::StatusOr<std::unique_ptr<ControlClient>> started =
        ControlClient::Start(*endpoint, runtime.worker_info(), tls);
    if (started.ok()) {
      control = std::move(*started);
    } else {
      EPX_LOG(Error) << started.status();
    }
  }
  // Whatever happened above, the coordinator ends the job through the data plane.
  return runtime.ServeAsWorker();
}

}  // namespace

absl::Status RunServe(const ServeOptions& options, std::ostream& log) {
  EPX_RETURN_IF_ERROR(options.scheduler.Validate());
  const std::filesystem::path dir(options.runtime.model_dir);
  // Declared in the order they must outlive each other: the server uses the notification, the
  // tokenizer and the runtime's membership and store, and stops before they go. A launcher-free
  // coordinator's server is the runtime's own (it outlives no failed Start).
  absl::Notification shutdown;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Runtime> runtime;
  std::unique_ptr<ApiServer> own_server;
  ApiServer* server = nullptr;

  ApiServerOptions server_options = options.server;
  // Launcher-free, every process is given the token; under mpirun rank 0 draws it and shares it.
  server_options.cluster_token =
      options.runtime.workers > 0 ? options.runtime.cluster_token : NewClusterToken();
  server_options.build_id = BuildId();
  server_options.comm_timeout = options.runtime.comm_timeout;
  server_options.model_name = openai::ModelName(dir);
  // The API server over the runtime's membership: started from inside Runtime::Start in a
  // launcher-free cluster (the workers register through it), after it otherwise.
  auto start_server = [&](Runtime& rt) -> absl::StatusOr<std::unique_ptr<ApiServer>> {
    if (tokenizer == nullptr) {
      EPX_ASSIGN_OR_RETURN(tokenizer, Tokenizer::FromFile((dir / "tokenizer.model").string()));
    }
    server_options.world_size = rt.world_size();
    server_options.placement_name = rt.placement() == nullptr ? "local" : options.runtime.placement;
    ApiServerBackends backends;
    backends.membership = rt.membership();
    backends.tokenizer = tokenizer.get();
    backends.placement = rt.placement();
    backends.store = rt.store();
    backends.set_placement = [&rt](const std::string& json) {
      return rt.RequestPlacement(json, "Admin/SetPlacement");
    };
    backends.drain_worker = [&rt](int rank) { return rt.RequestDrain(rank); };
    backends.on_shutdown = [&shutdown] {
      if (!shutdown.HasBeenNotified()) shutdown.Notify();
      // Also ends a coordinator still waiting for its workers.
      Runtime::RequestStop();
    };
    EPX_ASSIGN_OR_RETURN(std::unique_ptr<ApiServer> started,
                         ApiServer::Start(server_options, backends));
    // Written whole under another name, then renamed: a reader never sees a partial port.
    auto write_port = [](const std::string& file, int port) {
      if (file.empty()) return;
      const std::string tmp = file + ".tmp";
      std::ofstream(tmp) << port << "\n";
      std::filesystem::rename(tmp, file);
    };
    write_port(options.http_port_file, started->http_port());
    write_port(options.port_file, started->port());
    return started;
  };

  // Under mpirun every rank has the same flags: with TLS the workers reach rank 0's control
  // plane over it, checked with --tls-ca, and present the server's certificate where rank 0 asks
  // for client certificates. Checked before the job forms, on every rank alike.
  ClientTlsOptions worker_tls_files;
  if (options.server.tls.enabled() && options.runtime.workers == 0 && comm::LaunchedByMpi()) {
    if (options.tls_ca.empty())
      return absl::InvalidArgumentError(
          "--tls-cert under mpirun needs --tls-ca, the CA that signed it: the workers check the "
          "coordinator's control plane with it");
    worker_tls_files.ca_file = options.tls_ca;
    if (!options.server.tls.client_ca_file.empty()) {
      worker_tls_files.cert_file = options.server.tls.cert_file;
      worker_tls_files.key_file = options.server.tls.key_file;
    }
  }
  EPX_ASSIGN_OR_RETURN(const ClientTls worker_tls, LoadClientTls(worker_tls_files));
  // A secured API with an open control plane would let anyone register as a worker.
  if (options.runtime.workers > 0 && options.runtime.cluster_token.empty() &&
      (options.server.tls.enabled() || options.server.keys.any()))
    return absl::InvalidArgumentError(
        "a launcher-free cluster with TLS or API keys needs a cluster token for its workers: "
        "--cluster-token-file FILE or EPX_CLUSTER_TOKEN, on the coordinator and every worker");

  RuntimeOptions runtime_options = options.runtime;
  runtime_options.listen = options.server.listen;
  runtime_options.start_control_plane = start_server;
  absl::StatusOr<std::unique_ptr<Runtime>> started = Runtime::Start(runtime_options);
  if (!started.ok()) {
    // Admin/Shutdown while the cluster was forming is a clean end, not a failure.
    if (started.status().code() == absl::StatusCode::kCancelled && shutdown.HasBeenNotified()) {
      log << "epx serve: shut down before the cluster formed (" << started.status().message()
          << ")" << std::endl;
      return absl::OkStatus();
    }
    return started.status();
  }
  runtime = *std::move(started);
  if (runtime->is_worker()) return ServeWorker(*runtime, worker_tls);
  server = runtime->control_server();
  if (server == nullptr) {
    absl::StatusOr<std::unique_ptr<ApiServer>> listening = start_server(*runtime);
    if (!listening.ok()) {
      (void)runtime->ShareControlEndpoint("");
      return runtime->Finish(listening.status());
    }
    own_server = *std::move(listening);
    server = own_server.get();
    EPX_RETURN_IF_ERROR(runtime
                            ->ShareControlEndpoint(ControlClient::Endpoint(
                                ControlAddress(options, server->address()),
                                server_options.cluster_token))
                            .status());
  }

  // A launcher-free cluster keeps serving through a lost worker and takes new ones in.
  Scheduler scheduler(&runtime->engine(), tokenizer.get(), options.scheduler,
                      runtime->expert_parallel_stats(),
                      runtime->resilient() ? runtime.get() : nullptr);
  server->SetScheduler(&scheduler);
  const KvCache& kv = runtime->engine().kv_cache();
  log << absl::StrFormat(
             "epx serve: %s on %s (%d process%s%s; KV cache %d blocks of %d tokens; queue %d, "
             "batch %d sequences / %d tokens)",
             server_options.model_name, server->address(), runtime->world_size(),
             runtime->world_size() == 1 ? "" : "es",
             runtime->data_plane().empty() ? "" : ", data plane " + runtime->data_plane(),
             kv.num_blocks(), kv.block_size(), options.scheduler.max_queue,
             options.scheduler.max_running, options.scheduler.max_batch_tokens)
      << std::endl;

  absl::Status run_status;
  absl::Notification run_ended;
  std::thread steps([&] {
    run_status = scheduler.Run();
    run_ended.Notify();
  });
  while (!shutdown.HasBeenNotified() && !run_ended.HasBeenNotified() &&
         !Runtime::stop_requested())
    shutdown.WaitForNotificationWithTimeout(absl::Milliseconds(50));

  if (run_ended.HasBeenNotified()) {
    // The data plane failed: every request has been failed with UNAVAILABLE and readiness is
    // NOT_SERVING. Stay visible for the grace period, then exit non-zero.
    EPX_LOG(Error) << "generation stopped: " << run_status << "; exiting in "
                   << absl::FormatDuration(options.failure_grace);
    runtime->membership()->MarkFailed(run_status);
    shutdown.WaitForNotificationWithTimeout(options.failure_grace);
    server->Shutdown(absl::Seconds(1));
    steps.join();
    return runtime->Finish(run_status);
  }
  log << "epx serve: shutting down" << std::endl;
  scheduler.Stop();
  steps.join();
  server->Shutdown(absl::Seconds(2));
  if (options.stats) runtime->PrintStats(log);
  return runtime->Finish(absl::OkStatus());
}

}  // namespace epx
