"""The search's commands exactly as the README's Search section writes them, run as a user runs them.

Every command is a subprocess started from the repository root with a clean environment (no PYTHONPATH: the child
must find and activate the ComfyUI host itself, as ``python -m calibri_core.comfy_env serve|test`` find it), on a
tiny random-weight SD3.5-Medium-shaped model *file* (``server_harness.write_models``; a FLUX file that ComfyUI
0.3.75 detects is hundreds of MB), with no text-encoder or VAE weights (``[model] options = { clip_type = "hash" }``)
and the weight-free ``target`` reward. Each run is 2 generations of 2 candidates, 1 prompt, 2 steps, a 16×8×8 latent.

The child gets ``COMFYUI_PATH`` only when this session's host came from it, so both use the same host; otherwise
it finds the same pinned snapshot or containing ComfyUI (``HOME`` / ``CALIBRI_CACHE`` are passed on).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from test_search_loop import to_toml

from calibri_core import comfy_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("calibri-best.safetensors", "calibri-last-mean.safetensors")
# The run dir as the README lists it.
RUN_DIR_FILES = PRESETS + ("generations.jsonl", "plot_train.png", "plot_validation.png", "plot_sigma.png",
                           "plot_scales.png", "grid_validation.png", "config.json", "state.json", "optimizer.jsonl")
GENERATIONS = 2
TIMEOUT_S = 240
# Passed on to the child so it finds the same host and behaves like a user's shell; nothing else is.
PASSED_ON = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CALIBRI_CACHE", "SYSTEMROOT")


def _host() -> comfy_env.Host:
    return comfy_env.find_host(provision=False)


def _env(**extra: str) -> dict:
    """A clean environment: no PYTHONPATH; COMFYUI_PATH only when this session's host came from it."""
    env = {k: os.environ[k] for k in PASSED_ON if k in os.environ}
    host = _host()
    if host.source == "env":
        env["COMFYUI_PATH"] = str(host.path)
    env["OMP_NUM_THREADS"] = "1"  # the tiny model gains nothing from threads; 2 ranks share the CPUs
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    print(f"$ {' '.join(cmd)}  -> exit {proc.returncode} in {time.monotonic() - t0:.1f}s")
    return proc


def _search(*args: str) -> list[str]:
    return [sys.executable, "-m", "search", *args]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _presets(run_dir) -> dict:
    return {name: open(os.path.join(run_dir, name), "rb").read() for name in PRESETS}


def _log(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "generations.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]  # times differ


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model file, a target image for the reward and the prompt files, shared by every run."""
    import server_harness
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("search_cli")
    model = server_harness.write_models(root / "models")["unet"]
    target = root / "target.safetensors"
    # LatentRGBDecoder makes one pixel per latent pixel: 64×64 images are 8×8.
    save_file({"images": torch.rand((1, 8, 8, 3), generator=torch.Generator().manual_seed(0))}, str(target))
    (root / "train.txt").write_text("a red apple\na blue car\na cat on a mat\n", encoding="utf-8")
    (root / "val.txt").write_text("a green tree\n", encoding="utf-8")
    return SimpleNamespace(root=root, model=model, target=target)


def _config(files, name: str, model: str | None = None) -> str:
    """``<root>/<name>.toml`` with run dir ``<root>/<name>``. Relative paths are taken from the config's folder;
    reward options are not, so the target is absolute."""
    cfg = {
        "model": {"family": "sd3", "diffusion_model": os.path.relpath(model or files.model, files.root),
                  "options": {"clip_type": "hash"}},
        "search": {"seed": 1, "popsize": 2, "generations": GENERATIONS, "val_every": 1, "bucket_size": 1,
                   "candidates_per_call": 1},
        "sampling": {"steps": 2, "width": 64, "height": 64},
        "prompts": {"train": "train.txt", "validation": "val.txt"},
        "output": {"run_dir": name, "grid_prompts": 1},
        "rewards": [{"name": "target", "path": str(files.target)}],
    }
    path = files.root / f"{name}.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def reference(files):
    """``python -m search --config F``: the uninterrupted single-process run the other runs must reproduce."""
    proc = _ok(_run(_search("--config", _config(files, "ref"))))
    return SimpleNamespace(run_dir=files.root / "ref", proc=proc)


def test_run_writes_the_run_dir(files, reference):
    from calibri_core.preset import load_preset

    run_dir = reference.run_dir
    missing = [name for name in RUN_DIR_FILES if not (run_dir / name).is_file()]
    assert not missing, f"run dir lacks {missing}: {sorted(os.listdir(run_dir))}"
    assert not any(name.endswith(".pkl") for name in os.listdir(run_dir))
    assert [r["generation"] for r in _log(run_dir)] == list(range(1, GENERATIONS + 1))
    state = json.loads((run_dir / "state.json").read_text())
    assert state["generation"] == GENERATIONS and state["finished"]
    # The child found and activated this session's host itself (no PYTHONPATH) and loaded the model file.
    assert f"Calibri: {_host().report()}" in reference.proc.stderr
    assert "best preset: " in reference.proc.stdout
    best = load_preset(str(run_dir / "calibri-best.safetensors"))
    provenance = best.provenance
    assert best.calibration.family == "sd3" and provenance["source"] == "calibri-search"
    assert provenance["model"]["name"] == files.model.name
    assert provenance["model"]["sha256"] == hashlib.sha256(files.model.read_bytes()).hexdigest()
    assert provenance["statistics"]["generations"] == GENERATIONS


def test_check_loads_no_model(files):
    """``--check`` validates and reports the host. The model file here is cut after its safetensors header (no
    tensor data): the check reads the family from the header's names and shapes, and loading it would fail."""
    data = files.model.read_bytes()
    fake = files.root / "header-only.safetensors"
    fake.write_bytes(data[:8 + int.from_bytes(data[:8], "little")])
    proc = _ok(_run(_search("--config", _config(files, "checked", model=str(fake)), "--check")))
    assert "config OK: sd3 gate, 2 member(s), 3 train / 1 validation prompts" in proc.stdout
    assert f"host: {_host().report()}" in proc.stdout
    assert not (files.root / "checked").exists() or not os.listdir(files.root / "checked")  # nothing started


@pytest.mark.parametrize("case", ["missing model file", "COMFYUI_PATH not a ComfyUI"])
def test_check_refuses_a_bad_config(files, tmp_path, case):
    config, env = _config(files, "bad"), _env()
    if case == "missing model file":
        config = _config(files, "bad", model=str(files.root / "absent.safetensors"))
        expected = "model.diffusion_model file"
    else:
        env["COMFYUI_PATH"] = str(tmp_path)
        expected = f"COMFYUI_PATH={tmp_path} is not a ComfyUI folder"
    proc = _run(_search("--config", config, "--check"), env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "config OK" not in proc.stdout


def test_resume_continues_to_the_uninterrupted_bytes(files, reference):
    """Stopped after 1 generation (``--generations 1``; ``--set`` repeats the config's steps), then
    ``--resume DIR --config F`` (the config says 2 generations)."""
    config = _config(files, "resumed")
    run_dir = files.root / "resumed"
    _ok(_run(_search("--config", config, "--generations", "1", "--set", "sampling.steps=2")))
    assert json.loads((run_dir / "state.json").read_text())["generation"] == 1
    assert len(_log(run_dir)) == 1
    proc = _ok(_run(_search("--resume", str(run_dir), "--config", config)))
    assert f"resuming {run_dir} at generation 1" in proc.stderr
    assert _presets(run_dir) == _presets(reference.run_dir)
    assert _log(run_dir) == _log(reference.run_dir)


def test_resume_without_config(files, reference):
    """``python -m search --resume DIR`` on a run killed before its first generation (only config.json written)."""
    from search.config import load_config
    from search.loop import prepare_run_dir

    config = _config(files, "killed")
    prepare_run_dir(load_config(config), resume=False)  # what a new run writes before it loads the model
    run_dir = files.root / "killed"
    _ok(_run(_search("--resume", str(run_dir))))
    assert _presets(run_dir) == _presets(reference.run_dir)


def test_console_script(files, reference, tmp_path):
    """``calibri-search --config F`` as ``pip install .`` installs it ([project.scripts] in pyproject.toml): the
    package is built from this checkout and installed into a folder of its own, and its script runs from there."""
    target = tmp_path / "installed"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
               "--target", str(target), REPO]
    _ok(_run(install))
    script = target / "bin" / "calibri-search"
    assert script.is_file(), sorted(p.name for p in target.iterdir())
    assert (target / "search" / "data" / "train_prompts.txt").is_file()  # the default prompts are package data
    env = _env(PYTHONPATH=str(target))
    _ok(_run([str(script), "--config", _config(files, "script")], env=env))
    assert _presets(files.root / "script") == _presets(reference.run_dir)


def test_torchrun_two_processes(files, reference):
    """``torchrun --standalone --nproc_per_node=2 -m search --config F`` on CPU (gloo) gives the one-process bytes."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # torchrun is torch.distributed.run's console script; a venv that borrows the system's torch may lack it.
    launcher = [torchrun] if os.path.isfile(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
    proc = _ok(_run(launcher + ["--standalone", "--nproc_per_node=2", "-m", "search",
                                "--config", _config(files, "torchrun")]))
    output = proc.stdout + proc.stderr
    assert output.count(f"Calibri: {_host().report()}") == 2, output[-4000:]  # both ranks activated the host
    assert _presets(files.root / "torchrun") == _presets(reference.run_dir)
    assert _log(files.root / "torchrun") == _log(reference.run_dir)


def test_hash_encoder_fits_each_family():
    """``clip_type = "hash"`` (in --help) shapes its encoder from ComfyUI's unet_config (in-process, tiny models)."""
    from tiny_models import SPECS, build_patcher

    from search.cli import build_parser
    from search.models import hash_encoder_for

    assert 'smoke tests and benchmarks: [model] options = { clip_type = "hash" }' in build_parser().format_help()
    for name in ("flux", "flux2", "chroma", "sd3", "qwen_image", "lumina2", "wan"):
        spec = SPECS[name]
        encoder = hash_encoder_for(build_patcher(name))
        cond, extras = encoder.encode("a prompt")
        assert cond.shape[-1] == spec.context[1], name
        pooled = extras.get("pooled_output")
        shape = tuple(pooled.shape) if pooled is not None else None
        assert shape == ((1, spec.pooled) if spec.pooled else None), name
