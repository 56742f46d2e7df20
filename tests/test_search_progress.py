"""What a search tells its user while and after it runs: log lines above the tqdm bars (never inside one), an ETA
when a wall-time budget ends the run, why the run stopped (log and summary.json), a resume of a finished run that
says it has nothing to do and leaves the outputs alone, and a validation grid readable at any image size.

Runs on the fake quadratic evaluator of test_search_loop (in-process, or the real CLI in a subprocess for the
console output)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_search_hostile import _files
from test_search_loop import raw_config, to_toml
from test_search_resume import REPO, _env

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")  # search.cli's "%(asctime)s %(message)s"


def _screen(text: str) -> list[str]:
    """The rows a terminal shows for ``text``: ``\\n`` starts the next row (the tty's onlcr), ``\\r`` returns to
    column 0, ``ESC[A`` moves up a row (tqdm's cursor moves between its bars) and other characters overwrite."""
    rows: list[list[str]] = [[]]
    r = c = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith("\x1b[A", i):
            r, i = max(0, r - 1), i + 3
            continue
        if ch == "\n":
            r, c = r + 1, 0
            while len(rows) <= r:
                rows.append([])
        elif ch == "\r":
            c = 0
        else:
            row = rows[r]
            row.extend(" " * (c + 1 - len(row)))
            row[c] = ch
            c += 1
        i += 1
    return ["".join(row).rstrip() for row in rows]


def test_log_lines_never_land_inside_a_bar(tmp_path):
    """``python -m search`` with its bars: every log line the terminal shows starts at column 0, with no bar text
    before or after it on its row."""
    cfg = raw_config(tmp_path, "bars", generations=4, val_every=1, popsize=4)
    cfg["model"]["options"] = {"sleep": 0.03}  # the bars redraw between log lines
    path = tmp_path / "bars.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "search", "--config", str(path)], cwd=REPO, env=_env(),
                          capture_output=True, timeout=240)  # bytes: text mode would turn tqdm's \r into \n
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err[-4000:]
    rows = _screen(err)
    logged = [row for row in rows if "Calibri: " in row]
    assert sum("validation at generation" in row for row in logged) == 4, rows
    assert any("generations:" in row for row in rows), "no bar was drawn: " + err[-2000:]
    mixed = [row for row in logged if not LOG_LINE.match(row) or "it/s" in row or "%|" in row or "gen/s" in row
             or "generations:" in row or "candidates:" in row]
    assert not mixed, "log lines inside a bar:\n" + "\n".join(map(repr, mixed))
    assert any("stopped: generations cap 4 reached" in row for row in logged), logged


def test_budget_eta_estimate():
    """The ETA counts whole generations of the mean time until the budget is passed, or the cap if sooner."""
    from search.loop import _budget_eta_s

    def config(hours, cap):
        return SimpleNamespace(search={"budget_hours": hours, "generations": cap})

    state = SimpleNamespace(generation=3, elapsed_s=30.0)  # 10 s per generation
    assert _budget_eta_s(config(100 / 3600, None), state) == pytest.approx(70.0)  # 7 more generations
    assert _budget_eta_s(config(95 / 3600, None), state) == pytest.approx(70.0)  # the 7th ends past the budget
    assert _budget_eta_s(config(100 / 3600, 5), state) == pytest.approx(20.0)  # the cap comes first
    assert _budget_eta_s(config(0.0, 5), state) is None  # no budget: tqdm's own ETA (total = the cap)
    assert _budget_eta_s(config(1.0, None), SimpleNamespace(generation=0, elapsed_s=0.0)) is None


def test_budget_run_bar_shows_an_eta(tmp_path, capsys):
    from search.loop import run_search

    cfg = raw_config(tmp_path, budget_hours=1.0, val_every=100)
    del cfg["search"]["generations"]
    run_search(cfg, progress=True, max_generations=3)
    err = capsys.readouterr().err
    etas = re.findall(r"generations: .*?eta=(\d+:\d\d(?::\d\d)?)", err)
    assert etas, err[-2000:]
    # About an hour of budget at a fraction of a second per generation.
    h, m, *s = (int(v) for v in etas[-1].split(":"))
    assert (h * 3600 + m * 60 + s[0] if s else h * 60 + m) > 3000, etas


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_stop_reasons_logged_and_in_summary(tmp_path, caplog):
    from search.loop import run_search

    runs = {}
    budget = raw_config(tmp_path, "budget", budget_hours=0.5 / 3600, val_every=100, popsize=4)
    del budget["search"]["generations"]
    budget["model"]["options"] = {"sleep": 0.05}  # 0.2 s per generation: the budget ends the run after 3
    runs["budget_hours"] = budget
    runs["generations"] = raw_config(tmp_path, "cap", generations=2)
    flat = raw_config(tmp_path, "flat", evaluator="python:test_search_loop:FlatEvaluator")
    del flat["search"]["generations"]
    runs["pycma"] = flat
    for stopped_by, cfg in runs.items():
        caplog.clear()
        with caplog.at_level("INFO", logger="calibri"):
            result = run_search(cfg)
        summary = _summary(tmp_path / os.path.basename(cfg["output"]["run_dir"]))
        assert result.stopped_by == summary["stopped_by"] == stopped_by, summary
        last = caplog.records[-1].getMessage()
        assert last.startswith(f"Calibri: stopped: {summary['stop_reason']}. Best preset: "), last
        if stopped_by == "budget_hours":
            assert 1 <= result.generations <= 3, result.generations
            assert summary["stop_reason"].startswith(f"budget of {0.5 / 3600:g} h reached after "
                                                     f"{result.generations} generation(s)"), summary
            assert summary["pycma_stop"] == {}  # pycma's own reasons only
        elif stopped_by == "generations":
            assert summary["stop_reason"] == "generations cap 2 reached"
        else:
            assert summary["pycma_stop"] and all(k in summary["stop_reason"] for k in summary["pycma_stop"])


def _stamped(run_dir) -> dict:
    """Bytes and modification time of every file of the run dir but run.lock (the resuming process's own)."""
    return {name: (data, os.stat(run_dir / name).st_mtime_ns) for name, data in _files(run_dir).items()}


def test_resume_of_a_finished_run_has_nothing_to_do(tmp_path, caplog, capsys):
    from search.cli import main
    from search.config import load_config
    from search.loop import run_search

    cfg = raw_config(tmp_path, generations=2, val_every=1, popsize=4)
    first = run_search(cfg)
    run_dir = tmp_path / "run"
    for name in os.listdir(run_dir):  # an old time, so any rewrite shows even within the clock's resolution
        os.utime(run_dir / name, ns=(1_000_000_000, 1_000_000_000))
    before = _stamped(run_dir)
    assert "grid_validation.png" in before and "plot_train.png" in before
    with caplog.at_level("INFO", logger="calibri"):
        again = run_search(load_config(None, raw=cfg), resume=True)
    assert "run already finished at generation 2" in caplog.text and "nothing to do" in caplog.text
    assert "--generations" in caplog.text  # how to search on
    assert again.nothing_to_do and again.generations == 2 and again.best_preset == first.best_preset
    assert again.best == first.best and again.stopped_by == "generations"
    assert _stamped(run_dir) == before
    # The command says so too, and still names the best preset.
    assert main(["--resume", str(run_dir), "--no-progress", "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert "run already finished at generation 2 (stopped by generations); nothing to do; outputs left as they " \
           "are" in out and f"best preset: {first.best_preset}" in out
    assert _stamped(run_dir) == before
    # A higher cap is work to do: the run continues, and its outputs follow.
    more = run_search(load_config(None, {"search.generations": 3}, raw=cfg), resume=True)
    assert not more.nothing_to_do and more.generations == 3 and _summary(run_dir)["generations"] == 3
    assert _stamped(run_dir)["calibri-best.safetensors"] != before["calibri-best.safetensors"]


def test_resume_rewrites_outputs_that_are_stale_or_missing(tmp_path):
    """A finished run continued past its cap keeps ``finished``; stopped again before its outputs were written, or
    with a preset deleted, a resume writes them instead of calling the old ones current."""
    from search.config import load_config
    from search.loop import run_search

    cfg = raw_config(tmp_path, generations=2, val_every=1, popsize=4)
    run_search(cfg)
    run_dir = tmp_path / "run"
    run_search(load_config(None, {"search.generations": 4}, raw=cfg), resume=True, max_generations=1)
    summary = _summary(run_dir)
    assert summary["generations"] == 3 and summary["stopped_by"] is None
    (run_dir / "summary.json").write_text(json.dumps({**summary, "generations": 2}))  # as a kill before it left
    result = run_search(load_config(None, {"search.generations": 3}, raw=cfg), resume=True)
    assert not result.nothing_to_do and _summary(run_dir)["generations"] == 3
    os.remove(run_dir / "calibri-best.safetensors")
    result = run_search(load_config(None, {"search.generations": 3}, raw=cfg), resume=True)
    assert not result.nothing_to_do and (run_dir / "calibri-best.safetensors").is_file()


def _dark_box(img, top: int, bottom: int) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of the non-white pixels in rows [top, bottom) of ``img``."""
    a = np.asarray(img.convert("L"))[top:bottom]
    ys, xs = np.nonzero(a < 200)
    return (int(xs.min()), int(ys.min()) + top, int(xs.max()), int(ys.max()) + top) if xs.size else None


def test_small_images_scaled_up_and_labels_fit(tmp_path):
    from PIL import Image

    from search import outputs

    rng = np.random.default_rng(0)
    checker = torch.tensor(rng.random((2, 32, 32, 3)), dtype=torch.float32)
    rows = {"baseline (identity)": checker * 0.5, "calibri-best (best-validation), a long label": checker}
    path = tmp_path / "grid.png"
    outputs.image_grid(str(path), rows)
    img = Image.open(path).convert("RGB")
    factor = 8  # 256 px cells from 32 px images, a whole factor
    cell = 32 * factor
    label = (img.height - 2 * cell) // 2
    assert img.height == 2 * (cell + label) and label >= 16
    assert img.width >= 2 * cell
    pixels = np.asarray(img)
    for r, images in enumerate(rows.values()):
        top = r * (cell + label) + label
        expected = (np.clip(images.numpy(), 0, 1) * 255).round().astype("uint8")
        for c in range(2):
            tile = pixels[top:top + cell, c * cell:(c + 1) * cell]
            # Nearest neighbour: every source pixel is a sharp 8×8 square of its own colour.
            assert (tile == np.repeat(np.repeat(expected[c], factor, 0), factor, 1)).all(), (r, c)
        text = _dark_box(img, top - label, top)
        assert text is not None, f"row {r} has no label"
        x0, y0, x1, y1 = text
        assert x0 > 0 and x1 < img.width - 2 and y0 > top - label and y1 < top - 1, (r, text, img.size)
    # A label longer than its row of images widens the grid instead of being cut off.
    outputs.image_grid(str(path), {"a label much longer than one small image is wide": checker[:1]})
    img = Image.open(path).convert("RGB")
    x0, _, x1, _ = _dark_box(img, 0, img.height - cell)
    assert img.width > cell and x1 < img.width - 2


def test_run_grid_cells_are_readable(tmp_path):
    """The fake evaluator's 8×8 images come out of a run as 256 px cells."""
    from PIL import Image

    from search.loop import run_search

    run_search(raw_config(tmp_path, generations=1, val_every=1))
    img = Image.open(tmp_path / "run" / "grid_validation.png")
    assert img.width >= 2 * 256 and img.height >= 2 * 256, img.size  # grid_prompts = 2, two rows
