"""``openai_vlm``: a vision-language judge behind an OpenAI-compatible chat API, against a stand-in server that
answers as vLLM does (``choices[0].message.content``)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from diffrl.config import DDPOConfig
from diffrl.rewards import RewardError, VisionJudgeError, load


class Judge:
    """The stand-in server: records each request; answers with ``reply(text, image)`` or an HTTP status."""

    def __init__(self, reply, statuses=()):
        self.reply, self.statuses, self.requests = reply, list(statuses), []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if judge.statuses:
                    status = judge.statuses.pop(0)
                    self.send_response(status)
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": f"status {status}"}}).encode())
                    return
                content = body["messages"][0]["content"]
                png = base64.b64decode(content[0]["image_url"]["url"].split(",", 1)[1])
                image = Image.open(io.BytesIO(png))
                answer = {"choices": [{"message": {"role": "assistant", "content": judge.reply(content[1]["text"],
                                                                                                image)}}]}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def bright_judge():
    """Scores an image by its mean brightness, 0-10, in words around the number (as chat models answer)."""
    def reply(text, image):
        brightness = sum(image.convert("L").getdata()) / (255 * image.width * image.height)
        return f"Score: {round(brightness * 10, 1)}/10"

    judge = Judge(reply)
    yield judge
    judge.close()


def test_each_image_is_asked_with_its_prompt_and_scored_from_the_answer(bright_judge):
    reward = load("openai_vlm", url=bright_judge.url, model="judge-vl", api_key="sk-test",
                  question="Rate \"{prompt}\" ({style}) from 0 to 10.", concurrency=2)
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.5, 1.0)])
    scores, metadata = reward(images, ["a", "b", "c"], [{"style": "ink"}, {"style": "oil"}, {"style": "pen"}])
    assert scores.tolist() == pytest.approx([0.0, 0.5, 1.0], abs=0.01)  # the number / max_score 10
    assert len(bright_judge.requests) == 3 and metadata["unparsed"] == 0
    request = next(r for r in bright_judge.requests if "\"b\" (oil)" in r["body"]["messages"][0]["content"][1]["text"])
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "judge-vl" and request["body"]["temperature"] == 0.0
    assert "sk-test" not in repr(reward)


def test_an_answer_without_a_number_is_an_error_unless_a_score_is_given_for_it():
    judge = Judge(lambda text, image: "I cannot rate this.")
    try:
        images = torch.rand(2, 3, 8, 8)
        with pytest.raises(VisionJudgeError, match="answered 'I cannot rate this.', which holds no number"):
            load("openai_vlm", url=judge.url, model="m")(images, ["a", "b"], None)
        scores, metadata = load("openai_vlm", url=judge.url, model="m", unparsed_score=0.0)(images, ["a", "b"], None)
        assert scores.tolist() == [0.0, 0.0] and metadata["unparsed"] == 2
    finally:
        judge.close()


def test_busy_servers_are_retried_and_refusals_explained():
    judge = Judge(lambda text, image: "7", statuses=[503, 429])
    try:
        reward = load("openai_vlm", url=judge.url, model="m", retries=2, backoff=0.01)
        assert reward(torch.rand(1, 3, 8, 8), ["a"], None)[0].tolist() == [pytest.approx(0.7)]
        judge.statuses = [401]
        with pytest.raises(VisionJudgeError, match=r"HTTP 401\) \(status 401\): no API key was sent"):
            reward(torch.rand(1, 3, 8, 8), ["a"], None)
    finally:
        judge.close()


def test_bad_options_fail_before_any_request_and_the_key_is_never_recorded():
    with pytest.raises(RewardError, match=r"option url='http://\*\*\*@h/v1' holds a user name or password") as err:
        load("openai_vlm", url="http://u:secret@h/v1", model="m")
    assert "secret" not in str(err.value)
    with pytest.raises(RewardError, match="option url='h:8000' must look like http://HOST:PORT/v1"):
        load("openai_vlm", url="h:8000", model="m")
    with pytest.raises(RewardError, match="option question must be a template"):
        load("openai_vlm", url="http://h/v1", model="m", question="rate it")
    config = DDPOConfig(reward="openai_vlm", reward_options={"url": "http://h/v1", "model": "m", "api_key": "sk-1"})
    assert "sk-1" not in config.to_yaml() and "api_key: '***'" in config.to_yaml()
