"""The HTTP front end through the real clients a user has: the official `openai` package and
prometheus-client's text parser. Started by ctest as
    python openai_api_test.py EPX_BINARY MODEL_DIR
It runs one `epx serve --http-listen` and checks that the HTTP answers equal the gRPC ones
(through Python's grpcio with stubs made from proto/ by grpcio-tools, and `epx generate
--server`) for the same seed, that every unsupported or bad field is a 400
naming it, and that /metrics parses and agrees with `epx stats --json`."""

import json
import os
import subprocess
import sys
import tempfile
import unittest
import urllib.error
import urllib.request

import grpc
import openai
from prometheus_client.parser import text_string_to_metric_families

EPX, MODEL = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import epx_test_util as util  # noqa: E402  (tests/epx_test_util.py)






class OpenAiApiTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="epx_http_")
        # Before the server starts.
        cls.pb2, pb2_grpc = util.proto_stubs(os.path.join(cls.dir, "stubs"),
                                             "generation")["generation"]
        grpc_file, http_file = os.path.join(cls.dir, "grpc"), os.path.join(cls.dir, "http")
        cls.log = open(os.path.join(cls.dir, "server.log"), "w")
        cls.server = subprocess.Popen(
            [EPX, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", "--port-file", grpc_file,
             "--http-listen", "127.0.0.1:0", "--http-port-file", http_file],
            stdout=cls.log, stderr=subprocess.STDOUT)
        cls.grpc = "127.0.0.1:%d" % util.wait_for_file(grpc_file, cls.server)
        cls.http = "http://127.0.0.1:%d" % util.wait_for_file(http_file, cls.server)
        subprocess.run([EPX, "health", "--server", cls.grpc, "--service", "epx.v1.Generation",
                        "--wait"], check=True, capture_output=True)
        cls.client = openai.OpenAI(base_url=cls.http + "/v1", api_key="unused", max_retries=0)
        cls.model = cls.client.models.list().data[0].id
        cls.channel = grpc.insecure_channel(cls.grpc)
        cls.stub = pb2_grpc.GenerationStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        subprocess.run([EPX, "shutdown", "--server", cls.grpc], capture_output=True)
        cls.server.wait(timeout=60)
        cls.log.close()

    def grpc_text(self, *args):
        r = subprocess.run([EPX, "generate", "--server", self.grpc, *args], capture_output=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.decode("utf-8", errors="replace")
        self.assertTrue(out.endswith("\n"))
        return out[:-1]

    def grpcio_text(self, **fields):
        """The text of one Generate stream through grpcio, and its last response."""
        text, last = "", None
        for response in self.stub.Generate(self.pb2.GenerateRequest(**fields), timeout=60):
            text += response.text
            last = response
        self.assertEqual(self.pb2.FinishReason.Name(last.finish_reason), "FINISH_REASON_LENGTH")
        return text, last

    def test_grpcio_and_openai_give_the_same_text_for_the_same_seed(self):
        text, last = self.grpcio_text(text="The router picks", max_tokens=11, temperature=0.9,
                                      top_p=0.95, seed=21)
        whole = self.client.completions.create(model=self.model, prompt="The router picks",
                                               max_tokens=11, temperature=0.9, top_p=0.95,
                                               seed=21)
        self.assertEqual(whole.choices[0].text, text)
        self.assertEqual(whole.usage.prompt_tokens, last.usage.prompt_tokens)
        self.assertEqual(whole.usage.completion_tokens, last.usage.completion_tokens)
        chat = self.pb2.Chat(messages=[self.pb2.ChatMessage(role="user", content="Hello")])
        text, _ = self.grpcio_text(chat=chat, max_tokens=7, temperature=1, seed=5)
        stream = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=7,
            temperature=1, seed=5, stream=True)
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in stream), text)

    def test_models_health_ready(self):
        self.assertEqual(self.model, os.path.basename(os.path.normpath(MODEL)))
        for path in ("/health", "/ready"):
            with urllib.request.urlopen(self.http + path) as r:
                self.assertEqual(r.status, 200)
        with urllib.request.urlopen(self.http + "/ready") as r:
            self.assertEqual(json.load(r), {"ready": True, "reason": ""})

    def test_completions_equal_grpc_for_the_same_seed(self):
        prompt = "Mixture of experts"
        sampling = dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=12)
        expected = self.grpc_text("--prompt", prompt, "--temperature", "0.8", "--top-p", "0.9",
                                  "--seed", "7", "--max-tokens", "12")
        whole = self.client.completions.create(model=self.model, prompt=prompt, **sampling)
        self.assertEqual(whole.choices[0].text, expected)
        self.assertEqual(whole.usage.completion_tokens, 12)
        self.assertEqual(whole.choices[0].finish_reason, "length")
        chunks = list(self.client.completions.create(
            model=self.model, prompt=prompt, stream=True,
            stream_options={"include_usage": True}, **sampling))
        self.assertEqual("".join(c.choices[0].text for c in chunks if c.choices), expected)
        self.assertEqual(chunks[-1].usage.completion_tokens, 12)
        self.assertEqual(chunks[-1].usage.prompt_tokens, whole.usage.prompt_tokens)
        # Greedy too, and with epx's own extra fields.
        greedy = self.grpc_text("--prompt", "Hello world", "--max-tokens", "9",
                                "--repetition-penalty", "1.3", "--ignore-eos")
        got = self.client.completions.create(
            model=self.model, prompt="Hello world", max_tokens=9, temperature=0,
            extra_body={"repetition_penalty": 1.3, "ignore_eos": True, "top_k": 0})
        self.assertEqual(got.choices[0].text, greedy)

    def test_chat_equals_grpc_for_the_same_seed(self):
        expected = self.grpc_text("--chat", "--system", "Be brief.", "--prompt", "Hi there",
                                  "--temperature", "1", "--seed", "3", "--max-tokens", "10")
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi there"}]
        whole = self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=1, seed=3, max_completion_tokens=10)
        self.assertEqual(whole.choices[0].message.content, expected)
        self.assertEqual(whole.choices[0].message.role, "assistant")
        stream = self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=1, seed=3, max_tokens=10,
            stream=True)
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in stream), expected)

    def test_every_unsupported_or_bad_field_is_a_400_naming_it(self):
        cases = [
            ("best_of", dict(best_of=2)),
            ("n", dict(n=2)),
            ("logit_bias", dict(logit_bias={"5": 10})),
            ("suffix", dict(suffix="x")),
            ("temperature", dict(temperature="hot")),
            ("max_tokens", dict(max_tokens=0)),
            ("presence_penalty", dict(presence_penalty=0.5)),
            ("stream_options", dict(stream_options={"include_usage": True})),
            ("frobnicate", dict(extra_body={"frobnicate": 1})),
        ]
        for field, kwargs in cases:
            with self.subTest(field=field):
                with self.assertRaises(openai.BadRequestError) as caught:
                    self.client.completions.create(model=self.model, prompt="hi", **kwargs)
                self.assertIn('"%s"' % field, caught.exception.body["message"])
                self.assertEqual(caught.exception.body["param"], field)
        # Values the scheduler checks (range, context) are 400s too.
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.completions.create(model=self.model, prompt="hi", top_p=1.5)
        self.assertIn("top_p", caught.exception.body["message"])
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.completions.create(model=self.model, prompt="hi", max_tokens=100000)
        self.assertIn("context", caught.exception.body["message"])
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.chat.completions.create(
                model=self.model, messages=[{"role": "robot", "content": "hi"}])
        self.assertIn("robot", caught.exception.body["message"])
        with self.assertRaises(openai.NotFoundError):
            self.client.completions.create(model="gpt-4", prompt="hi")
        request = urllib.request.Request(self.http + "/v1/completions", data=b"{not json",
                                         headers={"Content-Type": "application/json"})
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request)
        self.assertEqual(caught.exception.code, 400)

    def test_zz_metrics_parse_and_match_stats(self):
        # Runs last (name order): the counters then cover every request the other tests made.
        self.client.completions.create(model=self.model, prompt="count me", max_tokens=5)
        with urllib.request.urlopen(self.http + "/metrics") as r:
            text = r.read().decode()
        stats = json.loads(subprocess.run([EPX, "stats", "--server", self.grpc, "--json"],
                                          check=True, capture_output=True).stdout)
        samples = {}
        families = {}
        for family in text_string_to_metric_families(text):
            families[family.name] = family.type
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        model = (("model_name", self.model),)

        def value(name, **labels):
            return samples[(name, tuple(sorted(dict(model, **labels).items())))]

        self.assertEqual(families["epx:time_to_first_token_seconds"], "histogram")
        self.assertEqual(value("epx:prompt_tokens_total"), int(stats["prompt_tokens"]))
        self.assertEqual(value("epx:generation_tokens_total"), int(stats["generated_tokens"]))
        self.assertEqual(value("epx:requests_total", outcome="finished"),
                         int(stats["requests_finished"]))
        self.assertEqual(value("epx:requests_total", outcome="accepted"),
                         int(stats["requests_accepted"]))
        self.assertEqual(value("epx:num_requests_running"), 0)
        finished = sum(value("epx:request_success_total", finished_reason=r)
                       for r in ("length", "stop", "eos"))
        self.assertEqual(finished, int(stats["requests_finished"]))
        self.assertEqual(value("epx:e2e_request_latency_seconds_count"), finished)
        for layer in stats["layers"]:
            for e, n in enumerate(layer["expert_tokens"]):
                self.assertEqual(samples[("epx:expert_tokens_total",
                                          (("expert", str(e)), ("layer", str(layer["layer"]))))],
                                 int(n))


if __name__ == "__main__":
    unittest.main(verbosity=2)
