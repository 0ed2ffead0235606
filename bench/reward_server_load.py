"""The reward server under load: N simultaneous plain HTTP clients, their latency, and stalled-client cutoffs.

Starts ``python -m diffrl.commands.serve_reward`` (JPEG incompressibility, CPU) in a subprocess, or uses ``--url``;
then, for each client count, that many threads wait on a barrier and each sends one ``POST /reward`` with
its own images on its own connection (``http.client``). Every answer is compared with the local reward on
the same images (float32 on the wire, so exact). Then three hostile clients: one that announces a 1 kB body
and sends 5 bytes, one that announces 10 GB and sends nothing, and one that connects and sends nothing;
for each, the seconds until the server answers or closes.

    python bench/reward_server_load.py [--clients 100,300] [--rounds 3] [--images 2] [--size 64] [--max-batch-images 0]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

import torch
from common import machine, result_path, save_record

from diffrl.rewards import load
from diffrl.rewards._wire import encode_images


def _round(host: str, port: int, clients: int, images: int, size: int, seed: int) -> dict:
    reward = load("jpeg_incompressibility")
    batches = [torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(seed + i)) for i in range(clients)]
    bodies = [json.dumps({"protocol": 1, "images": encode_images(b, "float32")}).encode() for b in batches]
    expected = [reward(b)[0].tolist() for b in batches]
    outcome: list[tuple[str, float]] = [("not run", 0.0)] * clients
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            connection = http.client.HTTPConnection(host, port, timeout=120)
            connection.request("POST", "/reward", body=bodies[i], headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            connection.close()
            if response.status != 200:
                result = f"HTTP {response.status}"
            elif answer.get("rewards") != expected[i]:
                result = "wrong answer"
            else:
                result = "ok"
        except Exception as error:  # counted by kind
            result = type(error).__name__
        outcome[i] = (result, time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    kinds: dict[str, int] = {}
    for result, _ in outcome:
        kinds[result] = kinds.get(result, 0) + 1
    latencies = sorted(seconds for result, seconds in outcome if result == "ok")
    quantile = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None)
    return {"clients": clients, "ok": kinds.get("ok", 0), "outcomes": kinds, "wall_s": round(wall, 3),
            "p50_s": quantile(0.5), "p95_s": quantile(0.95), "max_s": latencies[-1] if latencies else None,
            "mean_s": statistics.fmean(latencies) if latencies else None}


def _hostile(host: str, port: int, data: bytes, wait: float = 200.0) -> dict:
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (socket.timeout, ConnectionError) as error:
            received += f"<{type(error).__name__}>".encode()
    first = received.split(b"\r\n", 1)[0].decode(errors="replace") or "(closed, no answer)"
    return {"answer": first, "seconds": round(time.perf_counter() - start, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="100,300", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client count")
    parser.add_argument("--images", type=int, default=2, help="images per request")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--url", default=None, help="an already running server (default: start one)")
    parser.add_argument("--body-timeout", type=float, default=5.0, help="the started server's --body-timeout")
    parser.add_argument("--max-batch-images", type=int, default=0, help="the started server's --max-batch-images")
    parser.add_argument("--hostile-wait", type=float, default=200.0, help="give up on a hostile client after this")
    parser.add_argument("--out", default=str(result_path("reward_server_load")))
    args = parser.parse_args()
    process = None
    if args.url is None:
        process = subprocess.Popen(
            [sys.executable, "-m", "diffrl.commands.serve_reward", "--reward", "jpeg_incompressibility", "--port", "0",
             "--device", "cpu", "--body-timeout", str(args.body_timeout), "--max-batch-images", str(args.max_batch_images)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "DIFFRL_REWARD_TOKEN": ""},
        )
        args.url = process.stdout.readline().rsplit(" ", 1)[-1].strip()
    parsed = urllib.parse.urlparse(args.url)
    host, port = parsed.hostname, parsed.port
    try:
        rounds = [_round(host, port, int(n), args.images, args.size, seed=1000 * r)
                  for n in args.clients.split(",") for r in range(args.rounds)]
        hostile = {
            name: _hostile(host, port, data, args.hostile_wait) for name, data in (
                ("stalled_body", b"POST /reward HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"pro"),
                ("announces_10_gb", b"POST /reward HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n"),
                ("silent_connection", b""),
            )
        }
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    record = {"command": "python " + " ".join(sys.argv), "url": args.url, "images_per_request": args.images,
              "max_batch_images": args.max_batch_images,
              "image_size": args.size, "rounds": rounds, "hostile": hostile, "machine": machine()}
    for r in rounds:
        print(f"{r['clients']:4d} clients: {r['ok']} ok {r['outcomes']}, p50 {r['p50_s']:.3f}s p95 {r['p95_s']:.3f}s "
              f"max {r['max_s']:.3f}s, wall {r['wall_s']:.2f}s" if r["ok"] else f"{r['clients']} clients: {r['outcomes']}")
    for name, result in hostile.items():
        print(f"{name}: {result['answer']} after {result['seconds']}s")
    print("wrote", save_record(record, args.out))


if __name__ == "__main__":
    main()
