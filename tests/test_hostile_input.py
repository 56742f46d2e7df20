"""Hostile and careless input, in-process and through the preset CLI (issue 10): every case is refused with a
message naming the problem, nothing proportional to a hostile number is built first, and nothing is lost.

Memory-bomb cases run in a subprocess under an address-space limit (``RLIMIT_AS``) and a timeout, so a regression
fails the test instead of the machine. Node cases call the V3 nodes directly; tests/test_hostile_server.py sends the
same files and texts through a real server's /prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import textwrap

import hostile_files as hf
import pytest

from calibri_core.calibration import SCALE_LIMIT, WEIGHT_LIMIT, Calibration, Member
from calibri_core.families import get_family
from calibri_core.manual import parse_manual, parse_statements
from calibri_core.preset import Preset, load_preset, save_preset
from calibri_core.sites import MAX_BLOCKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = {"double_blocks": 2, "single_blocks": 3}
SD3 = {"joint_blocks": 4, "dual_attention_blocks": [0, 1], "context_pre_only_blocks": [3], "scale_mod_only": False}
BOMB_LIMIT = 1 << 30   # bytes of address space: a bare interpreter with calibri_core imported peaks at ~150 MB
BOMB_TIMEOUT = 60


def flux_layout(counts=COUNTS):
    return get_family("flux").layout(counts)


def good_preset(family="flux", counts=COUNTS, granularity="block", core=None) -> Preset:
    """A valid identity preset; ``core`` is the pack's own ``calibri_core`` for node tests (its classes differ)."""
    preset = core.preset if core else sys.modules["calibri_core.preset"]
    calibration = core.calibration if core else sys.modules["calibri_core.calibration"]
    layout = preset.get_family(family).layout(counts)
    return preset.Preset(calibration.Calibration.identity(layout, granularity), dict(counts), {"source": "test"})


def limit_memory() -> None:  # preexec_fn: runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (BOMB_LIMIT, BOMB_LIMIT))


def bounded(code: str) -> str:
    """Run ``code`` (which prints its result) in a fresh interpreter limited to BOMB_LIMIT bytes and BOMB_TIMEOUT
    seconds; return its stdout. A MemoryError, a traceback or a hang fails the test."""
    try:
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                             timeout=BOMB_TIMEOUT, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {BOMB_TIMEOUT} s: the input was expanded before it was checked")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    return run.stdout


def refusal(code: str) -> str:
    out = bounded("try:\n" + textwrap.indent(textwrap.dedent(code), "    ") +
                  "\n    print('ACCEPTED')\nexcept ValueError as e:\n    print('REFUSED', e)\n")
    assert out.startswith("REFUSED Calibri:"), out
    return out


# ---------------------------------------------------------------- bounded before built

def outcomes(setup: str, calls: dict) -> dict:
    """Evaluate each expression of ``calls`` (id → Python expression) after ``setup`` in one bounded subprocess;
    return id → the ValueError's message, "ACCEPTED", or the type and message of any other exception (a case then
    fails alone). Cases that would expand a hostile number on a regression run here, never in the test process."""
    out = bounded(setup + f"""
import json
results = {{}}
for key, expression in {calls!r}.items():
    try:
        eval(expression)
        results[key] = "ACCEPTED"
    except ValueError as e:
        results[key] = str(e)
    except Exception as e:  # MemoryError under the limit, RecursionError, ...: the regression this suite catches
        results[key] = f"{{type(e).__name__}}: {{e}}"[:2000]
print(json.dumps(results))
""")
    return json.loads(out)


COUNT_CASES = {
    "1e9": ('{"double_blocks": 10 ** 9, "single_blocks": 3}', r"'double_blocks' = 1000000000 is outside 0\.\.1024"),
    "5000-digits": ('{"double_blocks": 2, "single_blocks": 10 ** 5000}',
                    r"an integer of about 500\d digits is outside"),
    "negative": ('{"double_blocks": -1, "single_blocks": 3}', r"outside 0\.\.1024"),
    "float": ('{"double_blocks": 2.0, "single_blocks": 3}', r"must be an integer"),
    "string": ('{"double_blocks": "2", "single_blocks": 3}', r"must be an integer"),
    "repeated": ('{"double_blocks": 2, "single_blocks": 3, "x": [0, 0]}', r"lists a block twice"),
    "index-too-big": ('{"double_blocks": 2, "single_blocks": 3, "x": [3]}', r"holds 3, not a block index in 0\.\.2"),
    "index-bool": ('{"double_blocks": 2, "single_blocks": 3, "x": [True]}', r"not a block index"),
    "empty": ("{}", r"1 to 16 keys"),
}


@pytest.fixture(scope="module")
def count_outcomes() -> dict:
    return outcomes("from calibri_core.families import get_family\n",
                    {k: f'get_family("flux").layout({counts})' for k, (counts, _) in COUNT_CASES.items()})


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_counts_are_bounded_before_the_layout_is_built(count_outcomes, case):
    assert re.search(COUNT_CASES[case][1], count_outcomes[case]), count_outcomes[case]


def test_a_billion_blocks_is_refused_without_building_them():
    out = refusal("""
        from calibri_core.families import get_family
        get_family("sd3").layout({"joint_blocks": 10 ** 9, "dual_attention_blocks": [], "context_pre_only_blocks": [],
                                  "scale_mod_only": False})
    """)
    assert "outside 0..1024" in out


def test_a_200000_entry_block_list_is_refused_quickly():
    out = refusal("""
        from calibri_core.families import get_family
        get_family("sd3").layout({"joint_blocks": 200000, "dual_attention_blocks": list(range(200000)),
                                  "context_pre_only_blocks": [], "scale_mod_only": False})
    """)
    assert "outside 0..1024" in out
    out = refusal("""
        from calibri_core.families import get_family
        get_family("sd3").layout({"joint_blocks": 1024, "dual_attention_blocks": list(range(200000)),
                                  "context_pre_only_blocks": [], "scale_mod_only": False})
    """)
    assert "lists 200000 blocks, more than the 1024" in out


def test_the_largest_allowed_counts_build_quickly():
    counts = {"joint_blocks": MAX_BLOCKS, "dual_attention_blocks": list(range(MAX_BLOCKS)),
              "context_pre_only_blocks": [MAX_BLOCKS - 1], "scale_mod_only": False}
    assert len(get_family("sd3").layout(counts).site_names("block")) == MAX_BLOCKS


def test_a_manual_range_of_a_billion_blocks_names_the_real_range():
    out = refusal("""
        from calibri_core.families import get_family
        from calibri_core.manual import parse_manual
        layout = get_family("sd3").layout({"joint_blocks": 4, "dual_attention_blocks": [0, 1],
                                           "context_pre_only_blocks": [3], "scale_mod_only": False})
        parse_manual("joint_blocks.0-999999999 = 1", layout, "gate")
    """)
    assert "joint_blocks.4 does not exist; this model has joint_blocks.0-3" in out


MANUAL_RANGES = {
    "beyond-the-end": ("single_blocks.2-999999999999 = 1", r"single_blocks\.3 does not exist; this model has "
                                                          r"single_blocks\.0-2"),
    "past-the-end": ("single_blocks.7-9 = 1", r"single_blocks\.7 does not exist; this model has single_blocks\.0-2"),
    "5000-digits": ("single_blocks.0-" + "9" * 5000 + " = 1", r"block index 999999999999\.\.\. is not a block"),
    "unknown-container": ("joint_blocks.0-99999999 = 1", r"joint_blocks\.0 does not exist.*Did you mean"),
}


@pytest.fixture(scope="module")
def manual_outcomes() -> dict:
    setup = ("from calibri_core.families import get_family\nfrom calibri_core.manual import parse_manual\n"
             f"layout = get_family('flux').layout({COUNTS!r})\n")
    return outcomes(setup, {k: f"parse_manual({text!r}, layout)" for k, (text, _) in MANUAL_RANGES.items()})


@pytest.mark.parametrize("case", list(MANUAL_RANGES))
def test_manual_ranges_are_checked_against_the_model(manual_outcomes, case):
    assert re.search(MANUAL_RANGES[case][1], manual_outcomes[case], re.DOTALL), manual_outcomes[case]


def test_a_manual_range_inside_the_model_still_works():
    cal = parse_manual("single_blocks.0-2 = 0.5\ndouble_blocks.1 = 2", flux_layout())
    assert cal.scales_by_site() == {"double_blocks.0": 1.0, "double_blocks.1": 2.0, "single_blocks.0": 0.5,
                                    "single_blocks.1": 0.5, "single_blocks.2": 0.5}


# ---------------------------------------------------------------- a finite, representable range

@pytest.mark.parametrize("text, expect", [
    ("single_blocks.1 = 1e308", r"line 1 .*1e308 is outside \[-1000, 1000\].*scale"),
    ("single_blocks.1 = -1000.5", r"-1000\.5 is outside"),
    ("weight = 1e308", r"1e308 is outside \[-1000, 1000\].*weight ω"),
    ("single_blocks.1 = 1" + "0" * 400, r"finite number"),  # float() of 10^400 is inf
])
def test_manual_values_outside_the_range_are_refused_at_submission(text, expect):
    with pytest.raises(ValueError, match=expect):
        parse_statements(text)


def test_the_range_limits_themselves_are_accepted():
    cal = parse_manual(f"single_blocks.1 = {-SCALE_LIMIT}\nweight = {WEIGHT_LIMIT}", flux_layout())
    assert cal.members[0].weight == WEIGHT_LIMIT and cal.scales_by_site()["single_blocks.1"] == -SCALE_LIMIT


@pytest.mark.parametrize("scale, weight, expect", [
    (1e300, 1.0, r"member 0's scale at double_blocks\.0 is 1e\+300, outside \[-1000, 1000\]"),
    (1.0, -1e4, r"member 0's output weight ω is -10000, outside"),
])
def test_calibrations_outside_the_range_are_refused_with_the_site(scale, weight, expect):
    layout = flux_layout()
    sites = layout.site_names("block")
    with pytest.raises(ValueError, match=expect):
        Calibration("flux", "block", sites, (Member((scale,) + (1.0,) * (len(sites) - 1), weight),))


@pytest.mark.parametrize("strength, expect", [
    (float("nan"), r"strength must be a finite number; got nan"),
    (float("inf"), r"strength must be a finite number"),
    (5.0, r"scale at double_blocks\.0 with strength 5\.0 is 1496, outside"),
])
def test_strength_keeps_every_value_in_range(strength, expect):
    layout = flux_layout()
    sites = layout.site_names("block")
    cal = Calibration("flux", "block", sites, (Member((300.0,) + (1.0,) * (len(sites) - 1)),))
    with pytest.raises(ValueError, match=expect):
        cal.check_strength(strength)
    cal.check_strength(2.0)  # 1 + 2·299 = 599: in range


# ---------------------------------------------------------------- hostile preset files

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "good.safetensors"
    save_preset(path, good_preset("sd3", SD3, "gate"))
    return hf.read_preset(path)


@pytest.fixture(scope="module")
def refusals(base, tmp_path_factory) -> dict:
    """Every hostile file loaded in one bounded subprocess: case id → the refusal's message (or what happened)."""
    folder = tmp_path_factory.mktemp("hostile")
    paths = {}
    for case, make, _ in hf.CASES:
        paths[case] = str(folder / f"hostile-{case}.safetensors")
        with open(paths[case], "wb") as f:
            f.write(make(*base))
    found = outcomes("from calibri_core.preset import load_preset\n",
                     {case: f"load_preset({path!r})" for case, path in paths.items()})
    return {case: (paths[case], message) for case, message in found.items()}


@pytest.mark.parametrize("case, expect", [(c[0], c[2]) for c in hf.CASES], ids=[c[0] for c in hf.CASES])
def test_hostile_preset_files_are_refused_naming_the_file(refusals, case, expect):
    path, message = refusals[case]
    assert message.startswith("Calibri: preset ") and path in message, message
    assert re.search(expect, message, re.IGNORECASE | re.DOTALL), message


def test_the_unchanged_base_file_loads(tmp_path, base):
    path = tmp_path / "good.safetensors"
    path.write_bytes(hf.preset_bytes({"calibri": json.dumps(base[0])}, base[1]))
    assert load_preset(path).counts == SD3


def test_a_lone_surrogate_is_a_clear_error_before_saving(tmp_path):
    with pytest.raises(ValueError, match=r"line 2 of the manual calibration holds '\\ud800'.*lone surrogate"):
        parse_statements("single_blocks.1 = 0\n# note \ud800\n")
    cal = Calibration.identity(flux_layout())
    with pytest.raises(ValueError, match=r"provenance holds '\\udc80'.*lone surrogate"):
        Preset(cal, dict(COUNTS), {"manual": "x\udc80"})
    assert not list(tmp_path.iterdir())


CHECKPOINTS = {  # hostile reference checkpoints (cmaes_step_NNNN.json): id → (file text, expected refusal)
    "nested-50000": ('{"solution": ' + "[" * 50000 + "]" * 50000 + "}", r"nests deeper than Python can read"),
    "int-5000-digits": ('{"solution": [1], "step": ' + "7" * 5000 + "}", r"an integer of 5000 digits"),
    "members-1e20": (json.dumps({"solution": [1.0] * 58, "shapes": {"n_models": 10 ** 20}}),
                     r"N = 100000000000000000000 members must have 5800000000000000000000 entries"),
    "scale-1e300": (json.dumps({"solution": [1e300] * 58}), r"is 1e\+300, outside \[-1000, 1000\]"),
    "not-utf8": ("\udcff", r"cannot read .* as JSON"),
    "not-json": ("{solution: [1, 2", r"cannot read .* as JSON"),
}


@pytest.fixture(scope="module")
def checkpoint_outcomes(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for case, (text, _) in CHECKPOINTS.items():
        paths[case] = folder / f"cmaes_step_{len(paths):04d}.json"
        paths[case].write_bytes(text.encode("utf-8", "surrogateescape"))
    return outcomes("from calibri_core.layouts import import_reference_checkpoint\n",
                    {case: f"import_reference_checkpoint({str(path)!r}, 'flux', 'block')"
                     for case, path in paths.items()})


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_hostile_reference_checkpoints_are_refused(checkpoint_outcomes, case):
    message = checkpoint_outcomes[case]
    assert message.startswith("Calibri:") and re.search(CHECKPOINTS[case][1], message), message


# ---------------------------------------------------------------- nothing lost: names and overwrite

def test_overwrite_must_be_a_real_boolean(tmp_path):
    path = tmp_path / "p.safetensors"
    save_preset(path, good_preset())
    before = path.read_bytes()
    for value in ("false", "False", 0, None):
        with pytest.raises(ValueError, match="overwrite must be True or False"):
            save_preset(path, good_preset(counts={"double_blocks": 1, "single_blocks": 1}), overwrite=value)
    assert path.read_bytes() == before


def test_a_legal_long_name_saves_and_a_too_long_one_is_refused_clearly(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    legal = tmp_path / ("a" * (limit - len(".safetensors")) + ".safetensors")  # exactly the limit
    save_preset(legal, good_preset())
    assert load_preset(legal).counts == COUNTS
    assert sorted(p.name for p in tmp_path.iterdir()) == [legal.name]  # no temporary file left
    for name in ("b" * 235 + ".safetensors", "c" * limit + ".safetensors"):
        path = tmp_path / name
        if len(name) <= limit:
            save_preset(path, good_preset())
            assert path.is_file()
        else:
            with pytest.raises(ValueError, match=rf"is {len(name)} bytes long; this file system takes at most {limit}"):
                save_preset(path, good_preset())


# ---------------------------------------------------------------- the preset CLI

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibri_core.preset", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=BOMB_TIMEOUT, preexec_fn=limit_memory)


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_refused(run: subprocess.CompletedProcess, *expect: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr and run.stdout == "", run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m calibri_core.preset"), run.stderr
    for text in expect:
        assert text in lines[0], lines[0]
    return lines[0]


def test_export_json_never_writes_onto_its_input_or_an_existing_file(tmp_path):
    preset = tmp_path / "p.safetensors"
    save_preset(preset, good_preset())
    other = tmp_path / "other.json"
    other.write_text("keep me\n")
    before = {p: digest(p) for p in (preset, other)}
    assert_refused(cli("export-json", str(preset), "-o", str(preset)), str(preset), "input file itself")
    assert_refused(cli("export-json", str(preset), "-o", str(preset), "--overwrite"), "input file itself")
    link = tmp_path / "link.safetensors"
    link.symlink_to(preset)
    assert_refused(cli("export-json", str(preset), "-o", str(link), "--overwrite"), "input file itself")
    assert_refused(cli("export-json", str(preset), "-o", str(other)), str(other), "already exists", "--overwrite")
    assert {p: digest(p) for p in (preset, other)} == before
    assert cli("export-json", str(preset), "-o", str(other), "--overwrite").returncode == 0
    assert json.loads(other.read_text())["counts"] == COUNTS and digest(preset) == before[preset]


def test_import_never_overwrites_without_the_flag_nor_its_own_input(tmp_path):
    from calibri_core.layouts import reference_vector_length

    ref = tmp_path / "cmaes_step_0001.json"
    ref.write_text(json.dumps({"solution": [1.0] * reference_vector_length("flux", "block", 1)}))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"user's file")
    before = digest(ref), digest(out)
    common = ("--pipeline", "flux", "--granularity", "block")
    assert_refused(cli("import", str(ref), *common, "-o", str(out)), str(out), "already exists")
    assert_refused(cli("import", str(ref), *common, "-o", str(ref), "--overwrite"), "input file itself")
    assert (digest(ref), digest(out)) == before
    assert cli("import", str(ref), *common, "-o", str(out), "--overwrite").returncode == 0
    assert load_preset(out).calibration.family == "flux"


def test_every_cli_refusal_is_one_line_naming_the_file(tmp_path, base):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(dict((c[0], c[1]) for c in hf.CASES)["nested-50000"](*base))
    assert_refused(cli("inspect", str(bad)), str(bad), "nests deeper")
    bad.write_bytes(dict((c[0], c[1]) for c in hf.CASES)["int-5000-digits"](*base))
    assert_refused(cli("export-json", str(bad)), str(bad), "5000 digits")
    assert_refused(cli("inspect", str(tmp_path / "missing.safetensors")), "missing.safetensors", "does not exist")
    assert_refused(cli("inspect"), "the following arguments are required: file", "-h")
    assert_refused(cli("inspect", str(tmp_path)), str(tmp_path), "is a folder")
    assert_refused(cli("frobnicate"), "invalid choice")
    good = tmp_path / "good.safetensors"
    save_preset(good, good_preset())
    long_name = str(tmp_path / ("x" * 300 + ".json"))
    assert_refused(cli("export-json", str(good), "-o", long_name), "305 bytes long", "at most")
    ref = tmp_path / "cmaes_step_0002.json"
    ref.write_bytes(b"\xff\xfe not utf-8")
    assert_refused(cli("import", str(ref), "--pipeline", "flux", "--granularity", "block", "-o",
                       str(tmp_path / "n.safetensors")), str(ref))
    ref.write_text(json.dumps({"solution": [1e300] * 58}))
    assert_refused(cli("import", str(ref), "--pipeline", "flux", "--granularity", "block", "-o",
                       str(tmp_path / "n.safetensors")), "outside [-1000, 1000]")
    assert not (tmp_path / "n.safetensors").exists()


# ---------------------------------------------------------------- node inputs (V3 nodes called directly)

@pytest.fixture(scope="module")
def pack():
    from calibri_core import comfy_env

    return comfy_env.import_pack()


@pytest.fixture(scope="module")
def pack_nodes(pack):
    return pack.nodes


def test_apply_strength_nan_is_refused_at_submission(pack_nodes):
    apply = pack_nodes.CalibriApply
    for strength in (float("nan"), float("inf"), -3.0, 5.5, "1"):
        message = apply.validate_inputs(start_percent=0.0, end_percent=1.0, strength=strength)
        assert isinstance(message, str) and "strength" in message, (strength, message)
    assert apply.validate_inputs(start_percent=0.0, end_percent=1.0, strength=1.5) is True


def test_save_node_refuses_a_non_boolean_overwrite(pack, pack_nodes, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibri", ([str(tmp_path)], {".safetensors"}))
    save = pack_nodes.CalibriSavePreset
    save.execute(calibration=good_preset(core=pack.calibri_core), filename="mine", overwrite=False)
    path = tmp_path / "mine.safetensors"
    before = digest(path)
    other = good_preset(counts={"double_blocks": 1, "single_blocks": 1}, core=pack.calibri_core)
    for value in ("false", "true", 1, None):
        with pytest.raises(ValueError, match="overwrite must be true or false"):
            save.execute(calibration=other, filename="mine", overwrite=value)
    assert digest(path) == before
    message = save.validate_inputs(filename="n" * 300)
    assert isinstance(message, str) and "bytes long" in message, message
    assert save.validate_inputs(filename="n" * 235) is True
    save.execute(calibration=good_preset(core=pack.calibri_core), filename="n" * 235, overwrite=False)
    assert (tmp_path / ("n" * 235 + ".safetensors")).is_file()
    for name in ("../escape", "a/b", "..", ".hidden", "x\x00y"):
        assert isinstance(save.validate_inputs(filename=name), str), name


def test_boolean_guard_marks_every_non_boolean_of_a_calibri_node(pack_nodes, monkeypatch):
    import nodes as comfy_nodes  # ComfyUI's nodes.py: the host is first on sys.path

    booleans = sys.modules[pack_nodes.__name__ + ".booleans"]
    monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, "CalibriSavePreset", pack_nodes.CalibriSavePreset)
    monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, "CalibriEnsembleGuider", pack_nodes.CalibriEnsembleGuider)
    prompt = {"1": {"class_type": "CalibriSavePreset", "inputs": {"filename": "x", "overwrite": "false",
                                                                  "calibration": ["2", 0]}},
              "2": {"class_type": "CalibriEnsembleGuider", "inputs": {"low_vram": {"__value__": 0}}},
              "3": {"class_type": "CalibriSavePreset", "inputs": {"overwrite": True}},
              "4": {"class_type": "CalibriSavePreset", "inputs": {"overwrite": ["5", 0]}},
              "5": {"class_type": "SomebodyElsesNode", "inputs": {"overwrite": "false"}}}
    booleans.refuse_non_booleans({"prompt": prompt})
    for node, name, shown in (("1", "overwrite", '"false"'), ("2", "low_vram", "0")):
        value = prompt[node]["inputs"][name]
        assert value == shown and json.loads(json.dumps(value)) == shown  # ComfyUI can still report it as JSON
        with pytest.raises(ValueError, match=rf"'{name}' must be JSON true or false; got {shown}"):
            bool(value)
    assert prompt["3"]["inputs"]["overwrite"] is True and prompt["4"]["inputs"]["overwrite"] == ["5", 0]
    assert prompt["5"]["inputs"]["overwrite"] == "false"  # other packs' nodes are left alone
