"""Client for Calibri's loopback reward server (search/reward_server.py).

Wire format (JSON over HTTP, 127.0.0.1 only):
    POST /score  {"prompts": [str]*B, "images_npz": base64(np.savez(images=float32 [B,H,W,3] in [0,1]))}
                 or, instead of images_npz, "images_png": [base64 PNG (8-bit RGB)]*B
            ->   200 {"scores": [float]*B, "reward": name} | 400/500 {"error": message}
    GET  /health ->  200 {"status": "ok", "reward": name}
The float npz path is lossless, so a remote reward scores exactly what the in-process one would.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np
import torch

from . import Reward

logger = logging.getLogger("calibri")
DEFAULT_ENV = "CALIBRI_REWARD_URL"


def encode_images_npz(images: torch.Tensor) -> str:
    buf = io.BytesIO()
    np.savez(buf, images=images.detach().cpu().float().numpy())
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_images_npz(data: str) -> torch.Tensor:
    with np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False) as npz:
        return torch.from_numpy(np.array(npz["images"], dtype=np.float32))


def encode_images_png(images: torch.Tensor) -> list[str]:
    from ._common import to_pil_list

    out = []
    for img in to_pil_list(images.detach().cpu().float()):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_images_png(items: Sequence[str]) -> torch.Tensor:
    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")) for s in items]
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)


def check_loopback_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme != "http" or parsed.hostname != "127.0.0.1" or parsed.port is None:
        raise ValueError(f"Calibri: reward server URL must be http://127.0.0.1:<port> (loopback only; the protocol has "
                         f"no authentication), got {url!r}.")
    return f"http://127.0.0.1:{parsed.port}"


class RemoteReward(Reward):
    """Scores through a reward server on 127.0.0.1.

    Args:
        url: ``http://127.0.0.1:<port>``; defaults to the environment variable ``env_var``.
        env_var: where to read the URL when ``url`` is not given (CALIBRI_REWARD_URL; imagereward uses
            CALIBRI_IMAGEREWARD_URL).
        expect: reward name the server must report on /health (checked once), e.g. "imagereward-package".
        timeout: seconds per request. retries: extra attempts after a timeout, connection error or HTTP 5xx.
        backoff: seconds before the first retry, doubled each time. batch_size: images per request.
        image_format: "npz" (lossless floats, default) or "png" (8-bit).
    """

    def __init__(self, url: str | None = None, env_var: str = DEFAULT_ENV, expect: str | None = None,
                 timeout: float = 600.0, retries: int = 3, backoff: float = 1.0, batch_size: int = 8,
                 image_format: str = "npz", name: str | None = None):
        raw = url or os.environ.get(env_var)
        label = name or (expect or "remote")
        if not raw:
            raise ValueError(f"Calibri: reward {label!r} runs out of process and needs a server URL. Start "
                             f"`python search/reward_server.py --reward {expect or '<reward>'} --port 18067` in an "
                             f"environment that has its packages, then pass url='http://127.0.0.1:18067' or set "
                             f"{env_var}. See docs/rewards.md.")
        if image_format not in ("npz", "png"):
            raise ValueError(f"Calibri: image_format must be 'npz' or 'png', got {image_format!r}.")
        if retries < 0 or timeout <= 0 or batch_size < 1:
            raise ValueError(f"Calibri: remote reward needs retries >= 0, timeout > 0, batch_size >= 1; got "
                             f"{retries}, {timeout}, {batch_size}.")
        self.url = check_loopback_url(raw)
        self.name = label
        self.expect, self.timeout, self.retries, self.backoff = expect, float(timeout), int(retries), float(backoff)
        self.batch_size, self.image_format = batch_size, image_format
        self._checked = expect is None

    def _request(self, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                body = e.read().decode("utf-8", "replace")
                try:
                    msg = json.loads(body).get("error", body)
                except ValueError:
                    msg = body
                if e.code < 500:
                    raise RuntimeError(f"Calibri: reward server {self.url} rejected the request (HTTP {e.code}): "
                                       f"{msg}") from e
                last = RuntimeError(f"HTTP {e.code}: {msg}")
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = e
            logger.warning("Calibri: reward server %s attempt %d/%d failed: %s", self.url, attempt + 1,
                           self.retries + 1, last)
        raise RuntimeError(f"Calibri: reward server {self.url} failed after {self.retries + 1} attempts "
                           f"(timeout {self.timeout}s): {last}. Is `search/reward_server.py` running there?")

    def health(self) -> dict[str, Any]:
        return self._request("/health", None)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if not self._checked:
            served = self.health().get("reward")
            if served != self.expect:
                raise RuntimeError(f"Calibri: reward server {self.url} serves {served!r}, expected {self.expect!r}.")
            self._checked = True
        out = []
        for s in range(0, images.shape[0], self.batch_size):
            chunk, texts = images[s:s + self.batch_size], prompts[s:s + self.batch_size]
            payload: dict[str, Any] = {"prompts": texts}
            if self.image_format == "npz":
                payload["images_npz"] = encode_images_npz(chunk)
            else:
                payload["images_png"] = encode_images_png(chunk)
            scores = self._request("/score", payload).get("scores")
            if not isinstance(scores, list) or len(scores) != len(texts):
                raise RuntimeError(f"Calibri: reward server {self.url} returned {scores!r} for {len(texts)} images.")
            out.append(torch.tensor(scores, dtype=torch.float32))
        return torch.cat(out)
