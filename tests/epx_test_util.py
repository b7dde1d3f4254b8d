"""What the Python tests share: free ports, bounded polling, a server's port file, stopping
processes, and epx.v1's messages and stubs made from proto/ with grpcio-tools, as a user would.
Each test puts tests/ on sys.path and imports this module."""

import importlib
import os
import socket
import subprocess
import sys
import time

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")


def free_port():
    """A port free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_until(what, limit_s, fn, interval_s=0.1):
    """fn() until it returns something true, for at most limit_s seconds; returns that value."""
    deadline = time.monotonic() + limit_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %d s waiting for %s" % (limit_s, what))
        time.sleep(interval_s)


def wait_for_file(path, process, limit_s=60):
    """The port a server wrote to `path` once it listens; fails if `process` exits first."""
    def port():
        if process.poll() is not None:
            raise RuntimeError("epx exited with %s" % process.returncode)
        try:
            with open(path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    return poll_until("the port file " + path, limit_s, port, interval_s=0.05)


def stop(processes, timeout_s=60, terminate=True):
    """SIGTERM to each (unless terminate is False: they end on their own), then waits for them,
    killing what has not exited after timeout_s."""
    if terminate:
        for p in processes:
            if p.poll() is None:
                p.terminate()
    for p in processes:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def proto_stubs(out_dir, *names):
    """{name: (name_pb2, name_pb2_grpc)} for epx/v1/<name>.proto, generated into out_dir."""
    from grpc_tools import protoc  # pylint: disable=import-outside-toplevel
    os.makedirs(out_dir, exist_ok=True)
    code = protoc.main(["grpc_tools.protoc", "-I" + PROTO_DIR, "--python_out=" + out_dir,
                        "--grpc_python_out=" + out_dir] +
                       ["epx/v1/%s.proto" % n for n in names])
    if code != 0:
        raise RuntimeError("grpc_tools.protoc failed: %d" % code)
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    return {n: (importlib.import_module("epx.v1.%s_pb2" % n),
                importlib.import_module("epx.v1.%s_pb2_grpc" % n)) for n in names}


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()
