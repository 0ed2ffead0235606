"""The reward server and the remote reward, for real on 127.0.0.1."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from diffrl.rewards import RemoteRewardError, RewardError, load
from diffrl.commands.serve_reward import DEFAULTS, add_parser
from diffrl.rewards import server as reward_server_module
from diffrl.rewards.server import RewardServer, make_server

FAST = {"timeout": 5.0, "retries": 0}


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def reward_server(reward, **kwargs) -> Iterator[str]:
    with make_server(reward, "127.0.0.1", 0, device="cpu", **kwargs) as server:
        yield server.url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Sleepy:
    """Answers after ``seconds``, or as soon as ``release`` is set (so no thread outlives the test)."""

    name = "sleepy"
    differentiable = False

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.release = threading.Event()

    def __call__(self, images, prompts=None, prompt_metadata=None):
        self.release.wait(self.seconds)
        return torch.zeros(images.shape[0]), {}


class _Failing:
    name = "failing"
    differentiable = False

    def __call__(self, images, prompts=None, prompt_metadata=None):
        raise RuntimeError("model exploded")


def test_round_trip_equals_the_local_reward():
    local = load("jpeg_incompressibility")
    images = torch.rand(5, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    with reward_server(local) as url:
        exact = load("remote", url=url, encoding="float32", batch_size=2, **FAST)
        assert not exact.differentiable
        values, metadata = exact(images, [f"p{i}" for i in range(5)], [{"i": i} for i in range(5)])
        expected, expected_metadata = local(images)
        assert values.dtype == torch.float32 and values.shape == (5,)
        torch.testing.assert_close(values, expected)
        assert metadata["jpeg_kb"] == pytest.approx(expected_metadata["jpeg_kb"].tolist())  # merged over 3 requests
        quantised, _ = load("remote", url=url, **FAST)(images)  # default uint8 on the wire
        torch.testing.assert_close(quantised, local((images * 255).round() / 255)[0])


def test_round_trip_of_a_model_reward_with_prompts(tiny_clip):
    local = load("clip_score", model=str(tiny_clip))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a dog", "a horse"]
    with reward_server(local) as url:
        values, metadata = load("remote", url=url, encoding="float32", **FAST)(images, prompts)
    expected, expected_metadata = local(images, prompts)
    torch.testing.assert_close(values, expected.detach(), atol=1e-4, rtol=1e-5)
    assert metadata["cosine"] == pytest.approx(expected_metadata["cosine"].tolist(), abs=1e-5)


def test_health_reports_the_reward():
    with reward_server(load("jpeg_compressibility"), token="s3cret") as url:
        health = load("remote", url=url, **FAST).health()
    assert health["reward"] == "jpeg_compressibility" and health["status"] == "ok"
    assert health["token_required"] is True and health["differentiable"] is False


def test_token_missing_wrong_and_right():
    images = torch.rand(1, 3, 8, 8)
    with reward_server(load("jpeg_compressibility"), token="s3cret") as url:
        with pytest.raises(RemoteRewardError, match=f"{url}.*HTTP 401.*no token was sent"):
            load("remote", url=url, token=None, **FAST)(images)
        with pytest.raises(RemoteRewardError, match=f"{url}.*HTTP 403.*token does not match"):
            load("remote", url=url, token="guess", **FAST)(images)
        values, _ = load("remote", url=url, token="s3cret", **FAST)(images)
        assert values.shape == (1,)


def test_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("DIFFRL_REWARD_TOKEN", "env-token")
    with reward_server(load("jpeg_compressibility"), token="env-token") as url:
        assert load("remote", url=url, **FAST)(torch.rand(1, 3, 8, 8))[0].shape == (1,)


def test_oversized_requests_are_refused_with_413():
    with reward_server(load("jpeg_compressibility"), max_request_bytes=4096) as url:
        remote = load("remote", url=url, batch_size=8, **FAST)
        with pytest.raises(RemoteRewardError, match="too large \\(HTTP 413\\).*batch_size=8"):
            remote(torch.rand(8, 3, 32, 32))
        assert remote(torch.rand(1, 3, 8, 8))[0].shape == (1,)  # the server keeps serving


def test_server_down_is_a_quick_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"
    remote = load("remote", url=url, timeout=1.0, retries=2, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match=f"{url} failed 3 attempt\\(s\\): cannot connect"):
        remote(torch.rand(1, 3, 8, 8))
    assert time.monotonic() - start < 3.0


def test_slow_server_times_out_instead_of_hanging():
    sleepy = _Sleepy(30.0)
    with reward_server(sleepy) as url:
        try:
            remote = load("remote", url=url, timeout=0.3, retries=1, backoff=0.01)
            start = time.monotonic()
            with pytest.raises(RemoteRewardError, match=f"{url} failed 2 attempt\\(s\\): no answer within timeout=0.3s"):
                remote(torch.rand(1, 3, 8, 8))
            assert time.monotonic() - start < 2.0
        finally:
            sleepy.release.set()  # frees the worker before the server stops


def test_reward_failure_on_the_server_is_reported():
    with reward_server(_Failing()) as url:
        with pytest.raises(RemoteRewardError, match="HTTP 500.*reward 'failing' failed: RuntimeError: model exploded"):
            load("remote", url=url, **FAST)(torch.rand(1, 3, 8, 8))


class _Scripted(BaseHTTPRequestHandler):
    """Answers each POST with the next (status, body) of the server's script."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.hits += 1
        status, body = self.server.script[min(self.server.hits, len(self.server.script)) - 1]
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _scripted(*script: tuple[int, str]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.hits = list(script), 0
    return server


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("<html>hello</html>", "answered garbage, not JSON"),
        ('{"rewards": [1.0, 2.0]}', "expected 'rewards' as a list of 1 numbers"),
        ('{"rewards": ["a"]}', "expected 'rewards' as a list of 1 numbers"),
        ("[1.0]", "answered garbage"),
    ],
)
def test_malformed_answers_are_clear_errors(body, pattern):
    server = _scripted((200, body))
    with serving(server) as url:
        with pytest.raises(RemoteRewardError, match=f"{url} answered garbage|{pattern}") as info:
            load("remote", url=url, **FAST)(torch.rand(1, 3, 8, 8))
        assert url in str(info.value) and pattern.split("(")[0] in str(info.value)
        assert server.hits == 1  # garbage is not retried


def test_not_http_at_all_is_a_clear_error():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def answer_garbage():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\nnot http\r\n\r\n")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        with pytest.raises(RemoteRewardError, match=f"{url} answered garbage, not HTTP"):
            load("remote", url=url, timeout=2.0, retries=0)(torch.rand(1, 3, 8, 8))
    finally:
        thread.join(timeout=5)
        listener.close()


def test_unavailable_is_retried_a_bounded_number_of_times():
    server = _scripted((503, '{"error": "busy"}'), (503, '{"error": "busy"}'), (200, '{"rewards": [7.0]}'))
    with serving(server) as url:
        values, _ = load("remote", url=url, timeout=2.0, retries=2, backoff=0.01)(torch.rand(1, 3, 8, 8))
        assert values.tolist() == [7.0] and server.hits == 3
    server = _scripted((503, '{"error": "busy"}'))
    with serving(server) as url:
        with pytest.raises(RemoteRewardError, match="failed 2 attempt\\(s\\): HTTP 503 \\(busy\\)"):
            load("remote", url=url, timeout=2.0, retries=1, backoff=0.01)(torch.rand(1, 3, 8, 8))
        assert server.hits == 2


def test_bad_requests_get_400_with_the_reason():
    import urllib.error
    import urllib.request

    with reward_server(load("jpeg_compressibility")) as url:
        for body, reason in [
            (b"not json", "not JSON"),
            (json.dumps({"images": {"encoding": "uint8", "shape": [1, 3, 2, 2], "data": "AAAA"}}).encode(), "holds 3 bytes"),
            (json.dumps({"images": {"encoding": "png", "shape": [1, 3, 2, 2], "data": ""}}).encode(), "encoding"),
        ]:
            request = urllib.request.Request(url + "/reward", data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=5)
            assert info.value.code == 400 and reason in json.loads(info.value.read())["error"]


def test_remote_checks_images_before_sending():
    remote = load("remote", url=f"http://127.0.0.1:{_free_port()}", **FAST)
    with pytest.raises(RewardError, match=r"\[0, 1\]"):
        remote(torch.rand(1, 3, 8, 8) - 1)


def test_loopback_by_default_and_the_cli_parser():
    parser = argparse.ArgumentParser(prog="diffrl")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["serve-reward", "--reward", "classifier", "--option", "classes=[6,7,8]", "--option", "model=some/model",
         "--option", "differentiable=false", "--port", "0"]
    )
    assert args.host == "127.0.0.1" and args.port == 0 and callable(args.func)
    assert dict(args.option) == {"classes": [6, 7, 8], "model": "some/model", "differentiable": False}
    server = make_server(load("jpeg_compressibility"), port=0)
    try:
        assert isinstance(server, RewardServer) and server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_serve_reward_main_in_a_subprocess():
    env = {**os.environ, "DIFFRL_REWARD_TOKEN": "sub-token"}
    process = subprocess.Popen(
        [sys.executable, "-m", "diffrl.commands.serve_reward", "--reward", "jpeg_incompressibility", "--option", "quality=80",
         "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = process.stdout.readline()  # "serving reward 'jpeg_incompressibility' at http://127.0.0.1:PORT"
        assert "serving reward 'jpeg_incompressibility' at http://127.0.0.1:" in line, line
        url = line.rsplit(" ", 1)[-1].strip()
        images = torch.rand(2, 3, 16, 16)
        values, _ = load("remote", url=url, token="sub-token", encoding="float32", **FAST)(images)
        torch.testing.assert_close(values, load("jpeg_incompressibility", quality=80)(images)[0])
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_command_line_defaults_are_the_servers():
    # diffrl.commands.serve_reward may not import the server (its --help stays torch-free), so it states the
    # defaults itself; they must be the server's own.
    assert DEFAULTS["max_request_mb"] * 2**20 == reward_server_module.DEFAULT_MAX_REQUEST_BYTES
    assert DEFAULTS["body_timeout"] == reward_server_module.DEFAULT_BODY_TIMEOUT
    assert DEFAULTS["max_connections"] == reward_server_module.DEFAULT_MAX_CONNECTIONS
    assert DEFAULTS["max_batch_images"] == inspect.signature(RewardServer).parameters["max_batch_images"].default
