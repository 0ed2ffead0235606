"""Serve any registered reward over HTTP (FastAPI on uvicorn; ``pip install 'diffrl[server]'``).

The DDPO authors ran LLaVA as a separate HTTP server on two of their eight GPUs (ddpo-pytorch with the
LLaVA-server repository); this lets a big reward model live on its own GPU or machine while the trainer calls
it through the ``remote`` reward. The command line is ``diffrl serve-reward`` (:mod:`diffrl.commands.serve_reward`).

- :mod:`~diffrl.rewards.server.app`: the routes (``GET /health``, ``POST /reward``), the token check, body
  limits and the one-line-per-request access log.
- :mod:`~diffrl.rewards.server.worker`: the model calls, on one thread, one at a time, optionally batched.
- :mod:`~diffrl.rewards.server.protocol`: uvicorn's HTTP protocol with a deadline for request headers.
- :mod:`~diffrl.rewards.server.serve`: binding, running and the limits' defaults.
"""

from diffrl.rewards.server import serve as _serve
from diffrl.rewards.server.app import create_app
from diffrl.rewards.server.serve import (BACKLOG, DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUEST_BYTES,
                                         RewardServer, ServerStartError, make_server, run_server, serve_from_args)

__all__ = ["create_app", *_serve.__all__]
