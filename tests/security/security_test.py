"""Who may talk to epx: TLS, mutual TLS, bearer keys and the cluster token, through the clients a
user has (grpcio with stubs made from proto/, the `openai` package, the `epx` client commands and
`epx worker`). Started by ctest as
    python security_test.py EPX_BINARY MODEL_DIR
The certificates are made here with openssl: a CA, a server certificate for 127.0.0.1 that it
signed, a client certificate it signed, and a client certificate of another CA."""

import json
import os
import ssl
import subprocess
import sys
import tempfile
import unittest

import grpc
import httpx
import openai

EPX, MODEL = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import epx_test_util as util  # noqa: E402  (tests/epx_test_util.py)
API_KEY, ADMIN_KEY, CLUSTER_TOKEN = "k3y-of-the-api-4f1c", "adm1n-key-9d2e", "cluster-t0ken-77aa"




def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(d):
    """ca.pem signs server.pem (127.0.0.1, localhost) and client.pem; other-ca.pem signs
    other-client.pem."""
    paths = {name: os.path.join(d, name) for name in (
        "ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key",
        "other-ca.pem", "other-ca.key", "other-client.pem", "other-client.key", "ext.cnf")}
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                "/CN=epx test " + ca, "-keyout", paths[ca + ".key"], "-out", paths[ca + ".pem"])
    with open(paths["ext.cnf"], "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
    for name, ca, cn in (("server", "ca", "localhost"), ("client", "ca", "epx test client"),
                         ("other-client", "other-ca", "stranger")):
        csr = os.path.join(d, name + ".csr")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + cn, "-keyout",
                paths[name + ".key"], "-out", csr)
        openssl("x509", "-req", "-in", csr, "-CA", paths[ca + ".pem"], "-CAkey",
                paths[ca + ".key"], "-CAcreateserial", "-days", "2", "-extfile", paths["ext.cnf"],
                "-out", paths[name + ".pem"])
    return paths






class Server:
    """One `epx serve` with the given flags, its gRPC and HTTP addresses and its log."""

    def __init__(self, d, name, *flags, env=None):
        self.dir = os.path.join(d, name)
        os.makedirs(self.dir)
        grpc_file, http_file = os.path.join(self.dir, "grpc"), os.path.join(self.dir, "http")
        self.log_path = os.path.join(self.dir, "server.log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [EPX, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", "--port-file", grpc_file,
             "--http-listen", "127.0.0.1:0", "--http-port-file", http_file, *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.grpc = "127.0.0.1:%d" % util.wait_for_file(grpc_file, self.process)
        self.http_port = util.wait_for_file(http_file, self.process)

    def stop(self):
        util.stop([self.process])
        self.log.close()

    def text(self):
        return util.read(self.log_path)


def epx(*args, env=None):
    r = subprocess.run([EPX, *args], capture_output=True, env=env, timeout=120)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


class SecurityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="epx_security_")
        stubs = util.proto_stubs(os.path.join(cls.dir, "stubs"), "generation", "admin")
        (cls.gen_pb2, cls.gen_grpc), (cls.admin_pb2, cls.admin_grpc) = (stubs["generation"],
                                                                        stubs["admin"])
        cls.pem = make_certificates(cls.dir)
        cls.servers = []

    @classmethod
    def tearDownClass(cls):
        for s in cls.servers:
            s.stop()

    def serve(self, name, *flags, env=None):
        s = Server(self.dir, name, *flags, env=env)
        self.servers.append(s)
        return s

    def tls_channel(self, server, client_cert=None):
        root = util.read(self.pem["ca.pem"], "rb")
        key = chain = None
        if client_cert is not None:
            key, chain = util.read(self.pem[client_cert + ".key"], "rb"), util.read(
                self.pem[client_cert + ".pem"], "rb")
        credentials = grpc.ssl_channel_credentials(root, key, chain)
        return grpc.secure_channel(server.grpc, credentials)

    def ssl_context(self, client_cert=None):
        """Trusts ca.pem; presents client_cert ("client", "other-client") if given."""
        context = ssl.create_default_context(cafile=self.pem["ca.pem"])
        if client_cert is not None:
            context.load_cert_chain(self.pem[client_cert + ".pem"], self.pem[client_cert + ".key"])
        return context

    def greedy_text(self, stub, metadata=(), timeout=60):
        request = self.gen_pb2.GenerateRequest(text="The router", max_tokens=6, temperature=0,
                                               ignore_eos=True)
        return "".join(r.text for r in stub.Generate(request, metadata=metadata,
                                                     timeout=timeout))

    def assert_code(self, call, code):
        with self.assertRaises(grpc.RpcError) as caught:
            call()
        self.assertEqual(caught.exception.code(), code, caught.exception.details())
        return caught.exception.details()

    def test_tls_with_keys(self):
        """TLS on both APIs; every client and admin call needs its key; health stays open."""
        s = self.serve("keys", "--tls-cert", self.pem["server.pem"], "--tls-key",
                       self.pem["server.key"], "--api-key", API_KEY, "--admin-key", ADMIN_KEY)
        ca = ["--tls-ca", self.pem["ca.pem"]]
        rc, out, err = epx("health", "--server", s.grpc, "--service", "epx.v1.Generation",
                           "--wait", "--timeout", "60", *ca)
        self.assertEqual(rc, 0, err)  # health needs no key
        self.assertIn("SERVING", out)

        # The expected text, from the same server with the right key.
        rc, expected, err = epx("generate", "--server", s.grpc, "--prompt", "The router",
                                "--max-tokens", "6", "--ignore-eos", "--api-key", API_KEY, *ca)
        self.assertEqual(rc, 0, err)
        expected = expected[:-1]

        with self.tls_channel(s) as channel:
            gen = self.gen_grpc.GenerationStub(channel)
            admin = self.admin_grpc.AdminStub(channel)
            client = (("authorization", "Bearer " + API_KEY),)
            admin_key = (("authorization", "Bearer " + ADMIN_KEY),)
            wrong = (("authorization", "Bearer not-the-key"),)
            self.assertEqual(self.greedy_text(gen, client), expected)
            self.assertEqual(self.greedy_text(gen, admin_key), expected)  # admin grants all
            unauth = grpc.StatusCode.UNAUTHENTICATED
            calls = {
                "Generate": lambda md: self.greedy_text(gen, md),
                "Tokenize": lambda md: gen.Tokenize(self.gen_pb2.TokenizeRequest(text="x"),
                                                    metadata=md, timeout=30),
                "ModelInfo": lambda md: gen.ModelInfo(self.gen_pb2.ModelInfoRequest(),
                                                      metadata=md, timeout=30),
                "Stats": lambda md: admin.Stats(self.admin_pb2.StatsRequest(), metadata=md,
                                                timeout=30),
            }
            for name, call in calls.items():
                with self.subTest(call=name):
                    details = self.assert_code(lambda: call(()), unauth)
                    self.assertIn("authorization: Bearer", details)
                    self.assert_code(lambda: call(wrong), unauth)
                    call(client)
            admin_calls = {
                "Drain": lambda md: admin.Drain(self.admin_pb2.DrainRequest(), metadata=md,
                                                timeout=30),
                "GetPlacement": lambda md: admin.GetPlacement(
                    self.admin_pb2.GetPlacementRequest(), metadata=md, timeout=30),
                "SetPlacement": lambda md: admin.SetPlacement(
                    self.admin_pb2.SetPlacementRequest(placement_json="{}"), metadata=md,
                    timeout=30),
                "DrainWorker": lambda md: admin.DrainWorker(
                    self.admin_pb2.DrainWorkerRequest(rank=1), metadata=md, timeout=30),
                "Shutdown": lambda md: admin.Shutdown(self.admin_pb2.ShutdownRequest(),
                                                      metadata=md, timeout=30),
            }
            for name, call in admin_calls.items():
                with self.subTest(call=name):
                    self.assert_code(lambda: call(()), unauth)
                    self.assert_code(lambda: call(wrong), unauth)
                    details = self.assert_code(lambda: call(client), unauth)  # not the API key
                    self.assertIn("admin key", details)
            # The admin key passes the check (the placement of one process is fixed).
            self.assert_code(lambda: admin_calls["SetPlacement"](admin_key),
                             grpc.StatusCode.FAILED_PRECONDITION)
            info = calls["ModelInfo"](client)
            stats = calls["Stats"](client)

        # A plain-text client of the TLS port, and a TLS client that does not trust its CA.
        with grpc.insecure_channel(s.grpc) as plain:
            self.assert_code(lambda: self.greedy_text(self.gen_grpc.GenerationStub(plain), client,
                                                      timeout=5), grpc.StatusCode.UNAVAILABLE)
        rc, _, err = epx("generate", "--server", s.grpc, "--prompt", "x", "--api-key", API_KEY,
                         "--timeout", "5")
        self.assertNotEqual(rc, 0)
        other_ca = ["--tls-ca", self.pem["other-ca.pem"]]
        rc, _, err = epx("stats", "--server", s.grpc, "--api-key", API_KEY, "--timeout", "5",
                         *other_ca)
        self.assertNotEqual(rc, 0)
        self.assertIn("UNAVAILABLE".lower(), (err + "unavailable").lower())

        # The client commands: keys from the flags or the environment.
        env = dict(os.environ, EPX_API_KEY=API_KEY)
        rc, out, err = epx("stats", "--server", s.grpc, "--json", *ca, env=env)
        self.assertEqual(rc, 0, err)
        rc, _, err = epx("drain", "--server", s.grpc, *ca, env=env)
        self.assertNotEqual(rc, 0)
        self.assertIn("admin key", err)

        # HTTP: the same keys, TLS with the CA; health, readiness and metrics open.
        base = "https://127.0.0.1:%d" % s.http_port
        with httpx.Client(verify=self.pem["ca.pem"]) as http:
            for path in ("/health", "/ready", "/metrics", "/"):
                self.assertEqual(http.get(base + path).status_code, 200, path)
            for path in ("/v1/models", "/v1/epx/stats"):
                r = http.get(base + path)
                self.assertEqual(r.status_code, 401, path)
                self.assertEqual(r.headers.get("www-authenticate"), "Bearer")
                self.assertEqual(r.json()["error"]["type"], "authentication_error")
                self.assertEqual(http.get(base + path, headers={
                    "Authorization": "Bearer " + API_KEY}).status_code, 200, path)
            r = http.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            self.assertEqual(r.status_code, 401)
        with httpx.Client(verify=False) as insecure, httpx.Client() as system_roots:
            # A client that trusts only the system's CAs refuses the server.
            with self.assertRaises(httpx.ConnectError):
                system_roots.get(base + "/health")
            self.assertEqual(insecure.get(base + "/health").status_code, 200)
        ok = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0,
                           http_client=httpx.Client(verify=self.pem["ca.pem"]))
        completion = ok.completions.create(model=ok.models.list().data[0].id, prompt="The router",
                                           max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
        self.assertEqual(completion.choices[0].text, expected)
        bad = openai.OpenAI(base_url=base + "/v1", api_key="not-the-key", max_retries=0,
                            http_client=httpx.Client(verify=self.pem["ca.pem"]))
        with self.assertRaises(openai.AuthenticationError):
            bad.completions.create(model="tiny-mixtral", prompt="x", max_tokens=2)

        # The admin key shuts it down; no secret is in the log, ModelInfo or Stats.
        rc, _, err = epx("shutdown", "--server", s.grpc, "--admin-key", ADMIN_KEY, *ca)
        self.assertEqual(rc, 0, err)
        self.assertEqual(s.process.wait(timeout=60), 0)
        log = s.text()
        self.assertIn("refused Generate from", log)
        self.assertIn("refused GET /v1/models from", log)
        for secret in (API_KEY, ADMIN_KEY):
            self.assertNotIn(secret, log)
            self.assertNotIn(secret, str(info))
            self.assertNotIn(secret, str(stats))
            self.assertNotIn(secret, out)

    def test_mutual_tls(self):
        """With a client CA, a client without a certificate, or with one of another CA, is
        refused on gRPC and HTTP."""
        s = self.serve("mtls", "--tls-cert", self.pem["server.pem"], "--tls-key",
                       self.pem["server.key"], "--tls-client-ca", self.pem["ca.pem"])
        mine = ["--tls-ca", self.pem["ca.pem"], "--tls-cert", self.pem["client.pem"],
                "--tls-key", self.pem["client.key"]]
        rc, out, err = epx("health", "--server", s.grpc, "--service", "epx.v1.Generation",
                           "--wait", "--timeout", "60", *mine)
        self.assertEqual(rc, 0, err)
        with self.tls_channel(s, "client") as channel:
            self.assertTrue(self.greedy_text(self.gen_grpc.GenerationStub(channel)))
        for cert in (None, "other-client"):
            with self.subTest(client_cert=cert), self.tls_channel(s, cert) as channel:
                self.assert_code(
                    lambda: self.greedy_text(self.gen_grpc.GenerationStub(channel), timeout=5),
                    grpc.StatusCode.UNAVAILABLE)
        rc, _, err = epx("stats", "--server", s.grpc, "--tls-ca", self.pem["ca.pem"],
                         "--timeout", "5")
        self.assertNotEqual(rc, 0)
        rc, _, err = epx("stats", "--server", s.grpc, *mine)
        self.assertEqual(rc, 0, err)
        base = "https://127.0.0.1:%d" % s.http_port
        with httpx.Client(verify=self.ssl_context("client")) as http:
            self.assertEqual(http.get(base + "/v1/models").status_code, 200)
        for cert in (None, "other-client"):
            with self.subTest(http_client_cert=cert), httpx.Client(
                    verify=self.ssl_context(cert)) as http:
                with self.assertRaises((httpx.ConnectError, httpx.ReadError,
                                        httpx.RemoteProtocolError)):
                    http.get(base + "/v1/models")

    def test_bad_files_and_flags_are_refused_at_start(self):
        cases = [
            (["--tls-cert", self.pem["server.pem"]], "--tls-cert and --tls-key go together"),
            (["--tls-client-ca", self.pem["ca.pem"]], "--tls-client-ca needs --tls-cert"),
            (["--tls-cert", self.pem["server.key"], "--tls-key", self.pem["server.key"]],
             "not a PEM file with a CERTIFICATE block"),
            (["--tls-cert", self.pem["server.pem"], "--tls-key", "/nonexistent/key.pem"],
             "cannot be read"),
            (["--workers", "1", "--api-key", API_KEY], "needs a cluster token"),
        ]
        for flags, message in cases:
            with self.subTest(flags=flags):
                r = subprocess.run([EPX, "serve", "--model", MODEL, "--listen", "127.0.0.1:0",
                                    *flags], capture_output=True, timeout=60,
                                   env={k: v for k, v in os.environ.items()
                                        if not k.startswith("EPX_")})
                self.assertNotEqual(r.returncode, 0)
                self.assertIn(message, r.stderr.decode())

    def test_cluster_over_mutual_tls_takes_only_members(self):
        """A launcher-free cluster with TLS, client certificates, an API key and a cluster token:
        a worker with the wrong token is refused (and logged), one without the CA cannot reach
        the coordinator, and one with both joins; the cluster then gives the same text as one
        process."""
        token_file = os.path.join(self.dir, "token")
        with open(token_file, "w") as f:
            f.write(CLUSTER_TOKEN + "\n")
        wrong_file = os.path.join(self.dir, "wrong-token")
        with open(wrong_file, "w") as f:
            f.write("not-the-token\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPX_")}
        tls = ["--tls-cert", self.pem["server.pem"], "--tls-key", self.pem["server.key"]]
        s = self.serve("cluster", *tls, "--tls-client-ca", self.pem["ca.pem"], "--workers", "1",
                       "--data-plane", "gloo", "--cluster-token-file", token_file, "--api-key",
                       API_KEY, env=env)
        worker_tls = ["--tls-ca", self.pem["ca.pem"], "--tls-cert", self.pem["client.pem"],
                      "--tls-key", self.pem["client.key"]]
        base = [EPX, "worker", "--model", MODEL, "--coordinator", s.grpc, "--data-plane", "gloo"]
        r = subprocess.run(base + worker_tls + ["--cluster-token-file", wrong_file,
                                                "--register-timeout", "30"],
                           capture_output=True, timeout=120, env=env)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("not a member of this job", r.stderr.decode())
        r = subprocess.run(base + ["--cluster-token-file", token_file, "--register-timeout",
                                   "3"], capture_output=True, timeout=120, env=env)
        self.assertNotEqual(r.returncode, 0)  # plain text to a TLS coordinator
        worker_log = open(os.path.join(self.dir, "worker.log"), "w")
        worker = subprocess.Popen(base + worker_tls + ["--cluster-token-file", token_file],
                                  stdout=worker_log, stderr=subprocess.STDOUT, env=env)
        try:
            client = ["--server", s.grpc, "--api-key", API_KEY] + worker_tls
            rc, out, err = epx("health", "--service", "epx.v1.Generation", "--wait", "--timeout",
                               "120", *client, env=env)
            self.assertEqual(rc, 0, err + s.text())
            rc, text, err = epx("generate", "--prompt", "The router", "--max-tokens", "8",
                                "--ignore-eos", *client, env=env)
            self.assertEqual(rc, 0, err)
            rc, alone, err = epx("generate", "--model", MODEL, "--prompt", "The router",
                                 "--max-tokens", "8", "--ignore-eos", env=env)
            self.assertEqual(rc, 0, err)
            self.assertEqual(text, alone)
            rc, out, err = epx("stats", "--json", *client, env=env)
            self.assertEqual(rc, 0, err)
            stats = json.loads(out)
            self.assertEqual([w["registered"] for w in stats["workers"]], [True])
        finally:
            s.stop()
            worker.wait(timeout=60)
            worker_log.close()
        log = s.text()
        self.assertIn("control-plane call without this job's token", log)
        for secret in (API_KEY, CLUSTER_TOKEN):
            self.assertNotIn(secret, log)
            self.assertNotIn(secret, util.read(os.path.join(self.dir, "worker.log")))
            self.assertNotIn(secret, out)


if __name__ == "__main__":
    unittest.main()
