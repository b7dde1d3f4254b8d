"""deploy/k8s/: the manifests parse, carry the fields LeaderWorkerSet and Kubernetes need, name
only volumes, Secrets and ConfigMaps that exist; and their containers' commands, run as local
processes with the environment the manifests give, form a working cluster. Run by ctest as
    python k8s_manifests_test.py EPX_BINARY MODEL_DIR
What a single machine without Kubernetes lacks is substituted, each substitution named below
(SUBSTITUTIONS); nothing else of the commands is changed."""

import glob
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

import yaml

EPX, MODEL = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
K8S = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "deploy", "k8s")
IMAGE_EPX = "/opt/epx/bin/epx"
MANIFEST_MODEL = "/models/mixtral-8x7b"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_all():
    """{file name: [documents]} of every YAML file in deploy/k8s/."""
    docs = {}
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        with open(path) as f:
            docs[os.path.basename(path)] = [d for d in yaml.safe_load_all(f) if d is not None]
    return docs


def by_kind(docs, kind):
    return [d for ds in docs.values() for d in ds if d.get("kind") == kind]


def expand(text, env):
    """Kubernetes' $(VAR) expansion (an unknown variable stays as written, as Kubernetes does)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                  text)


def read(path):
    with open(path) as f:
        return f.read()


def poll_until(what, limit_s, fn):
    deadline = time.monotonic() + limit_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %d s waiting for %s" % (limit_s, what))
        time.sleep(0.2)


class K8sManifestsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.docs = load_all()
        cls.dir = tempfile.mkdtemp(prefix="epx_k8s_")

    # ---- the fields -------------------------------------------------------------------------

    def check_pod_spec(self, spec, where, role):
        names = {v["name"] for v in spec.get("volumes", [])}
        self.assertTrue(spec["containers"], where)
        c = spec["containers"][0]
        for field in ("name", "image", "command", "args"):
            self.assertIn(field, c, where)
        self.assertEqual(c["command"], [IMAGE_EPX], where)
        self.assertEqual(c["args"][0], role, where)
        self.assertIn("nvidia.com/gpu", c["resources"]["limits"], where)
        for m in c.get("volumeMounts", []):
            self.assertIn(m["name"], names, "%s mounts an undefined volume %s" % (where, m["name"]))
        secrets = {d["metadata"]["name"] for d in by_kind(self.docs, "Secret")}
        maps = {d["metadata"]["name"] for d in by_kind(self.docs, "ConfigMap")}
        for v in spec.get("volumes", []):
            if "secret" in v:
                self.assertIn(v["secret"]["secretName"], secrets, where)
            if "configMap" in v:
                self.assertIn(v["configMap"]["name"], maps, where)
        if role == "serve":
            probe = c["readinessProbe"]["grpc"]
            self.assertEqual(probe["service"], "epx.v1.Generation", where)
            self.assertEqual(c["livenessProbe"]["httpGet"]["path"], "/health", where)
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            self.assertEqual(probe["port"], ports["grpc"], where)
        return c

    def test_leaderworkerset_has_what_lws_requires(self):
        (lws,) = by_kind(self.docs, "LeaderWorkerSet")
        self.assertEqual(lws["apiVersion"], "leaderworkerset.x-k8s.io/v1")
        self.assertTrue(lws["metadata"]["name"])
        t = lws["spec"]["leaderWorkerTemplate"]
        self.assertIsInstance(t["size"], int)
        self.assertGreaterEqual(t["size"], 2)
        leader = self.check_pod_spec(t["leaderTemplate"]["spec"], "leaderTemplate", "serve")
        self.check_pod_spec(t["workerTemplate"]["spec"], "workerTemplate", "worker")
        self.assertIn("--workers=%d" % (t["size"] - 1), leader["args"])
        self.assertIn("--coordinator=$(LWS_LEADER_ADDRESS):50051",
                      t["workerTemplate"]["spec"]["containers"][0]["args"])

    def test_statefulsets_and_services_match_their_pods(self):
        sets = {d["metadata"]["name"]: d for d in by_kind(self.docs, "StatefulSet")}
        self.assertEqual(set(sets), {"epx-coordinator", "epx-worker"})
        services = {d["metadata"]["name"]: d for d in by_kind(self.docs, "Service")}
        for name, s in sets.items():
            spec = s["spec"]
            labels = spec["template"]["metadata"]["labels"]
            for k, v in spec["selector"]["matchLabels"].items():
                self.assertEqual(labels.get(k), v, name)
            self.assertIn(spec["serviceName"], services, name)
            self.check_pod_spec(spec["template"]["spec"], name,
                                "serve" if name == "epx-coordinator" else "worker")
        coordinator = sets["epx-coordinator"]["spec"]
        self.assertIn("--workers=%d" % sets["epx-worker"]["spec"]["replicas"],
                      coordinator["template"]["spec"]["containers"][0]["args"])
        # Every Service selects the coordinator's pods and targets ports they have.
        pod = coordinator["template"]["metadata"]["labels"]
        ports = {p["name"] for p in coordinator["template"]["spec"]["containers"][0]["ports"]}
        for name, svc in services.items():
            for k, v in svc["spec"]["selector"].items():
                self.assertEqual(pod.get(k), v, name)
            for p in svc["spec"]["ports"]:
                self.assertIn(p.get("targetPort", p["name"]), ports | {p["port"]}, name)
        self.assertEqual({p["port"] for p in services["epx"]["spec"]["ports"]}, {50051, 8000})

    # ---- the commands, as local processes ---------------------------------------------------

    def files_from_secret_and_configmap(self):
        """The Secret's and ConfigMap's data written where the pods mount them (here: files)."""
        (secret,) = by_kind(self.docs, "Secret")
        (placement,) = by_kind(self.docs, "ConfigMap")
        token = os.path.join(self.dir, "token")
        with open(token, "w") as f:
            f.write(secret["stringData"]["token"])
        path = os.path.join(self.dir, "placement.json")
        with open(path, "w") as f:
            f.write(placement["data"]["placement.json"])
        with open(os.path.join(MODEL, "config.json")) as f:
            experts = json.load(f)["num_local_experts"]
        self.assertEqual(len(json.loads(placement["data"]["placement.json"])["experts"]), experts)
        return token, path

    def local_command(self, container, platform_env, ports):
        """The container's command line, $(VAR)-expanded from its env and the platform's, with
        SUBSTITUTIONS applied."""
        env = dict(platform_env)
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            # valueFrom fieldRef status.podIP: the platform's POD_IP (127.0.0.1 here).
        token, placement = self.token, self.placement
        # SUBSTITUTIONS: what one machine without Kubernetes lacks.
        substitutions = [
            (IMAGE_EPX, EPX),                              # the image's binary: this build's
            (MANIFEST_MODEL, MODEL),                       # the PVC's model: the tiny model
            ("/etc/epx/token/token", token),               # the Secret's mount: a file
            ("/etc/epx/placement/placement.json", placement),  # the ConfigMap's mount: a file
            ("--device=cuda", "--device=cpu"),             # no GPU here
            ("--data-plane=nccl", "--data-plane=gloo"),    # ... so the CPU data plane
            ("epx-coordinator-0.epx-coordinator", "127.0.0.1"),  # the headless Service's DNS
            (":50051", ":%d" % ports["grpc"]),             # fixed ports: free ones, so that
            (":8000", ":%d" % ports["http"]),              #   parallel tests do not collide
        ]
        cmd = []
        for part in container["command"] + container["args"]:
            part = expand(part, env)
            for old, new in substitutions:
                part = part.replace(old, new)
            cmd.append(part)
        return cmd

    def run_cluster(self, coordinator, workers, platform_env):
        self.token, self.placement = self.files_from_secret_and_configmap()
        ports = {"grpc": free_port(), "http": free_port()}
        log_path = os.path.join(self.dir, "cluster-%d.log" % ports["grpc"])
        processes = []
        with open(log_path, "w") as log:
            try:
                processes.append(subprocess.Popen(
                    self.local_command(coordinator, platform_env, ports), stdout=log,
                    stderr=subprocess.STDOUT))
                for i, w in enumerate(workers):
                    env = dict(platform_env, LWS_WORKER_INDEX=str(i + 1))
                    processes.append(subprocess.Popen(self.local_command(w, env, ports),
                                                      stdout=log, stderr=subprocess.STDOUT))
                server = "127.0.0.1:%d" % ports["grpc"]
                r = subprocess.run([EPX, "health", "--server", server, "--service",
                                    "epx.v1.Generation", "--wait", "--timeout", "120"],
                                   capture_output=True, text=True, timeout=150)
                self.assertEqual(r.returncode, 0, r.stderr + read(log_path))
                r = subprocess.run([EPX, "generate", "--server", server, "--prompt", "The router",
                                    "--max-tokens", "8", "--ignore-eos"], capture_output=True,
                                   text=True, timeout=120)
                self.assertEqual(r.returncode, 0, r.stderr)
                alone = subprocess.run([EPX, "generate", "--model", MODEL, "--prompt",
                                        "The router", "--max-tokens", "8", "--ignore-eos"],
                                       capture_output=True, text=True, timeout=120)
                self.assertEqual(r.stdout, alone.stdout)
                stats = json.loads(subprocess.run(
                    [EPX, "stats", "--json", "--server", server], capture_output=True, text=True,
                    check=True, timeout=60).stdout)
                self.assertEqual([w["registered"] for w in stats["workers"]],
                                 [True] * len(workers))
                # The liveness probe's endpoint.
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % ports["http"]) as h:
                    self.assertEqual(h.status, 200)
            finally:
                if processes:
                    processes[0].terminate()
                for p in processes:  # the workers leave when their coordinator ends the job
                    try:
                        p.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()

    def test_leaderworkerset_runs_as_local_processes(self):
        (lws,) = by_kind(self.docs, "LeaderWorkerSet")
        t = lws["spec"]["leaderWorkerTemplate"]
        size = t["size"]
        # What LWS and the kubelet give every pod of the group.
        platform = {"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": str(size),
                    "LWS_WORKER_INDEX": "0", "POD_IP": "127.0.0.1"}
        worker = t["workerTemplate"]["spec"]["containers"][0]
        self.run_cluster(t["leaderTemplate"]["spec"]["containers"][0], [worker] * (size - 1),
                         platform)

    def test_statefulsets_run_as_local_processes(self):
        sets = {d["metadata"]["name"]: d for d in by_kind(self.docs, "StatefulSet")}
        coordinator = sets["epx-coordinator"]["spec"]["template"]["spec"]["containers"][0]
        worker = sets["epx-worker"]["spec"]["template"]["spec"]["containers"][0]
        self.run_cluster(coordinator, [worker] * sets["epx-worker"]["spec"]["replicas"],
                         {"POD_IP": "127.0.0.1"})


if __name__ == "__main__":
    unittest.main(verbosity=2)
