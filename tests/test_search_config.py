"""Run-config validation: every bad input is a clear error before any model is loaded."""

from __future__ import annotations

import os

import pytest
from test_search_loop import raw_config, to_toml


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to build an evaluator (i.e. load a model)."""
    import search.loop

    def refuse(config):
        raise AssertionError("an evaluator was built although the config is invalid")

    monkeypatch.setattr(search.loop, "build_evaluator", refuse)


def _comfy_config(tmp_path) -> dict:
    cfg = raw_config(tmp_path)
    cfg["search"]["evaluator"] = "comfy"
    for name in ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl.safetensors", "ae.safetensors"):
        (tmp_path / name).write_bytes(b"")
    cfg["model"].update(diffusion_model=str(tmp_path / "flux1-dev.safetensors"), vae=str(tmp_path / "ae.safetensors"),
                        text_encoders=[str(tmp_path / "clip_l.safetensors"), str(tmp_path / "t5xxl.safetensors")])
    return cfg


def _cli_error(tmp_path, cfg: dict, capsys, *extra: str) -> str:
    from search.cli import main

    path = tmp_path / "bad.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path), "--no-progress", *extra])
    assert e.value.code == 2
    return capsys.readouterr().err


# Issue 9's table of the reference protocol, as the reference table in the code must hold it.
ISSUE_9 = {"search.seed": 42, "search.popsize": 0, "search.generations": None, "output.final": "best-train",
           "rewards.hpsv3.jpeg_quality": 95, "sampling.micro_batch": 4}
ISSUE_9_FAMILIES = {  # family -> {config key: value}
    "flux": {"search.granularity": "layer", "search.popsize": 0, "sampling.guidance": 3.5},
    "sd3": {"search.granularity": "gate", "search.popsize": 0, "search.cfg_start": 7.0, "sampling.cfg": 7.0},
    "qwen_image": {"search.granularity": "gate", "search.popsize": 24, "search.cfg_start": 7.0, "sampling.cfg": 4.0,
                   "sampling.micro_batch": 1},
}
# Item 7: families the reference never ran take cfg (and guidance) from their ComfyUI workflow template.
TEMPLATE_FAMILIES = {
    "chroma": {"sampling.cfg": 3.5},  # image_chroma_text_to_image.json
    "lumina2": {"sampling.cfg": 4.0},  # image_netayume_lumina_t2i.json
    "wan": {"sampling.cfg": 6.0},  # text_to_video_wan.json
    "flux2": {"sampling.guidance": 4.0},  # image_flux2.json
    "longcat_image": {"sampling.cfg": 4.0, "sampling.guidance": 4.0},  # image_longcat_text_to_image.json
    "ovis_image": {"sampling.cfg": 5.0},  # image_ovis_text_to_image.json
}


def test_reference_table_holds_issue_9_values():
    from calibri_core.families import get_family
    from search.config import reference_default

    for key, value in ISSUE_9.items():
        assert reference_default(key) == value, key
    for family, values in {**ISSUE_9_FAMILIES, **TEMPLATE_FAMILIES}.items():
        for key, value in values.items():
            assert reference_default(key, get_family(family)) == value, (family, key)


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_image", "flux2", "wan", "chroma", "lumina2", "z_image"])
def test_every_default_is_the_reference_tables(tmp_path, family):
    """Every default a config without settings gets is the reference table's (PROTOCOL / the family table)."""
    from calibri_core.families import get_family
    from search.config import FAMILY_DEFAULTS, PROTOCOL, REMOVED, SCHEMA, load_config, reference_default

    fam = get_family(family)
    cfg = _comfy_config(tmp_path)
    cfg["model"]["family"] = family
    cfg["search"] = {"evaluator": "comfy"}  # everything else from the defaults
    cfg["sampling"] = {}
    cfg.pop("rewards"), cfg.pop("members", None), cfg.pop("prompts")  # default prompt files too
    config = load_config(None, raw=cfg)
    sections = {"search": config.search, "sampling": config.sampling, "output": config.output}
    checked = 0
    for key in set(PROTOCOL) | set(FAMILY_DEFAULTS):
        section, _, name = key.partition(".")
        if key in REMOVED or section not in sections:
            continue
        want = reference_default(key, fam)
        if key == "sampling.cfg" and want is None:
            want = 1.0  # no cfg case: sampled at cfg 1
        assert sections[section][name] == want, (family, key)
        assert name in SCHEMA[section], key
        checked += 1
    assert checked >= 16
    hps = {"name": reference_default("rewards.name"), "weight": 1.0,
           "jpeg_quality": reference_default("rewards.hpsv3.jpeg_quality")}
    assert config.rewards == [hps]
    if fam.cfg is not None:  # the cfg case: ω starts at (c, 1 - c), c = search_cfg or the sampling cfg
        c = fam.search_cfg if fam.search_cfg is not None else fam.cfg
        assert config.members == [{"prompt": "positive", "weight": c}, {"prompt": "negative", "weight": 1.0 - c}]
    else:
        assert config.members == [{"prompt": "positive", "weight": 1.0}]
    assert len(config.train_prompts) > 16 and config.val_prompts


def test_help_names_every_defaults_source(capsys):
    from search.config import FAMILY_DEFAULTS, PROTOCOL, REMOVED, schema_help

    text = schema_help()
    for key, (_, source) in PROTOCOL.items():
        if key not in REMOVED:
            assert source in text, key
    for key, (_, source) in FAMILY_DEFAULTS.items():
        if key not in REMOVED:
            assert source in text, key
    assert "v-gen-ai/Calibri" in text


def test_reference_deviation_options(tmp_path):
    from search.config import ConfigError, load_config

    cfg = _comfy_config(tmp_path)
    cfg["model"]["family"] = "qwen_image"
    cfg["search"].update(cfg_start=4.0, generations=50, popsize=0, granularity="block")
    cfg["output"]["final"] = "best-validation"
    cfg["rewards"] = [{"name": "hpsv3", "jpeg_quality": 0}]
    cfg.pop("members", None)
    config = load_config(None, raw=cfg)
    assert config.members == [{"prompt": "positive", "weight": 4.0}, {"prompt": "negative", "weight": -3.0}]
    assert (config.search["generations"], config.search["popsize"], config.search["granularity"]) == (50, 0, "block")
    assert config.output["final"] == "best-validation" and config.rewards[0]["jpeg_quality"] == 0
    for mutate, match in [
        (lambda c: c["output"].update(final="best-val"), "output.final must be one of.*'best-validation'"),
        (lambda c: c.update(rewards=[{"name": "hpsv3", "jpeg_quality": 101}]), "jpeg_quality must be an int 0..100"),
        (lambda c: c.update(sampling={"micro_batch": 4}), "sampling.micro_batch is not an option.*batch_size.*\\(1\\)"),
    ]:
        bad = _comfy_config(tmp_path)
        bad["model"]["family"] = "qwen_image"
        mutate(bad)
        with pytest.raises(ConfigError, match=match):
            load_config(None, raw=bad)
    with pytest.raises(ConfigError, match="sampling.micro_batch is not an option.*\\(4\\)"):
        load_config(None, overrides={"sampling.micro_batch": 2}, raw=_comfy_config(tmp_path))


@pytest.mark.parametrize("mutate, match", [
    (lambda c, t: c["model"].update(diffusion_model=str(t / "missing.safetensors")), "model.diffusion_model file"),
    (lambda c, t: c["model"].update(text_encoders=[str(t / "nope.safetensors")]), r"model.text_encoders\[0\] file"),
    (lambda c, t: c["model"].update(diffusion_model="", checkpoint=""), "names no model"),
    (lambda c, t: c.update(rewards=[{"name": "hpsv4"}]), "unknown reward 'hpsv4'.*Did you mean 'hpsv3'"),
    (lambda c, t: (t / "empty.txt").write_text("\n# comment\n\n") and c["prompts"].update(train=str(t / "empty.txt")),
     "prompts.train.*holds no prompts"),
    (lambda c, t: c["prompts"].update(validation=str(t / "absent.txt")), "prompts.validation"),
    (lambda c, t: c["search"].update(granularity="blocks"), "granularity 'blocks' is not supported by the flux"),
    (lambda c, t: c["model"].update(family="flux3"), "unknown model family 'flux3'"),
    (lambda c, t: c.update(members=[{"prompt": "positive"}, {"prompt": "negative"}, {"prompt": "positive"}]),
     "no default ω"),
    (lambda c, t: c.update(members=[{"prompt": "positive", "weight": 2.0}, {"prompt": "negative"}]),
     "every member or of none"),
    (lambda c, t: c.update(members=[{"prompt": "uncond"}]), r"members\[0\].prompt must be one of"),
    (lambda c, t: c.update(members=[]), "members is empty"),
    (lambda c, t: c["search"].update(sigma0=-1.0), "sigma0 must be a positive"),
    (lambda c, t: c["search"].update(scale_bounds=[2.0, -1.0]), "scale_bounds must be"),
    (lambda c, t: c["search"].update(popsze=4), "unknown config key search.popsze.*'popsize'"),
    (lambda c, t: c.update(serach={}), r"unknown config section \[serach\]"),
    (lambda c, t: c["search"].update(generations="ten"), "search.generations must be a int"),
    (lambda c, t: c["search"].update(evaluator="mine"), "search.evaluator must be"),
])
def test_bad_input_is_refused_before_model_load(tmp_path, capsys, no_model_load, mutate, match):
    import re

    from search.config import ConfigError, load_config

    cfg = _comfy_config(tmp_path)
    mutate(cfg, tmp_path)
    with pytest.raises(ConfigError, match=match):
        load_config(None, raw=cfg)
    if cfg.get("members") == []:
        return  # an empty array of tables cannot be written in TOML; the dict form is the only way to give it
    err = _cli_error(tmp_path, cfg, capsys)
    assert re.search(match, err), err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_run_dir(tmp_path, capsys, no_model_load):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cfg = _comfy_config(tmp_path)
    cfg["output"]["run_dir"] = str(locked / "run")
    try:
        assert "not writable" in _cli_error(tmp_path, cfg, capsys)
    finally:
        locked.chmod(0o700)


def test_run_dir_that_is_a_file(tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    cfg = _comfy_config(tmp_path)
    cfg["output"]["run_dir"] = str(tmp_path / "afile")
    assert "not writable" in _cli_error(tmp_path, cfg, capsys)


def test_resume_config_mismatch_before_model_load(tmp_path, capsys, no_model_load):
    import json

    from search.config import load_config

    cfg = _comfy_config(tmp_path)
    config = load_config(None, raw=cfg)
    os.makedirs(config.run_dir, exist_ok=True)
    with open(os.path.join(config.run_dir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    cfg["sampling"] = {"steps": 20}
    path = tmp_path / "changed.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    from search.cli import main

    with pytest.raises(SystemExit):
        main(["--config", str(path), "--resume", config.run_dir])
    err = capsys.readouterr().err
    assert "sampling.steps: run has 15, given 20" in err
    # A changed prompt file is a different run too.
    (tmp_path / "train.txt").write_text("other prompt\n")
    with pytest.raises(SystemExit):
        main(["--resume", config.run_dir])
    assert "prompt_hashes.train" in capsys.readouterr().err


def test_overrides_and_help(tmp_path, capsys):
    from search.cli import build_parser
    from search.config import SCHEMA, load_config, parse_override

    assert parse_override("search.scale_bounds=[0, 2]") == ("search.scale_bounds", [0, 2])
    assert parse_override("sampling.sampler=dpmpp_2m") == ("sampling.sampler", "dpmpp_2m")
    config = load_config(None, overrides={"search.popsize": 12, "sampling.steps": 8}, raw=_comfy_config(tmp_path))
    assert config.search["popsize"] == 12 and config.sampling["steps"] == 8
    text = build_parser().format_help()
    for section, keys in SCHEMA.items():
        for key in keys:
            assert f"    {key} = " in text, key
    for flag in ("--resume", "--generations", "--set", "--check", "--budget-hours"):
        assert flag in text


def test_check_flag_loads_nothing(tmp_path, capsys, no_model_load):
    """``--check`` judges the model file by its header without building an evaluator: these empty files are refused
    as what they are (``test_search_cli`` passes ``--check`` on a real model's header)."""
    import torch
    from safetensors.torch import save_file

    cfg = _comfy_config(tmp_path)
    save_file({"images": torch.zeros(1, 8, 8, 3)}, str(tmp_path / "target.safetensors"))
    cfg["rewards"] = [{"name": "target", "path": str(tmp_path / "target.safetensors")}]
    message = _cli_error(tmp_path, cfg, capsys, "--check")
    assert "model.diffusion_model file" in message and "is not a safetensors file" in message


def test_example_config_is_valid():
    import tomllib

    from search.config import validate

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search", "example_config.toml")
    with open(path, "rb") as f:
        config = validate(tomllib.load(f), os.path.dirname(path), check_files=False)
    assert config.model["family"] == "flux" and config.sampling["guidance"] == 3.5
