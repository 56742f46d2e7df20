"""A search's start, as a new user meets it: the config contradicted by the model file, rewards whose local files are
not there, and a start that fails, then a corrected rerun in the same run dir.

The ``--check`` and run commands run as the README writes them (subprocesses, ``test_search_cli``'s clean
environment) on the tiny SD3.5-Medium-shaped model file; the rest runs in-process."""

from __future__ import annotations

import copy
import os
import struct

import pytest
from test_search_cli import (
    _config,
    _env,
    _ok,
    _run,
    _search,
    files,  # noqa: F401  (the module fixture: tiny model file, target, prompts)
)
from test_search_loop import QuadraticEvaluator, raw_config

from calibri_core.families import get_family
from search.config import ConfigError, load_config
from search.loop import run_search
from search.model_files import check_model_files, read_header
from search.rewards import check_rewards


def _with(path: str, old: str, new: str) -> str:
    text = open(path, encoding="utf-8").read()
    assert old in text
    open(path, "w", encoding="utf-8").write(text.replace(old, new))
    return path


def _refused(proc, *expected: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "config OK" not in proc.stdout, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    return proc.stderr


def _started_files(run_dir) -> list[str]:
    return sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []


# ---------------------------------------------------------------- the family the file contradicts


def test_check_refuses_a_family_the_model_file_contradicts(files):  # noqa: F811
    """FLUX's protocol on an SD3.5 file: ``--check`` reads the file's header (no weights) and names both families."""
    config = _with(_config(files, "wrong-family-check"), '"sd3"', '"flux"')
    proc = _run(_search("--config", config, "--check"))
    _refused(proc, "model.family is 'flux'", "family 'sd3'", 'set model.family = "sd3"')
    assert _started_files(files.root / "wrong-family-check") == []


def test_run_refuses_the_wrong_family_before_sampling_and_leaves_no_run(files):  # noqa: F811
    """The same config run for real: refused before any sampling (no generation logged), the run dir holds nothing
    that blocks the corrected config, which then starts in the same run dir."""
    config = _config(files, "wrong-family-run")
    _with(config, '"sd3"', '"flux"')
    run_dir = files.root / "wrong-family-run"
    _refused(_run(_search("--config", config)), "model.family is 'flux'", "family 'sd3'")
    assert _started_files(run_dir) == []
    _with(config, '"flux"', '"sd3"')
    _ok(_run(_search("--config", config, "--generations", "1")))
    assert (run_dir / "state.json").is_file()


class SD3Evaluator(QuadraticEvaluator):
    """An evaluator whose model is SD3, whatever the config says (the family is only known once a model loaded)."""

    def __init__(self, config):
        seen = copy.copy(config)
        seen.model = {**config.model, "family": "sd3",
                      "options": {"counts": get_family("sd3").models["sd3.5-medium"].counts}}
        super().__init__(seen)


def test_loaded_model_of_another_family_is_refused_and_the_start_taken_back(tmp_path):
    cfg = raw_config(tmp_path, generations=2, evaluator="python:test_search_start:SD3Evaluator")
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="model.family is 'flux'.*family 'sd3'"):
        run_search(cfg)
    assert _started_files(run_dir) == []  # no config.json, no run.lock, no logs: nothing that holds a run
    cfg["model"]["family"] = "sd3"
    cfg["search"]["granularity"] = "gate"
    result = run_search(cfg)
    assert result.generations == 2 and result.best.family == "sd3"


def test_failed_start_in_an_existing_dir_keeps_what_was_there(tmp_path):
    """Only what the failed start wrote is taken back: a file the user had in the run dir stays."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    cfg = raw_config(tmp_path, evaluator="python:test_search_start:SD3Evaluator")
    with pytest.raises(ConfigError):
        run_search(cfg)
    assert _started_files(run_dir) == ["notes.txt"]


# ---------------------------------------------------------------- files the config cannot use


def test_gguf_and_bare_checkpoint_refused_before_loading(files, tmp_path):  # noqa: F811
    config = load_config(_config(files, "kinds"))
    gguf = tmp_path / "flux1-dev-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    config.model["diffusion_model"] = str(gguf)
    with pytest.raises(ConfigError, match="GGUF file.*safetensors release"):
        check_model_files(config)
    config.model["diffusion_model"], config.model["checkpoint"] = "", str(files.model)
    with pytest.raises(ConfigError, match="holds a diffusion model alone.*model.diffusion_model"):
        check_model_files(config)


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    for content in (b"", b"short", struct.pack("<Q", 2**40) + b"{}", struct.pack("<Q", 4) + b"[1]x"):
        bad.write_bytes(content)
        with pytest.raises(ConfigError, match="is not a safetensors file"):
            read_header(str(bad), "model.diffusion_model")


def test_unrecognised_model_refused(files, tmp_path):  # noqa: F811
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "not-a-dit.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(other))
    config = load_config(_config(files, "unknown", model=str(other)))
    with pytest.raises(ConfigError, match="ComfyUI does not recognise"):
        check_model_files(config)


# ---------------------------------------------------------------- rewards


def test_check_refuses_the_default_reward_without_its_weights(files):  # noqa: F811
    """The default reward (HPSv3) with no checkpoint configured: ``--check`` refuses it, as the run would after
    loading the model."""
    config = _config(files, "no-hpsv3")
    text = open(config, encoding="utf-8").read()
    start = text.index("[[rewards]]")
    open(config, "w", encoding="utf-8").write(text[:start])  # no [[rewards]]: the default
    env = {k: v for k, v in _env().items() if not k.startswith("CALIBRI_")}
    proc = _run(_search("--config", config, "--check"), env=env)
    _refused(proc, "rewards[0] (hpsv3)", "CALIBRI_HPSV3_CHECKPOINT", "huggingface.co/MizzenAI/HPSv3")
    assert _started_files(files.root / "no-hpsv3") == []


@pytest.mark.parametrize("spec, expected", [
    ({"name": "hpsv3"}, "CALIBRI_HPSV3_CHECKPOINT"),
    ({"name": "hpsv3", "checkpoint": "/absent/HPSv3.safetensors", "base": "/absent"}, "not found at /absent"),
    ({"name": "pickscore"}, "CALIBRI_PICKSCORE_DIR"),
    ({"name": "clip", "model": "/absent"}, "CLIP model folder not found"),
    ({"name": "imagereward"}, "CALIBRI_IMAGEREWARD_URL"),
    ({"name": "remote"}, "CALIBRI_REWARD_URL"),
    ({"name": "remote", "url": "http://example.com:80"}, "loopback"),
    ({"name": "target", "path": "/absent.safetensors"}, "target images file not found"),
    ({"name": "python:search.rewards:no_such_reward"}, "has no attribute 'no_such_reward'"),
    ({"name": "hpsv3", "checkpoints": "/x"}, "its options are checkpoint, base"),
])
def test_every_reward_checks_its_local_files(spec, expected, monkeypatch):
    for var in ("CALIBRI_HPSV3_CHECKPOINT", "CALIBRI_QWEN2VL_DIR", "CALIBRI_PICKSCORE_DIR", "CALIBRI_CLIP_DIR",
                "CALIBRI_IMAGEREWARD_URL", "CALIBRI_REWARD_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises((ValueError, FileNotFoundError), match=expected.replace(".", r"\.")):
        check_rewards([spec])


def test_hpsv3_check_passes_with_its_files(tmp_path, monkeypatch):
    """The check refuses only what is missing: with the files in place it passes (and loads nothing: they are
    empty)."""
    base = tmp_path / "Qwen2-VL-7B-Instruct"
    base.mkdir()
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json"):
        (base / name).write_text("{}")
    (tmp_path / "HPSv3.safetensors").write_bytes(b"")
    monkeypatch.setenv("CALIBRI_HPSV3_CHECKPOINT", str(tmp_path))
    monkeypatch.setenv("CALIBRI_QWEN2VL_DIR", str(base))
    check_rewards([{"name": "hpsv3", "jpeg_quality": 95}])


def test_killed_start_says_exactly_what_to_delete(tmp_path):
    """A start killed before its first generation (SIGKILL: nothing could be taken back) leaves config.json alone;
    a changed config is refused with the one file to delete, and runs once it is gone."""
    from search.loop import prepare_run_dir

    cfg = raw_config(tmp_path, generations=1)
    prepare_run_dir(load_config(None, raw=cfg), resume=False)  # what a killed start leaves
    changed = copy.deepcopy(cfg)
    changed["search"]["seed"] = 4
    config_json = os.path.join(cfg["output"]["run_dir"], "config.json")
    with pytest.raises(ConfigError, match=f"never completed a generation.*delete {config_json!r}"):
        run_search(changed)
    with pytest.raises(ConfigError, match=f"nothing is lost by starting over: delete {config_json!r}"):
        load_config(None, raw=changed, resume=cfg["output"]["run_dir"])
    os.remove(config_json)
    assert run_search(changed).generations == 1
