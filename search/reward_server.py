"""Calibri reward server: runs one reward in its own environment and serves it on 127.0.0.1.

    python search/reward_server.py --reward hpsv3 --options '{"checkpoint": "...", "base": "..."}' --port 18067
    python search/reward_server.py --reward imagereward-package --port 18068      # env with image-reward 1.5
    python search/reward_server.py --reward hpsv3-package --port 18067            # env with hpsv3 + transformers 4.45
    python search/reward_server.py --reward python:my_module:my_reward

The wire format is documented in search/rewards/remote.py and docs/rewards.md. ``--port 0`` picks a free port; the
first stdout line is always ``Calibri reward server listening on http://127.0.0.1:<port>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from search.rewards import Reward, build_reward  # noqa: E402
from search.rewards._common import as_scores, check_batch, resolve_device, to_pil_list  # noqa: E402
from search.rewards.remote import decode_images_npz, decode_images_png  # noqa: E402

logger = logging.getLogger("calibri")
MAX_BODY = 512 * 1024 * 1024


class _PackageReward(Reward):
    """Wraps an official package's scorer ``f(pil_images, prompts) -> list[float]``."""

    def __init__(self, name: str, fn: Callable[[list, list[str]], Any], jpeg_quality: int | None):
        self.name, self._fn, self.jpeg_quality = name, fn, jpeg_quality

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.tensor(self._fn(to_pil_list(images, self.jpeg_quality), prompts), dtype=torch.float32)


def _imagereward_package(name: str = "ImageReward-v1.0", device: str | None = "auto", download_root: str | None = None,
                         jpeg_quality: int | None = None) -> Reward:
    """ImageReward through its own package (image-reward 1.5, transformers 4.52, timm 0.6.13, fairscale 0.4.13)."""
    import ImageReward as RM

    model = RM.load(name, device=str(resolve_device(device)), download_root=download_root)

    def fn(pils: list, prompts: list[str]) -> list[float]:
        with torch.inference_mode():  # Calibri: inference_rank(prompt, [img]) per image
            out = []
            for img, p in zip(pils, prompts):
                rewards = model.inference_rank(p, [img])[1]  # squeeze() makes a one-image list a bare float
                out.append(float(rewards[0] if isinstance(rewards, list) else rewards))
            return out

    return _PackageReward("imagereward-package", fn, jpeg_quality)


def _hpsv3_package(checkpoint: str | None = None, config: str | None = None, device: str | None = "auto",
                   jpeg_quality: int | None = 95) -> Reward:
    """The official hpsv3 package (pins transformers 4.45.2); returns mu like Calibri's hpsv3_server."""
    from hpsv3 import HPSv3RewardInferencer

    inf = HPSv3RewardInferencer(config_path=config, checkpoint_path=checkpoint, device=str(resolve_device(device)))

    def fn(pils: list, prompts: list[str]) -> list[float]:
        with torch.inference_mode():
            return [float(r[0]) for r in inf.reward(prompts=prompts, image_paths=pils)]

    return _PackageReward("hpsv3-package", fn, jpeg_quality)


SERVER_ONLY = {"imagereward-package": _imagereward_package, "hpsv3-package": _hpsv3_package}


def make_reward(name: str, options: dict[str, Any]) -> Reward:
    if name in SERVER_ONLY:
        return SERVER_ONLY[name](**options)
    return build_reward(name, **options)


def make_server(reward: Reward, name: str, port: int) -> HTTPServer:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._reply(200, {"status": "ok", "reward": name})
            else:
                self._reply(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/score":
                self._reply(404, {"error": f"unknown path {self.path}; use POST /score"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= MAX_BODY:
                    raise ValueError(f"body length {length} outside 1..{MAX_BODY}")
                req = json.loads(self.rfile.read(length).decode("utf-8"))
                prompts = req["prompts"]
                if "images_npz" in req:
                    images = decode_images_npz(req["images_npz"])
                elif "images_png" in req:
                    images = decode_images_png(req["images_png"])
                else:
                    raise ValueError("request needs 'images_npz' or 'images_png'")
                if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                    raise ValueError("'prompts' must be a list of strings")
                images = check_batch(images, prompts, name)
            except (ValueError, KeyError, TypeError) as e:
                self._reply(400, {"error": f"bad request: {e}"})
                return
            try:
                with lock:
                    scores = as_scores(reward.score(images, prompts), len(prompts), name)
            except Exception as e:  # the client retries on 5xx; report the reason
                logger.exception("Calibri: reward %s failed", name)
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})
                return
            self._reply(200, {"scores": scores.tolist(), "reward": name})

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("Calibri: reward server: " + fmt, *args)

    return HTTPServer(("127.0.0.1", port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve one Calibri reward over HTTP on 127.0.0.1.")
    parser.add_argument("--reward", required=True, help="registry name, python:module:callable, imagereward-package "
                                                        "or hpsv3-package")
    parser.add_argument("--options", default="{}", help="JSON object of reward options")
    parser.add_argument("--port", type=int, default=18067, help="TCP port on 127.0.0.1 (0 = any free port)")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.options)
    except ValueError as e:
        parser.error(f"--options is not valid JSON: {e}")
    if not isinstance(options, dict):
        parser.error("--options must be a JSON object")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reward = make_reward(args.reward, options)
    server = make_server(reward, args.reward, args.port)
    # the first stdout line is the contract that launchers (and tests) read the port from
    sys.stdout.write(f"Calibri reward server listening on http://127.0.0.1:{server.server_address[1]}\n")
    sys.stdout.flush()

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        logger.info("Calibri: reward server on port %d stopped", server.server_address[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
