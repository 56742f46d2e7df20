"""The command line of Calibri preset files: ``python -m calibri_core.preset inspect | export-json | import``.

It sits above the modules it drives: ``calibri_core.layouts`` (the reference's flat vectors) imports
``calibri_core.preset`` (the format), this module imports both, and neither imports it; ``preset.py`` only hands
``python -m calibri_core.preset`` over to :func:`main` in its ``__main__`` block.

    python -m calibri_core.preset inspect FILE
    python -m calibri_core.preset export-json FILE [-o OUT.json [--overwrite]]
    python -m calibri_core.preset import cmaes_step_0200.json --pipeline flux --granularity block -o OUT.safetensors

Every refusal is one line on stderr naming the file, the problem and the fix, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn, Sequence

from .families import get_family
from .files import check_name_length, write_bytes_atomic
from .layouts import PIPELINES, import_reference_checkpoint
from .preset import FORMAT_VERSION, Preset, load_preset, preset_to_json, save_preset
from .sites import GRANULARITIES


def _table(preset: Preset) -> str:
    cal = preset.calibration
    width = max(len(s) for s in (*cal.sites, "prompt"))
    head = " ".join(f"{f'member {i + 1}':>12}" for i in range(len(cal.members)))
    lines = [f"{'site':<{width}} {head}"]
    for j, site in enumerate(cal.sites):
        lines.append(f"{site:<{width}} " + " ".join(f"{m.scales[j]:>12.6g}" for m in cal.members))
    lines.append(f"{'ω':<{width}} " + " ".join(f"{m.weight:>12.6g}" for m in cal.members))
    lines.append(f"{'prompt':<{width}} " + " ".join(f"{m.prompt:>12}" for m in cal.members))
    return "\n".join(lines)


def _inspect_text(path: str, preset: Preset) -> str:
    cal = preset.calibration
    return "\n".join([
        f"file:           {path}",
        f"format_version: {FORMAT_VERSION}",
        f"family:         {cal.family} ({get_family(cal.family).title})",
        f"counts:         {json.dumps(preset.counts)}",
        f"granularity:    {cal.granularity} ({len(cal.sites)} sites)",
        f"members:        {len(cal.members)}",
        "provenance:     " + json.dumps(preset.provenance, indent=2, ensure_ascii=False).replace("\n", "\n  "),
        "",
        _table(preset),
        "",
    ])


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other refusal of this command (issue 10)."""

    def error(self, message: str):  # type: ignore[override]
        _refuse(self.prog, f"{message} (see {self.prog} -h)")


def _refuse(prog: str, message: str) -> NoReturn:
    """One line on stderr naming the file, the problem and the fix; exit status 2."""
    line = " ".join(message.removeprefix("Calibri: ").split())
    sys.stderr.write(f"{prog}: error: {line}\n")
    sys.exit(2)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_output(output: str, source: str, overwrite: bool) -> None:
    """Refuse to write ``output`` onto its own input, or onto an existing file without --overwrite."""
    if _same_file(output, source):
        raise ValueError(f"Calibri: the output {output!r} is the input file itself; writing it would replace "
                         f"{source!r}. Give another -o/--output.")
    if os.path.lexists(output) and not overwrite:
        raise ValueError(f"Calibri: {output!r} already exists; not overwriting it. Choose another -o/--output, or "
                         f"add --overwrite to replace it.")
    if os.path.isdir(output):
        raise ValueError(f"Calibri: the output {output!r} is a folder; give a file name.")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m calibri_core.preset`` command line; returns the exit status (2 for every refusal)."""
    parser = _Parser(prog="python -m calibri_core.preset",
                     description="Inspect, export and import Calibri preset files. Nothing is overwritten without "
                                 "--overwrite, and no command writes onto its own input.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a preset's metadata and its scales per site and member")
    p.add_argument("file")
    p = sub.add_parser("export-json", help="write all of a preset's content as JSON")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="JSON file to write (default: standard output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p = sub.add_parser("import", help="convert a reference cmaes_step_NNNN.json checkpoint to a preset")
    p.add_argument("reference", help="the reference's cmaes_step_NNNN.json")
    p.add_argument("--pipeline", required=True, choices=sorted(PIPELINES))
    p.add_argument("--granularity", required=True, choices=GRANULARITIES,
                   help="the reference's scaling granularity (sd3.5/qwen-image: gate only)")
    p.add_argument("-o", "--output", required=True, help="preset to write (.safetensors)")
    p.add_argument("--members", type=int, help="ensemble size N (default: from the checkpoint / its length)")
    p.add_argument("--prompts", help="comma-separated prompt per member, e.g. positive,negative")
    p.add_argument("--model-name", help="model name recorded in the provenance")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)

    try:
        if args.command == "import":
            if args.members is not None and args.members < 1:
                parser.error(f"--members must be at least 1; got {args.members}.")
            if not os.path.isfile(args.reference):
                parser.error(f"reference checkpoint {args.reference!r} does not exist.")
            _check_output(args.output, args.reference, args.overwrite)
            prompts = [s.strip() for s in args.prompts.split(",")] if args.prompts else None
            preset = import_reference_checkpoint(args.reference, args.pipeline, args.granularity, args.members,
                                                 prompts=prompts, model_name=args.model_name)
            save_preset(args.output, preset, overwrite=args.overwrite)
            cal = preset.calibration
            sys.stdout.write(f"wrote {args.output}: {cal.family} {cal.granularity}, {len(cal.sites)} sites, "
                             f"{len(cal.members)} member(s)\n")
            return 0
        if not os.path.isfile(args.file):
            parser.error(f"preset file {args.file!r} " + ("is a folder, not a file." if os.path.isdir(args.file)
                                                          else "does not exist."))
        if args.command == "export-json" and args.output:
            _check_output(args.output, args.file, args.overwrite)
            check_name_length(args.output)
        preset = load_preset(args.file)
        if args.command == "inspect":
            sys.stdout.write(_inspect_text(args.file, preset))
        else:
            text = json.dumps(preset_to_json(preset), indent=2, ensure_ascii=False) + "\n"
            if args.output:
                write_bytes_atomic(args.output, text.encode("utf-8"))
            else:
                sys.stdout.write(text)
        return 0
    except ValueError as e:
        _refuse(parser.prog, str(e))
    except OSError as e:  # permissions, a full disk, a name the file system refuses
        where = f" {e.filename!r}" if e.filename else ""
        _refuse(parser.prog, f"cannot read or write{where}: {e.strerror or e}. Check the path and its permissions.")
