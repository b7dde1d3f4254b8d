"""The dashboard in a real browser (headless Chromium through selenium). Started by ctest as
    python dashboard_test.py EPX_BINARY MODEL_DIR ARTIFACT_DIR
It runs a launcher-free cluster (`epx serve --http-listen --workers 2` and two `epx worker`s on
gloo), opens the page, asks a question through the chat panel
(streamed from /v1/chat/completions) and checks that every heatmap cell, in each of its modes,
equals what `epx stats --json` reports, that the last answer's routing covers each of its tokens
experts_per_token times in every layer, and saves a screenshot to ARTIFACT_DIR/dashboard.png."""

import json
import os
import subprocess
import sys
import tempfile
import time
import unittest

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import epx_test_util as util  # noqa: E402  (tests/epx_test_util.py)

EPX, MODEL, ARTIFACTS = sys.argv[1], sys.argv[2], sys.argv[3]
del sys.argv[1:4]

# Every heatmap cell of a layer, read in one script so a re-render cannot interleave.
CELLS_JS = """return Array.from(document.querySelectorAll('#heatmap td[data-layer][data-expert]'),
    td => [td.dataset.layer, td.dataset.expert, td.textContent]);"""
# The workers table's cells, row by row, in one script for the same reason.
WORKERS_JS = """return Array.from(document.querySelectorAll('#workers tbody tr'),
    tr => Array.from(tr.querySelectorAll('td'), td => td.textContent));"""
# Sets a control's value as a user would: the value, then an input event.
SET_VALUE_JS = """const e = document.getElementById(arguments[0]); e.value = arguments[1];
    e.dispatchEvent(new Event('input', {bubbles: true}));
    e.dispatchEvent(new Event('change', {bubbles: true})); return e.value;"""






def start_browser():
    """Debian's headless Chromium through chromium-driver, at the README screenshot's size."""
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


class DashboardTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        os.makedirs(ARTIFACTS, exist_ok=True)
        cls.dir = tempfile.mkdtemp(prefix="epx_dashboard_")
        grpc_file, http_file = os.path.join(cls.dir, "grpc"), os.path.join(cls.dir, "http")
        cls.log_path = os.path.join(ARTIFACTS, "dashboard_server.log")
        cls.log = open(cls.log_path, "w")
        cls.addClassCleanup(cls.log.close)
        cls.workers = []
        cls.server = subprocess.Popen(
            [EPX, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", "--port-file", grpc_file,
             "--http-listen", "127.0.0.1:0", "--http-port-file", http_file, "--workers", "2",
             "--data-plane", "gloo"],
            stdout=cls.log, stderr=subprocess.STDOUT)
        cls.addClassCleanup(cls.stop_server)  # runs even when the rest of setUpClass fails
        cls.grpc = "127.0.0.1:%d" % util.wait_for_file(grpc_file, cls.server)
        cls.http = "http://127.0.0.1:%d" % util.wait_for_file(http_file, cls.server)
        for _ in range(2):
            cls.workers.append(subprocess.Popen(
                [EPX, "worker", "--model", MODEL, "--coordinator", cls.grpc, "--data-plane",
                 "gloo"], stdout=cls.log, stderr=subprocess.STDOUT))
        subprocess.run([EPX, "health", "--server", cls.grpc, "--service", "epx.v1.Generation",
                        "--wait", "--timeout", "120"], check=True, capture_output=True,
                       timeout=150)

        cls.driver = start_browser()
        cls.addClassCleanup(cls.driver.quit)

    @classmethod
    def stop_server(cls):
        # The workers leave when their coordinator ends the job.
        util.stop([cls.server])
        util.stop(cls.workers, terminate=False)

    def epx_json(self, *args):
        r = subprocess.run([EPX, *args, "--server", self.grpc], capture_output=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout)

    def wait(self, what, limit_s, condition):
        try:
            return WebDriverWait(self.driver, limit_s, poll_frequency=0.1).until(condition)
        except TimeoutException:
            raise AssertionError("timed out after %d s waiting for %s" % (limit_s, what)) from None

    def cells(self):
        """{(layer, expert): count} of the heatmap as shown."""
        out = {}
        for layer, expert, text in self.driver.execute_script(CELLS_JS):
            self.assertRegex(text, r"^[0-9]+$", "cell L%s E%s" % (layer, expert))
            out[(int(layer), int(expert))] = int(text)
        return out

    def save_failure_artifacts(self):
        """The browser's console log, page and screenshot next to the server log; says where."""
        notes = ["server log: " + self.log_path]
        try:
            path = os.path.join(ARTIFACTS, "dashboard_console.log")
            with open(path, "w") as f:
                for entry in self.driver.get_log("browser"):
                    f.write("%s %s %s\n" % (entry.get("timestamp"), entry.get("level"),
                                            entry.get("message")))
            notes.append("browser console: " + path)
            path = os.path.join(ARTIFACTS, "dashboard_failure.html")
            with open(path, "w") as f:
                f.write(self.driver.page_source)
            notes.append("page: " + path)
            path = os.path.join(ARTIFACTS, "dashboard_failure.png")
            self.driver.save_screenshot(path)
            notes.append("screenshot: " + path)
        except Exception as e:  # pylint: disable=broad-except
            notes.append("(browser artifacts not saved: %s)" % e)
        return "\n".join(notes)

    def test_chat_streams_and_heatmap_matches_stats(self):
        try:
            self.check_dashboard()
        except Exception as e:
            raise AssertionError("%s\n%s" % (e, self.save_failure_artifacts())) from e

    def check_dashboard(self):
        d = self.driver
        d.get(self.http + "/?poll_ms=200")
        self.wait("the first stats", 60,
                  EC.presence_of_element_located(
                      (By.CSS_SELECTOR, 'body[data-stats-loaded="true"]')))
        model_id = d.find_element(By.ID, "model-id").text
        self.assertEqual(model_id, os.path.basename(os.path.normpath(MODEL)))

        # One question through the chat panel.
        d.find_element(By.ID, "prompt").send_keys("Tell me about experts.")
        self.assertEqual(d.execute_script(SET_VALUE_JS, "max-tokens", "24"), "24")
        self.assertEqual(float(d.execute_script(SET_VALUE_JS, "temperature", "0")), 0)
        self.wait("#send enabled", 10, EC.element_to_be_clickable((By.ID, "send"))).click()
        answer = self.wait("the answer", 120, EC.presence_of_element_located(
            (By.CSS_SELECTOR, '#answer[data-done="true"]')))
        info = answer.find_element(By.CSS_SELECTOR, ".bubble-info").text
        self.assertIsNone(answer.get_attribute("data-error"), info)
        text = d.execute_script(
            "return document.querySelector('#answer .bubble-text').textContent;")
        self.assertTrue(text, "empty answer")
        tokens = answer.get_attribute("data-completion-tokens")
        self.assertRegex(tokens or "", r"^[1-9][0-9]*$")
        self.assertIn("%s tokens, finish: " % tokens, info)
        request_id = answer.get_attribute("data-request-id")
        self.assertTrue(request_id)
        self.assertTrue(d.find_element(By.ID, "send").is_enabled())

        # The server is idle now: its stats (once they name this answer) hold still.
        def stats_of_this_answer():
            s = self.epx_json("stats", "--json")
            return s if s["last_request"]["request_id"] == request_id else None

        stats = util.poll_until("stats naming " + request_id, 30, stats_of_this_answer)
        k = int(self.epx_json("model-info")["config"]["num_experts_per_tok"])
        self.wait("#steps = %s" % stats["steps"], 30,
                  lambda drv: drv.find_element(By.ID, "steps").text == str(stats["steps"]))
        num_layers = len(stats["layers"])
        num_experts = len(stats["layers"][0]["expert_tokens"])
        last = stats["last_request"]
        self.assertEqual(len(last["layers"]), num_layers)
        self.assertEqual(int(last["completion_tokens"]), int(tokens))
        expected = {
            "window": [layer["recent_expert_tokens"] for layer in stats["layers"]],
            "total": [layer["expert_tokens"] for layer in stats["layers"]],
            "request": [layer["expert_tokens"] for layer in last["layers"]],
        }
        select = Select(d.find_element(By.ID, "heatmap-mode"))
        for mode, rows in expected.items():
            select.select_by_value(mode)
            want = {(l, e): int(n) for l, row in enumerate(rows) for e, n in enumerate(row)}
            self.assertEqual(len(want), num_layers * num_experts, mode)
            # The page polls every 200 ms; give a poll in flight the time to land.
            shown = {}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                shown = self.cells()
                if shown == want:
                    break
                time.sleep(0.1)
            self.assertEqual(len(shown), num_layers * num_experts, mode)
            self.assertEqual(shown, want, "heatmap mode " + mode)
            label = d.find_element(By.ID, "heatmap-label").text
            if mode == "window":
                self.assertIn(str(stats["window_steps"]), label)
            if mode == "request":
                self.assertIn(request_id, label)
        # The workers, as Stats has them: one row each, with its rank and experts.
        rows = d.execute_script(WORKERS_JS)  # one read: the table is rebuilt at every poll
        self.assertEqual(len(rows), len(stats["workers"]))
        self.assertEqual(len(rows), 2)
        for cells, worker in zip(rows, stats["workers"]):
            self.assertEqual(cells[0], str(worker["rank"]), cells)
            self.assertEqual([int(n) for n in cells[5].split(", ")], worker["experts"], cells)
            self.assertEqual(cells[3], "member, alive", cells)
        # Each token but the last generated one went through every layer to k experts.
        fed = int(last["prompt_tokens"]) + int(last["completion_tokens"]) - 1
        for l, layer in enumerate(last["layers"]):
            self.assertEqual(sum(int(n) for n in layer["expert_tokens"]), fed * k, "layer %d" % l)

        # The picture the README shows: the default view, after one answer.
        select.select_by_value("window")
        d.execute_script("document.activeElement.blur();")
        path = os.path.join(ARTIFACTS, "dashboard.png")
        self.assertTrue(d.save_screenshot(path))
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertGreater(os.path.getsize(path), 10 * 1024)


class DashboardKeyTest(unittest.TestCase):
    """A server with --api-key: the page asks for the key, and with it shows the stats and
    chats; the key is kept in the tab, never in the page's address."""

    def test_page_asks_for_the_key_and_then_works(self):
        d = tempfile.mkdtemp(prefix="epx_dashboard_key_")
        grpc_file, http_file = os.path.join(d, "grpc"), os.path.join(d, "http")
        with open(os.path.join(d, "server.log"), "w") as log:
            server = subprocess.Popen(
                [EPX, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", "--port-file",
                 grpc_file, "--http-listen", "127.0.0.1:0", "--http-port-file", http_file,
                 "--api-key", "page-k3y"], stdout=log, stderr=subprocess.STDOUT)
            driver = None
            try:
                util.wait_for_file(grpc_file, server)
                http = "http://127.0.0.1:%d" % util.wait_for_file(http_file, server)
                driver = start_browser()
                driver.get(http + "/?poll_ms=200")
                wait = WebDriverWait(driver, 60, poll_frequency=0.1)
                wait.until(EC.visibility_of_element_located((By.ID, "auth")))
                self.assertIsNone(driver.find_element(By.TAG_NAME, "body").get_attribute(
                    "data-stats-loaded"))
                driver.find_element(By.ID, "api-key").send_keys("page-k3y")
                driver.find_element(By.ID, "use-key").click()
                wait.until(EC.presence_of_element_located(
                    (By.CSS_SELECTOR, 'body[data-stats-loaded="true"]')))
                self.assertFalse(driver.find_element(By.ID, "auth").is_displayed())
                driver.find_element(By.ID, "prompt").send_keys("Hello")
                driver.execute_script(SET_VALUE_JS, "max-tokens", "4")
                driver.execute_script(SET_VALUE_JS, "temperature", "0")  # greedy: no early EOS
                driver.find_element(By.ID, "send").click()
                answer = wait.until(EC.presence_of_element_located(
                    (By.CSS_SELECTOR, '#answer[data-done="true"]')))
                self.assertIsNone(answer.get_attribute("data-error"),
                                  answer.find_element(By.CSS_SELECTOR, ".bubble-info").text)
                self.assertEqual(answer.get_attribute("data-completion-tokens"), "4")
                self.assertNotIn("page-k3y", driver.current_url)
            finally:
                if driver is not None:
                    driver.quit()
                util.stop([server])


if __name__ == "__main__":
    unittest.main(verbosity=2)
