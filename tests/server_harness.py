"""A real ComfyUI server for the tests, shared by tests/test_workflows.py and tests/test_server_e2e.py.

The server runs the host from ``calibri_core.comfy_env`` (``find_host``, ``install_pack``, ``server_command``) as a
subprocess on 127.0.0.1 and a free port, with ``--base-directory`` pointing at a temporary folder. Everything the
server reads or writes lives there: ``custom_nodes/calibri`` (a link to this checkout, made by ``install_pack``),
``custom_nodes/calibri_test_nodes`` (a link to the test-only pack in ``tests/server_fixtures``), the models
(a tiny random-weight SD3.5-Medium-shaped MMDiT-X in ``diffusion_models``, random TAESD3 weights in
``vae_approx``), ``models/calibri``, ``output``, ``user`` and an in-memory database. The user's ComfyUI folders are
never touched, and the whole folder is removed when the server stops.

Why SD3 and not FLUX: ComfyUI 0.3.75's ``model_detection`` fixes a FLUX model's ``num_heads`` at 24 and its
``axes_dim`` at [16, 56, 56], so a FLUX file that ``UNETLoader`` accepts has hidden size 24·128 = 3072 (hundreds of
MB per block). The MMDiT detection reads every width from the weights (hidden = 64·depth), so a 4-block, width-256
SD3.5-Medium-shaped model (10 M parameters) loads through the real ``UNETLoader``.

One server per pytest session: the session-scoped fixtures in both test modules call :func:`acquire` and their
finalizers :func:`release` (at session end); the server stops when the last user lets go, and at interpreter exit
as a safety net. Set ``CALIBRI_KEEP_SERVER_DIR=1`` to keep the base directory (server.log, outputs) for debugging.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from calibri_core import comfy_env

TESTS_DIR = Path(__file__).resolve().parent
TEST_PACK = TESTS_DIR / "server_fixtures" / "calibri_test_nodes"
TEST_PACK_NAME = "calibri_test_nodes"

# The tiny model as ComfyUI sees it (see tests/tiny_models.py SPECS["sd3"]).
UNET_NAME = "calibri-test-tiny-sd35m.safetensors"
SD3_DEPTH = 4                   # joint_blocks.0-3; hidden = 64·depth = 256
SD3_CONTEXT = (5, 48)           # cross-attention tokens, width (context_embedder in_features)
SD3_POOLED = 32                 # adm_in_channels
VAE_NAME = "taesd3"             # VAELoader's name for vae_approx/taesd3_{encoder,decoder}.safetensors
IMAGE_SIZE = 64                 # EmptySD3LatentImage 64×64 → latent 16×8×8 (4×4 patches of the MMDiT)

BOOT_TIMEOUT_S = 240.0
PROMPT_TIMEOUT_S = 120.0


class ServerError(RuntimeError):
    pass


# ---------------------------------------------------------------- model files

def write_models(models: Path) -> dict:
    """Write the tiny SD3 diffusion model and random TAESD3 weights under ``models``; return their paths.

    Verifies in-process that ComfyUI's own loader detects the file as SD3 with the same weights, so a failure
    here says "the model file is wrong", not "the server is broken".
    """
    import comfy.sd
    import torch
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    if str(TESTS_DIR) not in sys.path:
        sys.path.append(str(TESTS_DIR))
    import tiny_models

    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (models / "vae_approx").mkdir(parents=True, exist_ok=True)
    (models / "calibri").mkdir(parents=True, exist_ok=True)

    model = tiny_models.build_model("sd3", seed=0, depth=SD3_DEPTH)
    state = {k: v.detach().contiguous() for k, v in model.diffusion_model.state_dict().items()}
    unet = models / "diffusion_models" / UNET_NAME
    save_file(state, str(unet))
    patcher = comfy.sd.load_diffusion_model(str(unet))
    detected = type(patcher.model.model_config).__name__
    if detected != "SD3":
        raise ServerError(f"the tiny model was detected as {detected}, not SD3")
    loaded = patcher.model.diffusion_model.state_dict()
    if set(loaded) != set(state) or not all(torch.equal(loaded[k].float(), state[k].float()) for k in state):
        raise ServerError("the tiny SD3 model does not round-trip through comfy.sd.load_diffusion_model")

    # TAESD's convolutions come from comfy.ops.disable_weight_init (never initialised): set He-normal weights,
    # zero biases, and a small last layer so the decoded image is not saturated to 0/1 everywhere.
    generator = torch.Generator().manual_seed(0)
    taesd = TAESD(latent_channels=16)
    with torch.no_grad():
        for name, p in sorted(taesd.named_parameters()):
            if p.dim() == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=generator) * math.sqrt(2.0 / fan_in))
            else:
                p.zero_()
        last = [m for m in taesd.taesd_decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.mul_(0.2)
    paths = {"unet": unet}
    for part in ("encoder", "decoder"):
        module = getattr(taesd, f"taesd_{part}")
        path = models / "vae_approx" / f"taesd3_{part}.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
        paths[part] = path
    return paths


# ---------------------------------------------------------------- the server

class ComfyServer:
    """One ComfyUI subprocess on 127.0.0.1 with a temporary base directory."""

    def __init__(self, keep: bool = False, address_space: int | None = None):
        self.keep = keep
        self.address_space = address_space  # RLIMIT_AS of the server process in bytes: memory bombs fail, not the box
        self.host = comfy_env.find_host()
        self.base = Path(tempfile.mkdtemp(prefix="calibri-e2e-"))
        self.models = self.base / "models"
        self.output = self.base / "output"
        self.log_path = self.base / "server.log"
        self.port = comfy_env._free_port()
        self.proc: subprocess.Popen | None = None
        self.boot_s = float("nan")
        self.object_info: dict = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ComfyServer":
        for sub in ("custom_nodes", "output", "input", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        comfy_env.install_pack(self.base)  # links this checkout as <base>/custom_nodes/calibri
        os.symlink(TEST_PACK, self.base / "custom_nodes" / TEST_PACK_NAME, target_is_directory=True)
        write_models(self.models)
        cmd = comfy_env.server_command(self.port, cpu=True) + [
            "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
            "--disable-auto-launch"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.host.path, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=self._limit if self.address_space else None)
        deadline = t0 + BOOT_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while booting:\n{self.log_tail()}")
            try:
                self.object_info = self.get("/object_info", timeout=30)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"ComfyUI did not answer within {BOOT_TIMEOUT_S:.0f}s:\n{self.log_tail()}")
                time.sleep(0.5)
        self.boot_s = time.monotonic() - t0
        return self

    def _limit(self) -> None:  # runs in the child between fork and exec
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (self.address_space, self.address_space))

    def vm_peak(self) -> int:
        """The server process's peak virtual memory (VmPeak) in bytes, what RLIMIT_AS bounds."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmPeak:"))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------ HTTP (loopback only)

    def _request(self, path: str, data: dict | None = None, timeout: float = 30.0):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()

    def get(self, path: str, timeout: float = 30.0):
        return json.loads(self._request(path, timeout=timeout)[1])

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        return self._request(path, timeout=timeout)[1]

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; returns (HTTP status, JSON body). A validation failure is status 400 with node_errors."""
        try:
            status, body = self._request("/prompt", {"prompt": prompt, "client_id": "calibri-tests"})
            return status, json.loads(body)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        """The /history entry of ``prompt_id`` once it has finished (success or error); bounded polling."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        status, body = self.post_prompt(prompt)
        if status != 200:
            raise ServerError(f"POST /prompt refused ({status}): {json.dumps(body)[:2000]}")
        return self.wait(body["prompt_id"], timeout)


# ---------------------------------------------------------------- one shared server per session

_lock = threading.Lock()
_server: ComfyServer | None = None
_users = 0
_failure: BaseException | None = None


def acquire() -> ComfyServer:
    """The session's server, started on first use. Raises again for every user if the boot failed."""
    global _server, _users, _failure
    with _lock:
        if _failure is not None:
            raise ServerError(f"the shared ComfyUI server failed to start: {_failure}")
        if _server is None:
            server = ComfyServer(keep=bool(os.environ.get("CALIBRI_KEEP_SERVER_DIR")))
            try:
                server.start()
            except BaseException as e:
                _failure = e
                server.stop()
                raise
            _server = server
            atexit.register(server.stop)
        _users += 1
        return _server


def release() -> None:
    global _server, _users
    with _lock:
        _users -= 1
        if _users <= 0 and _server is not None:
            _server.stop()
            _server = None
