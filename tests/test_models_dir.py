"""`serve --models DIR` / CALIBRI_MODELS_DIR: an existing models folder is read through ComfyUI's own
extra_model_paths mechanism (the config is loaded here by ComfyUI's loader, as main.py loads it)."""

from __future__ import annotations

import pytest

from calibri_core import comfy_env


def test_models_dir_config_adds_every_model_folder(tmp_path, monkeypatch):
    import importlib.util

    import folder_paths

    # by path: on some hosts another top-level ``utils`` module is imported first
    spec = importlib.util.spec_from_file_location(
        "calibri_host_extra_config", comfy_env.find_host().path / "utils" / "extra_config.py")
    extra_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extra_config)
    load_extra_path_config = extra_config.load_extra_path_config

    models = tmp_path / "my models"
    for sub in ("diffusion_models", "unet", "calibri", "text_encoders"):
        (models / sub).mkdir(parents=True)
    (models / "diffusion_models" / "flux1-dev.safetensors").write_bytes(b"")
    (models / "unet" / "old.safetensors").write_bytes(b"")
    config = comfy_env.models_dir_config(models, tmp_path / "models.yaml")
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", saved)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    load_extra_path_config(str(config))
    assert str(models / "diffusion_models") in folder_paths.get_folder_paths("diffusion_models")
    assert {"flux1-dev.safetensors", "old.safetensors"} <= set(folder_paths.get_filename_list("diffusion_models"))
    assert str(models / "calibri") in folder_paths.get_folder_paths("calibri")
    assert set(comfy_env.MODEL_SUBFOLDERS) >= {"checkpoints", "vae", "loras", "text_encoders", "calibri"}


def test_models_dir_must_exist(tmp_path):
    with pytest.raises(comfy_env.ComfyHostError, match="does not exist"):
        comfy_env.models_dir_config(tmp_path / "nope", tmp_path / "models.yaml")
