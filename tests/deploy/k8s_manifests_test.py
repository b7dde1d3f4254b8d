"""The Kubernetes manifests of deploy/k8s/, without Kubernetes. Run by ctest as
    python k8s_manifests_test.py EPX_BINARY MODEL_DIR
ManifestFieldsTest parses every YAML document there and checks the fields LeaderWorkerSet,
StatefulSet and Service need, and that every volume, Secret, ConfigMap and port the pods name is
defined. ManifestProcessesTest runs each variant (the LeaderWorkerSet, the StatefulSets) as local
processes: every container's command and args, with `$(VAR)` expanded from its environment as
Kubernetes would, changed only where one machine without Kubernetes differs (each change is
stated where it is made); then the coordinator's probes, a greedy request against the same
request on one process, the workers in `epx stats`, and a SIGTERM that ends every process."""

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

try:
    import yaml
except ImportError:
    sys.exit("k8s_manifests_test.py needs PyYAML (tests/requirements.txt; deploy/python-env.sh)")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import epx_test_util as util  # noqa: E402  (tests/epx_test_util.py)

EPX, MODEL = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
del sys.argv[1:3]
K8S_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                        "deploy", "k8s"))
IMAGE_EPX = "/opt/epx/bin/epx"  # the image's binary (deploy/container/)
LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
HEALTH_SERVICE = "epx.v1.Generation"
PROMPT = "The router"
GENERATE = ["generate", "--prompt", PROMPT, "--max-tokens", "8", "--ignore-eos"]
NAMESPACE = "default"
LOCAL_IP = "127.0.0.1"  # every pod's IP, and every name a pod resolves, on this one machine
SHUTDOWN_S = 60


def load_manifests():
    """[(file name, document)] for every YAML document of every file in deploy/k8s/."""
    docs = []
    for name in sorted(os.listdir(K8S_DIR)):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(K8S_DIR, name)) as f:
                docs.extend((name, d) for d in yaml.safe_load_all(f) if d is not None)
    return docs


def objects(docs, kind, file=None):
    return [d for f, d in docs if d.get("kind") == kind and (file is None or f == file)]


def by_name(docs, kind, name):
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    return found[0] if found else None


def object_data(obj):
    """A Secret's or ConfigMap's files as bytes: a Secret's data is base64 (stringData plain);
    a ConfigMap's data is plain (binaryData base64)."""
    encoded, plain = (("data", "stringData") if obj["kind"] == "Secret"
                      else ("binaryData", "data"))
    files = {k: base64.b64decode(v) for k, v in obj.get(encoded, {}).items()}
    files.update({k: v.encode() for k, v in obj.get(plain, {}).items()})
    return files


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())






def http_status(port, path):
    try:
        with urllib.request.urlopen("http://%s:%d%s" % (LOCAL_IP, port, path), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def expand(text, env):
    """Kubernetes' expansion of command, args and env values: $(VAR) from the container's
    environment, $$ for a literal $, a reference to an undefined variable left as written."""
    def one(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, text)


def flag_values(args):
    """{flag: value} of --flag=value and --flag value."""
    values = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            if "=" in arg:
                flag, value = arg.split("=", 1)
                values[flag] = value
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                values[arg] = args[i + 1]
            else:
                values[arg] = None
    return values


def pod_templates(docs):
    """Every pod template of the directory: (where, pod template)."""
    found = []
    for lws in objects(docs, "LeaderWorkerSet"):
        t = lws["spec"]["leaderWorkerTemplate"]
        found.append(("%s leaderTemplate" % lws["metadata"]["name"], t["leaderTemplate"]))
        found.append(("%s workerTemplate" % lws["metadata"]["name"], t["workerTemplate"]))
    for sts in objects(docs, "StatefulSet"):
        found.append(("StatefulSet %s" % sts["metadata"]["name"], sts["spec"]["template"]))
    return found


class Pod:
    """One pod a controller would make: its name, labels, spec and the environment the platform
    puts in its containers (LWS: LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX)."""

    def __init__(self, name, template, labels=None, platform_env=None):
        self.name = name
        self.spec = template["spec"]
        self.labels = dict(template.get("metadata", {}).get("labels", {}), **(labels or {}))
        self.platform_env = platform_env or {}
        self.container = self.spec["containers"][0]


def lws_pods(lws):
    """The pods of group 0 of a LeaderWorkerSet, as LWS labels them: worker index 0 is the
    leader (pod NAME-0), 1..size-1 the workers (NAME-0-INDEX)."""
    name, t = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]
    size = t["size"]
    pods = []
    for index in range(size):
        pod_name = "%s-0" % name if index == 0 else "%s-0-%d" % (name, index)
        template = t["leaderTemplate"] if index == 0 else t["workerTemplate"]
        labels = {LWS_NAME_LABEL: name, LWS_GROUP_INDEX_LABEL: "0",
                  LWS_WORKER_INDEX_LABEL: str(index)}
        # LWS_LEADER_ADDRESS is the leader's name in the headless Service LWS makes
        # (NAME-0.NAME.NAMESPACE); here it resolves to this machine.
        env = {"LWS_LEADER_ADDRESS": LOCAL_IP, "LWS_GROUP_SIZE": str(size),
               "LWS_WORKER_INDEX": str(index)}
        pods.append(Pod(pod_name, template, labels, env))
    return pods


def statefulset_pods(sts):
    return [Pod("%s-%d" % (sts["metadata"]["name"], i), sts["spec"]["template"])
            for i in range(sts["spec"].get("replicas", 1))]


def dns_names(docs):
    """The names a StatefulSet pod has in its governing Service: POD.SERVICE[.NAMESPACE[.svc
    [.cluster.local]]]."""
    names = []
    for sts in objects(docs, "StatefulSet"):
        for pod in statefulset_pods(sts):
            base = "%s.%s" % (pod.name, sts["spec"]["serviceName"])
            names += [base, base + "." + NAMESPACE, base + "." + NAMESPACE + ".svc",
                      base + "." + NAMESPACE + ".svc.cluster.local"]
    return sorted(names, key=len, reverse=True)


class ManifestFieldsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.docs = load_manifests()

    def test_every_document_is_an_object(self):
        self.assertTrue(self.docs, "no YAML in " + K8S_DIR)
        for f, d in self.docs:
            for key in ("apiVersion", "kind", "metadata"):
                self.assertIn(key, d, f)
            self.assertTrue(d["metadata"].get("name"), f)

    def test_leaderworkerset(self):
        sets = objects(self.docs, "LeaderWorkerSet", "leaderworkerset.yaml")
        self.assertEqual(len(sets), 1)
        lws = sets[0]
        self.assertEqual(lws["apiVersion"], LWS_API)
        self.assertTrue(lws["metadata"]["name"])
        spec = lws["spec"]
        self.assertEqual(spec["replicas"], 1)
        # The leader is ready only once its workers joined: they must start before that.
        self.assertEqual(spec.get("startupPolicy"), "LeaderCreated")
        t = spec["leaderWorkerTemplate"]
        self.assertIsInstance(t["size"], int)
        self.assertGreaterEqual(t["size"], 2)
        self.assertEqual(t.get("restartPolicy"), "RecreateGroupOnPodRestart")
        for role, sub in (("serve", "leaderTemplate"), ("worker", "workerTemplate")):
            c = t[sub]["spec"]["containers"][0]
            for key in ("image", "command", "args"):
                self.assertTrue(c.get(key), "%s: %s" % (sub, key))
            self.assertEqual(c["command"], [IMAGE_EPX], sub)
            self.assertEqual(c["args"][0], role, sub)
            self.assertIn("nvidia.com/gpu", c["resources"]["limits"], sub)
            self.assertIn("--cluster-token-file", flag_values(c["args"]), sub)
            self.assertIn("terminationGracePeriodSeconds", t[sub]["spec"], sub)
        leader = t["leaderTemplate"]["spec"]["containers"][0]
        self.assertEqual(leader["readinessProbe"]["grpc"]["service"], HEALTH_SERVICE)
        self.assertEqual(leader["livenessProbe"]["httpGet"]["path"], "/health")
        self.assertEqual(int(flag_values(leader["args"])["--workers"]), t["size"] - 1)
        worker = t["workerTemplate"]["spec"]["containers"][0]
        self.assertEqual(flag_values(worker["args"])["--coordinator"], "$(LWS_LEADER_ADDRESS):%d"
                         % leader["readinessProbe"]["grpc"]["port"])

    def test_service_targets_the_leaders_grpc_and_http(self):
        services = objects(self.docs, "Service", "service.yaml")
        self.assertEqual(len(services), 1)
        svc = services[0]
        pods = lws_pods(objects(self.docs, "LeaderWorkerSet")[0])
        selected = [p for p in pods if matches(svc["spec"]["selector"], p.labels)]
        self.assertEqual([p.name for p in selected], [pods[0].name], "the leader alone")
        self.assertEqual(sorted(p["port"] for p in svc["spec"]["ports"]), [8000, 50051])
        container = pods[0].container
        for p in svc["spec"]["ports"]:
            self.assertEqual(self.container_port(container, p.get("targetPort", p["port"])),
                             p["port"], p)

    def test_statefulsets(self):
        sets = {s["metadata"]["name"]: s for s in objects(self.docs, "StatefulSet",
                                                          "statefulset.yaml")}
        self.assertEqual(sorted(sets), ["epx-coordinator", "epx-worker"])
        for name, sts in sets.items():
            spec = sts["spec"]
            labels = spec["template"]["metadata"]["labels"]
            self.assertTrue(matches(spec["selector"]["matchLabels"], labels), name)
            governing = by_name(self.docs, "Service", spec["serviceName"])
            self.assertIsNotNone(governing, "%s: serviceName %s" % (name, spec["serviceName"]))
            self.assertEqual(governing["spec"].get("clusterIP"), "None", spec["serviceName"])
            self.assertTrue(matches(governing["spec"]["selector"], labels), spec["serviceName"])
            # Workers reach the coordinator, and the coordinator the workers, before it is ready.
            self.assertTrue(governing["spec"].get("publishNotReadyAddresses"), spec["serviceName"])
            c = spec["template"]["spec"]["containers"][0]
            self.assertEqual(c["command"], [IMAGE_EPX], name)
            self.assertIn("nvidia.com/gpu", c["resources"]["limits"], name)
        coordinator = sets["epx-coordinator"]
        self.assertEqual(coordinator["spec"]["replicas"], 1)
        c = coordinator["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(c["args"][0], "serve")
        self.assertEqual(c["readinessProbe"]["grpc"]["service"], HEALTH_SERVICE)
        self.assertEqual(int(flag_values(c["args"])["--workers"]),
                         sets["epx-worker"]["spec"]["replicas"])
        w = sets["epx-worker"]["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(w["args"][0], "worker")
        grpc_port = c["readinessProbe"]["grpc"]["port"]
        self.assertEqual(flag_values(w["args"])["--coordinator"],
                         "epx-coordinator-0.epx-coordinator:%d" % grpc_port)
        # The clients' Service of this variant: the coordinator's gRPC and HTTP.
        clients = [s for s in objects(self.docs, "Service", "statefulset.yaml")
                   if s["spec"].get("clusterIP") != "None"]
        self.assertEqual(len(clients), 1)
        self.assertTrue(matches(clients[0]["spec"]["selector"],
                                coordinator["spec"]["template"]["metadata"]["labels"]))
        self.assertEqual(sorted(p["port"] for p in clients[0]["spec"]["ports"]), [8000, 50051])
        for p in clients[0]["spec"]["ports"]:
            self.assertEqual(self.container_port(c, p.get("targetPort", p["port"])), p["port"])

    def test_every_service_selects_pods_that_have_its_ports(self):
        pods = [p for lws in objects(self.docs, "LeaderWorkerSet") for p in lws_pods(lws)]
        pods += [p for sts in objects(self.docs, "StatefulSet") for p in statefulset_pods(sts)]
        for svc in objects(self.docs, "Service"):
            name = svc["metadata"]["name"]
            selected = [p for p in pods if matches(svc["spec"].get("selector"), p.labels)]
            self.assertTrue(selected, "Service %s selects no pod" % name)
            for port in svc["spec"].get("ports", []):
                for pod in selected:
                    self.container_port(pod.container, port.get("targetPort", port["port"]))

    def container_port(self, container, port):
        """The number of a container port given by name or number; fails if it has none."""
        for p in container.get("ports", []):
            if port in (p.get("name"), p["containerPort"]):
                return p["containerPort"]
        self.fail("container %s has no port %s" % (container["name"], port))

    def test_probes_name_container_ports(self):
        for where, template in pod_templates(self.docs):
            for c in template["spec"]["containers"]:
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    for kind in ("grpc", "httpGet", "tcpSocket"):
                        if kind in c.get(probe, {}):
                            self.container_port(c, c[probe][kind]["port"])

    def test_volumes_secrets_and_configmaps_exist(self):
        for where, template in pod_templates(self.docs):
            spec = template["spec"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec["containers"]:
                mounts = c.get("volumeMounts", [])
                for m in mounts:
                    self.assertIn(m["name"], volumes, "%s: volume %s" % (where, m["name"]))
                # Every path in the args lies in a mounted volume.
                for value in flag_values(c["args"]).values():
                    if value and value.startswith("/"):
                        self.assertTrue(any(value.startswith(m["mountPath"].rstrip("/") + "/")
                                            for m in mounts), "%s: %s" % (where, value))
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {})
                    for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                        if key in ref:
                            self.assertIn(ref[key]["key"], self.keys(kind, ref[key]["name"]),
                                          where)
            for v in volumes.values():
                for kind, key, name_key in (("Secret", "secret", "secretName"),
                                            ("ConfigMap", "configMap", "name")):
                    if key in v:
                        keys = self.keys(kind, v[key][name_key])
                        for item in v[key].get("items", []):
                            self.assertIn(item["key"], keys, where)

    def keys(self, kind, name):
        obj = by_name(self.docs, kind, name)
        self.assertIsNotNone(obj, "%s %s is not in deploy/k8s/" % (kind, name))
        return set(object_data(obj))

    def test_placement_names_every_expert_and_worker_ranks(self):
        with open(os.path.join(MODEL, "config.json")) as f:
            experts = json.load(f)["num_local_experts"]
        cm = by_name(self.docs, "ConfigMap", "epx-placement")
        self.assertIsNotNone(cm, "ConfigMap epx-placement is not in deploy/k8s/")
        placement = json.loads(cm["data"]["placement.json"])
        self.assertEqual(sorted(placement["experts"], key=int), [str(e) for e in range(experts)],
                         "the placement must name the %d experts of %s" % (experts, MODEL))
        for where, template in pod_templates(self.docs):
            args = template["spec"]["containers"][0]["args"]
            if args[0] == "serve":
                workers = int(flag_values(args)["--workers"])
                for ranks in placement["experts"].values():
                    self.assertTrue(ranks and all(1 <= r <= workers for r in ranks), where)

    def test_secret_placeholder(self):
        secret = by_name(self.docs, "Secret", "epx-cluster-token")
        self.assertIn("token", object_data(secret))
        with open(os.path.join(K8S_DIR, "secret.example.yaml")) as f:
            self.assertIn("openssl rand -hex 32", f.read())


class ManifestProcessesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.docs = load_manifests()
        # What the cluster must answer: the same greedy request on one process (the placement
        # never changes the tokens on the CPU).
        cls.expected = subprocess.run([EPX] + GENERATE + ["--model", MODEL], capture_output=True,
                                      check=True, timeout=120).stdout

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="epx_k8s_")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.processes = []  # (pod name, Popen, log path)
        self.addCleanup(self.stop_all)
        # The pods' fixed ports (50051, 8000) become free ones here: every pod of a cluster on
        # one machine shares its ports, and tests run in parallel.
        self.ports = {}

    def local_port(self, port):
        if port not in self.ports:
            self.ports[port] = util.free_port()
        return self.ports[port]

    def volume_dir(self, kind, name, volume):
        """A Secret's or ConfigMap's volume as a directory of files written from its data (its
        items, if any, as their paths)."""
        obj = by_name(self.docs, kind, name)
        self.assertIsNotNone(obj, "%s %s" % (kind, name))
        files = object_data(obj)
        if volume.get("items"):
            files = {i["path"]: files[i["key"]] for i in volume["items"]}
        d = tempfile.mkdtemp(prefix="%s-%s-" % (kind.lower(), name), dir=self.dir)
        for path, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(d, path)), exist_ok=True)
            with open(os.path.join(d, path), "wb") as f:
                f.write(data)
        return d

    def container_env(self, pod):
        """The container's environment as Kubernetes makes it: the platform's variables first
        (LWS prepends its own), then env in order, each value expanded from those before it."""
        env = dict(pod.platform_env)
        for e in pod.container.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
                continue
            ref = e["valueFrom"]
            if "fieldRef" in ref:
                # The downward API: the pod's IP (and the host's) is this machine's loopback.
                fields = {"status.podIP": LOCAL_IP, "status.hostIP": LOCAL_IP,
                          "metadata.name": pod.name, "metadata.namespace": NAMESPACE,
                          "spec.nodeName": socket.gethostname()}
                env[e["name"]] = fields[ref["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
                kind, key = (("Secret", "secretKeyRef") if "secretKeyRef" in ref
                             else ("ConfigMap", "configMapKeyRef"))
                obj = by_name(self.docs, kind, ref[key]["name"])
                env[e["name"]] = object_data(obj)[ref[key]["key"]].decode()
            else:
                self.fail("%s: env %s: valueFrom %s" % (pod.name, e["name"], sorted(ref)))
        return env

    def local_command(self, pod, names):
        """The container's command + args for this machine, and its environment."""
        c = pod.container
        env = self.container_env(pod)
        argv = [expand(a, env) for a in c.get("command", []) + c.get("args", [])]
        unresolved = [a for a in argv if "$(" in a]
        self.assertFalse(unresolved, "%s: variables Kubernetes would not expand" % pod.name)
        # The image's binary is this build's.
        self.assertEqual(argv[0], IMAGE_EPX, pod.name)
        argv[0] = EPX
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        mounts = {}  # mount path -> the directory that stands in for it here
        model_mount = None
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            path = m["mountPath"].rstrip("/")
            if "persistentVolumeClaim" in v:
                # The models' volume is MODEL_DIR's checkpoint (set as --model below).
                model_mount = path
            elif "secret" in v:
                # The cluster token's Secret, as files written from its data.
                mounts[path] = self.volume_dir("Secret", v["secret"]["secretName"], v["secret"])
            elif "configMap" in v:
                # The placement's ConfigMap, as files written from its data.
                mounts[path] = self.volume_dir("ConfigMap", v["configMap"]["name"], v["configMap"])
            elif "emptyDir" not in v:  # emptyDir (/dev/shm): the machine's own
                self.fail("%s: volume %s of a kind this test does not stand in for" %
                          (pod.name, m["name"]))

        def local_value(flag, value):
            if flag == "--model":
                self.assertTrue(model_mount and value.startswith(model_mount + "/"),
                                "%s: --model %s is not on the models' volume" % (pod.name, value))
                # The model in the volume -> MODEL_DIR (the tiny test checkpoint).
                return MODEL
            for path, local in mounts.items():
                if value.startswith(path + "/"):
                    # A path in a Secret's or ConfigMap's mount -> the same file written here.
                    local_path = local + value[len(path):]
                    self.assertTrue(os.path.isfile(local_path),
                                    "%s: %s %s is not in its volume" % (pod.name, flag, value))
                    return local_path
            if flag == "--device" and value == "cuda":
                return "cpu"  # no GPU here: the CPU computes the same tokens
            if flag == "--data-plane" and value == "nccl":
                return "gloo"  # NCCL needs GPUs: gloo, the CPU's launcher-free data plane
            hostport = re.fullmatch(r"(.+):(\d+)", value)
            if hostport:
                host, port = hostport.group(1), int(hostport.group(2))
                # A StatefulSet pod's DNS name (epx-coordinator-0.epx-coordinator) -> this
                # machine, as the pods' IPs are.
                if host in names:
                    host = LOCAL_IP
                return "%s:%d" % (host, self.local_port(port))
            if flag == "--advertise-host" and value in names:
                return LOCAL_IP
            return value

        out = argv[:1]
        args = argv[1:]
        i = 0
        while i < len(args):
            arg = args[i]
            if arg.startswith("--") and "=" in arg:
                flag, value = arg.split("=", 1)
                out.append("%s=%s" % (flag, local_value(flag, value)))
            elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
                out += [arg, local_value(arg, args[i + 1])]
                i += 1
            else:
                out.append(arg)
            i += 1
        container_paths = [p + "/" for p in list(mounts) + [model_mount] if p]
        leftover = [a for a in out if a.split("=", 1)[-1].startswith(tuple(container_paths))]
        self.assertFalse(leftover, "%s: container paths left: %s" % (pod.name, leftover))

        # The host's environment stands in for the image's (PATH, libraries), less whatever
        # would change what epx does: its own variables, a launcher's, LWS's.
        proc_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("EPX_", "OMPI_", "PMI_", "PMIX_", "SLURM_", "LWS_",
                                         "MPI_"))}
        proc_env.update(env)
        return out, proc_env

    def start(self, pod, names):
        argv, env = self.local_command(pod, names)
        log_path = os.path.join(self.dir, pod.name + ".log")
        with open(log_path, "w") as log:
            log.write("$ %s\n" % " ".join(argv))
            log.flush()
            p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
        self.processes.append((pod.name, p, log_path))
        return p

    def logs(self):
        text = []
        for name, _, path in self.processes:
            with open(path, errors="replace") as f:
                text.append("--- %s\n%s" % (name, f.read()[-4000:]))
        return "\n".join(text)

    def stop_all(self):
        """SIGTERM to the coordinator (what Kubernetes sends when the pods go), then every
        process's exit: the workers leave when it tells them; a kill after SHUTDOWN_S."""
        for i, (_, p, _) in enumerate(self.processes):
            if i == 0 and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_S
        for _, p, _ in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return [p.returncode for _, p, _ in self.processes]

    def alive_or_fail(self):
        for name, p, _ in self.processes:
            if p.poll() is not None:
                self.fail("%s exited with %s (its log below)" % (name, p.returncode))

    def run_cluster(self, pods, names):
        coordinators = [p for p in pods if p.container["args"][0] == "serve"]
        workers = [p for p in pods if p.container["args"][0] == "worker"]
        self.assertEqual(len(coordinators), 1)
        coordinator = coordinators[0]
        w = int(flag_values(coordinator.container["args"])["--workers"])
        self.assertEqual(len(workers), w, "the manifest's W")
        c = coordinator.container
        grpc_port = self.local_port(c["readinessProbe"]["grpc"]["port"])
        http_port = self.local_port(c["livenessProbe"]["httpGet"]["port"])
        health_path = c["livenessProbe"]["httpGet"]["path"]
        server = "%s:%d" % (LOCAL_IP, grpc_port)
        try:
            # The leader first (LeaderCreated): alive at once, not ready without its workers.
            self.start(coordinator, names)

            def alive():
                self.alive_or_fail()
                return http_status(http_port, health_path) == 200
            util.poll_until("the coordinator's liveness probe", 60, alive)
            self.assertEqual(http_status(http_port, "/ready"), 503)
            health = subprocess.run([EPX, "health", "--service", HEALTH_SERVICE, "--server",
                                     server, "--timeout", "10"], capture_output=True, text=True,
                                    timeout=30)
            self.assertNotEqual(health.returncode, 0, health.stdout)
            self.assertIn("NOT_SERVING", health.stdout)

            for pod in workers:
                self.start(pod, names)
            # The readiness probe, as the kubelet runs it: gRPC health of the probe's service,
            # asked again until SERVING (and every process still running: a worker refused at
            # registration exits).
            service = c["readinessProbe"]["grpc"]["service"]

            def ready():
                self.alive_or_fail()
                return subprocess.run([EPX, "health", "--service", service, "--timeout", "5",
                                       "--server", server], capture_output=True,
                                      timeout=30).returncode == 0
            util.poll_until("the coordinator's readiness probe", 120, ready)
            self.assertEqual(http_status(http_port, "/ready"), 200)
            self.alive_or_fail()

            out = subprocess.run([EPX] + GENERATE + ["--server", server], capture_output=True,
                                 timeout=120)
            self.assertEqual(out.returncode, 0, out.stderr.decode(errors="replace"))
            self.assertEqual(out.stdout, self.expected)

            stats = json.loads(subprocess.run([EPX, "stats", "--json", "--server", server],
                                              capture_output=True, check=True,
                                              timeout=60).stdout)
            self.assertEqual(len(stats["workers"]), w)
            self.assertEqual(sorted(x["rank"] for x in stats["workers"]), list(range(1, w + 1)))
            self.assertTrue(all(x["registered"] for x in stats["workers"]), stats["workers"])
            # The ConfigMap's placement is the one in force.
            placement = json.loads(by_name(self.docs, "ConfigMap", "epx-placement")["data"]
                                   ["placement.json"])["experts"]
            for x in stats["workers"]:
                self.assertEqual(sorted(x["experts"]), sorted(int(e) for e, ranks in
                                                              placement.items()
                                                              if x["rank"] in ranks))
        except BaseException:
            self.stop_all()
            sys.stderr.write(self.logs() + "\n")
            raise
        codes = self.stop_all()
        # The coordinator ends cleanly on SIGTERM, and every worker leaves (exit 0) when it tells
        # them.
        self.assertEqual(codes, [0] * len(codes), self.logs())
        for name, _, path in self.processes[1:]:
            with open(path) as f:
                self.assertIn("the coordinator ended the job", f.read(), name)

    def test_leaderworkerset_as_processes(self):
        lws = objects(self.docs, "LeaderWorkerSet", "leaderworkerset.yaml")[0]
        self.run_cluster(lws_pods(lws), names=[])

    def test_statefulsets_as_processes(self):
        pods = [p for sts in objects(self.docs, "StatefulSet", "statefulset.yaml")
                for p in statefulset_pods(sts)]
        self.run_cluster(pods, names=dns_names(self.docs))


if __name__ == "__main__":
    unittest.main(verbosity=2)
