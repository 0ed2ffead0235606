"""The reward server's wire format: JSON with base64 raw arrays, never pickle.

Request (``POST /reward``)::

    {"protocol": 1,
     "images": {"encoding": "uint8" | "float32", "shape": [B, 3, H, W], "data": "<base64>"},
     "prompts": [str, ...] | null, "prompt_metadata": [{...}, ...] | null}

``uint8`` images are ``round(255 * x)``; ``float32`` ones are little-endian floats in
``[0, 1]``. Response: ``{"protocol": 1, "rewards": [float, ...], "metadata": {...}}``;
errors: ``{"error": "message"}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

PROTOCOL = 1
ENCODINGS = ("uint8", "float32")
TOKEN_ENV = "DIFFRL_REWARD_TOKEN"
"""Environment variable both ends read the shared token from when none is given."""


class WireError(ValueError):
    """A request or response that does not follow the wire format."""


class RewardRequest(NamedTuple):
    """A decoded ``POST /reward`` body."""

    images: torch.Tensor
    """``[B, 3, H, W]`` float32 in ``[0, 1]``, on the CPU."""
    prompts: list[Any] | None
    """``B`` prompts, or None."""
    prompt_metadata: list[Any] | None
    """``B`` metadata objects, or None."""


def encode_images(images: torch.Tensor, encoding: str) -> dict[str, Any]:
    """``[B, 3, H, W]`` images in ``[0, 1]`` -> the JSON ``images`` object."""
    if encoding == "uint8":
        array = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    elif encoding == "float32":
        array = images.detach().float().cpu().numpy().astype("<f4")
    else:
        raise WireError(f"unknown image encoding {encoding!r}; use one of {list(ENCODINGS)}")
    return {
        "encoding": encoding,
        "shape": list(array.shape),
        "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"),
    }


def decode_images(payload: Any) -> torch.Tensor:
    """The JSON ``images`` object -> float32 ``[B, 3, H, W]`` in ``[0, 1]`` (CPU); raises :class:`WireError`."""
    if not isinstance(payload, Mapping):
        raise WireError("'images' must be an object with encoding, shape and data")
    encoding, shape, data = payload.get("encoding"), payload.get("shape"), payload.get("data")
    if encoding not in ENCODINGS:
        raise WireError(f"'images.encoding' must be one of {list(ENCODINGS)}, got {encoding!r}")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        or shape[1] != 3
    ):
        raise WireError(f"'images.shape' must be [B, 3, H, W] with positive integers, got {shape!r}")
    if not isinstance(data, str):
        raise WireError("'images.data' must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise WireError(f"'images.data' is not valid base64 ({error})") from None
    dtype = np.uint8 if encoding == "uint8" else np.dtype("<f4")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise WireError(f"'images.data' holds {len(raw)} bytes but shape {shape} in {encoding} needs {expected}")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    images = torch.from_numpy(array.astype(np.float32))
    return images / 255.0 if encoding == "uint8" else images


def jsonable(value: Any) -> Any:
    """Metadata -> JSON-compatible values: tensors and arrays become (nested) lists, tuples lists."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().tolist() if value.is_floating_point() else value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def decode_request(body: bytes) -> RewardRequest:
    """A ``POST /reward`` body -> :class:`RewardRequest`; raises :class:`WireError` naming what is wrong."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WireError(f"the request body is not JSON ({error})") from None
    if not isinstance(request, dict):
        raise WireError("the request body must be a JSON object")
    if request.get("protocol", PROTOCOL) != PROTOCOL:
        raise WireError(f"protocol {request.get('protocol')!r} is not supported (this server speaks {PROTOCOL})")
    images = decode_images(request.get("images"))
    prompts, metadata = request.get("prompts"), request.get("prompt_metadata")
    for field, value in (("prompts", prompts), ("prompt_metadata", metadata)):
        if value is not None and (not isinstance(value, list) or len(value) != images.shape[0]):
            raise WireError(f"'{field}' must be null or a list with one entry per image ({images.shape[0]})")
    return RewardRequest(images, prompts, metadata)


def encode_response(rewards: Sequence[float], metadata: Any) -> dict[str, Any]:
    """The ``POST /reward`` answer for ``rewards`` (one float per image) and the reward's metadata."""
    return {"protocol": PROTOCOL, "rewards": [float(value) for value in rewards], "metadata": jsonable(metadata)}
