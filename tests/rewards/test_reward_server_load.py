"""The reward server under load and against hostile clients, for real on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from diffrl.rewards import RewardError, load
from diffrl.rewards._wire import encode_images
from diffrl.commands.serve_reward import main
from diffrl.rewards.server import make_server

CLIENTS = 100


def _post(host: str, port: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request("POST", "/reward", body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _body(images: torch.Tensor) -> bytes:
    return json.dumps({"protocol": 1, "images": encode_images(images, "float32")}).encode()


class _CallLog:
    """A reward that records whether two calls ever overlapped (the server must never run them at once)."""

    name = "call_log"
    differentiable = False

    def __init__(self) -> None:
        self.inner = load("jpeg_incompressibility")
        self.active, self.overlapped, self.calls = 0, False, 0

    def __call__(self, images, prompts=None, prompt_metadata=None):
        self.active += 1
        self.overlapped |= self.active > 1
        try:
            time.sleep(0.001)  # widen the window in which a second call could enter
            self.calls += 1
            return self.inner(images, prompts, prompt_metadata)
        finally:
            self.active -= 1


def test_100_concurrent_plain_clients_all_answered_correctly():
    reward = _CallLog()
    batches = [torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(CLIENTS)]
    expected = [reward.inner(images)[0].tolist() for images in batches]
    results: list[object] = [None] * CLIENTS
    barrier = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        barrier.wait()  # all connect at once
        try:
            results[i] = _post(host, port, _body(batches[i]))
        except Exception as error:  # recorded, so the assertion lists every failure
            results[i] = error

    with make_server(reward, device="cpu") as server:
        host, port = server.server_address
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    failures = [(i, r) for i, r in enumerate(results) if not (isinstance(r, tuple) and r[0] == 200)]
    assert not failures, failures[:5]
    for i, (_, answer) in enumerate(results):
        assert answer["rewards"] == pytest.approx(expected[i], rel=1e-6), i  # each client got its own answer
    assert reward.calls == CLIENTS and not reward.overlapped


def _raw(server, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` and read until the server closes; returns (everything received, seconds until closed)."""
    start = time.monotonic()
    with socket.create_connection(server.server_address, timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.monotonic() - start


def test_a_stalled_body_is_cut_off_within_the_body_timeout():
    with make_server(load("jpeg_compressibility"), device="cpu", body_timeout=1.0) as server:
        answer, seconds = _raw(server, b"POST /reward HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"pro")
        assert answer.startswith(b"HTTP/1.1 408") and b"stalled for 1s" in answer
        assert 0.9 < seconds < 3.0
        health = http.client.HTTPConnection(*server.server_address, timeout=5)
        health.request("GET", "/health")
        assert health.getresponse().status == 200  # and it keeps serving


def test_a_10_gb_announcement_that_sends_nothing_gets_413_within_seconds():
    with make_server(load("jpeg_compressibility"), device="cpu", body_timeout=1.0) as server:
        answer, seconds = _raw(server, b"POST /reward HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"over this server's limit" in answer
    assert seconds < 3.0


@pytest.mark.parametrize("data", [b"", b"POST /reward HTTP/1.1\r\nHost: x\r\nContent-Le"], ids=["silent", "half-headers"])
def test_a_client_that_never_finishes_its_headers_is_disconnected(data):
    with make_server(load("jpeg_compressibility"), device="cpu", body_timeout=1.0) as server:
        answer, seconds = _raw(server, data)
    assert answer == b"" and 0.9 < seconds < 3.0


def test_one_log_line_per_request_and_never_the_token(caplog):
    token = "tok-7f3a9c-secret"
    images = torch.rand(1, 3, 8, 8)
    with caplog.at_level(logging.DEBUG):
        with make_server(load("jpeg_compressibility"), device="cpu", token=token) as server:
            host, port = server.server_address
            assert _post(host, port, _body(images), {"Authorization": f"Bearer {token}"})[0] == 200
            assert _post(host, port, _body(images), {"Authorization": "Bearer wrong"})[0] == 403
            assert _post(host, port, _body(images))[0] == 401
            connection = http.client.HTTPConnection(host, port, timeout=5)
            connection.request("GET", f"/health?token={token}")
            assert connection.getresponse().status == 200
            remote = load("remote", url=server.url, token=token, timeout=5.0, retries=0)
            assert remote(images)[0].shape == (1,)
            assert token not in repr(remote)
    lines = [r.getMessage() for r in caplog.records if r.name == "diffrl.rewards.server"]
    requests = [line for line in lines if " POST /reward " in line or " GET /health " in line]
    assert len(requests) == 5, lines
    assert [line.split()[3] for line in requests] == ["200", "403", "401", "200", "200"]
    assert all("in=" in line and "out=" in line and line.endswith("ms") for line in requests)
    assert token not in caplog.text


def test_unknown_reward_is_one_line_and_exit_2(capsys):
    assert main(["--reward", "jpeg_compresibility", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown reward 'jpeg_compresibility'" in err
    assert "did you mean 'jpeg_compressibility'" in err


def test_busy_port_is_one_line_and_exit_2(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["--reward", "jpeg_compressibility", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--body-timeout" in text and "POST /reward" in text
    assert ":class:" not in text and ":mod:" not in text and "``" not in text


class _Recording:
    """Per-image JPEG size, plus the batch sizes it was called with and a batch-level metadata value."""

    name = "recording"
    differentiable = False

    def __init__(self, fail_above: int | None = None) -> None:
        self.inner, self.batches, self.gate = load("jpeg_incompressibility"), [], threading.Event()
        self.fail_above = fail_above

    def __call__(self, images, prompts=None, prompt_metadata=None):
        self.gate.wait(10)  # the first call waits until every request is queued
        self.batches.append(images.shape[0])
        if self.fail_above is not None and images.shape[0] > self.fail_above:
            raise RuntimeError("out of memory")
        values, metadata = self.inner(images)
        return values, {**metadata, "prompts": list(prompts), "batch": images.shape[0]}


@pytest.mark.parametrize("fail_above", [None, 2], ids=["merged", "merged-call-fails"])
def test_batching_merges_waiting_requests_and_splits_the_answers(fail_above):
    reward = _Recording(fail_above)
    batches = [torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    results: list[object] = [None] * len(batches)

    def client(i: int) -> None:
        body = json.dumps({"protocol": 1, "images": encode_images(batches[i], "float32"),
                           "prompts": [f"p{i}a", f"p{i}b"]}).encode()
        results[i] = _post(host, port, body)

    with make_server(reward, device="cpu", max_batch_images=8) as server:
        host, port = server.server_address
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(batches))]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # all six requests reach the queue while the first call waits
        reward.gate.set()
        for thread in threads:
            thread.join(timeout=30)
    merged = [size for size in reward.batches if size > 2]
    assert merged and max(merged) <= 8, reward.batches  # waiting requests were merged, within the limit
    if fail_above is None:
        assert sum(reward.batches) == 12
    else:  # each merged call that failed was retried request by request
        assert sum(size for size in reward.batches if size <= 2) == 12
    for i, (status, answer) in enumerate(results):
        values, metadata = reward.inner(batches[i])
        assert status == 200 and answer["rewards"] == pytest.approx(values.tolist(), rel=1e-6)
        assert answer["metadata"]["jpeg_kb"] == pytest.approx(metadata["jpeg_kb"].tolist(), rel=1e-6)
        assert answer["metadata"]["prompts"] == [f"p{i}a", f"p{i}b"]  # per-image metadata split by request
        assert answer["metadata"]["batch"] in reward.batches  # batch-level values are copied
        if fail_above is not None:
            assert answer["metadata"]["batch"] == 2


def test_remote_takes_the_token_from_the_environment_and_never_shows_it(monkeypatch):
    monkeypatch.setenv("DIFFRL_REWARD_TOKEN", "env-secret-42")
    remote = load("remote", url="http://127.0.0.1:1")  # no token option needed
    assert remote.token == "env-secret-42" and "env-secret-42" not in repr(remote)
    with pytest.raises(RewardError) as info:
        load("remote", url="http://user:hunter2@127.0.0.1:8000")
    assert "hunter2" not in str(info.value) and "***@127.0.0.1:8000" in str(info.value)


def test_without_the_server_extra_the_command_says_what_to_install():
    # fastapi missing (None in sys.modules makes its import fail as if it were not installed); in a subprocess, so
    # that this test's own imported server does not mask it.
    code = ("import sys\nsys.modules['fastapi'] = None\nfrom diffrl.commands.serve_reward import main\n"
            "print(main(['--reward', 'jpeg_compressibility', '--port', '0']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2", out.stderr
    assert out.stderr.strip() == ("diffrl serve-reward: the reward server needs fastapi, which is not installed; "
                                  "install the server extra: pip install 'diffrl[server]'")
