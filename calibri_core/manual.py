"""Calibrations built by hand: ``site = value`` lines (CalibriManual).

This is how the paper's motivation experiment (§3.1: bypass or scale one block and look) is reproduced,
and how a calibration is tuned by hand. The grammar, one statement per line::

    # comments start with '#', also after a statement
    single_blocks.10 = 0            # bypass one block (its gate is 0)
    single_blocks.20-25 = 1.1       # an inclusive range of block indices
    double_blocks.3-5.attn = 1.2    # a range, then the rest of the site name
    double_blocks.7 = 0.9           # a coarser name covers all its sites (here every gate of the block)
    weight = 1.3                    # the output weight ω (default 1)

Every site that no line names keeps the scale 1. A site named twice (also through overlapping ranges or a
block and one of its gates) is an error, as are names the model does not have (a range must lie inside the
model's blocks) and values outside [−10³, 10³] (``calibration.SCALE_LIMIT``, ``WEIGHT_LIMIT``) or non-finite.
This module is pure: no torch, no ComfyUI.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from .calibration import SCALE_LIMIT, WEIGHT_LIMIT, Calibration, Member
from .sites import GRANULARITIES, MAX_BLOCKS, SiteLayout

WEIGHT_KEY = "weight"
_INDEX_DIGITS = 18  # longer block indices are refused unread; shorter ones are checked against the model's blocks
_TARGET = re.compile(r"^(?P<container>[A-Za-z_]\w*)\.(?P<lo>\d+)(?:-(?P<hi>\d+))?(?P<rest>(?:\.[A-Za-z_]\w*)*)$")


@dataclass(frozen=True)
class Statement:
    """One parsed line: ``container.lo[-hi]rest = value``, or ``weight = value`` (container ``""``)."""

    number: int
    line: str
    container: str
    lo: int
    hi: int
    rest: str
    value: float

    @property
    def is_weight(self) -> bool:
        return self.container == ""

    def names(self) -> list[str]:
        return [f"{self.container}.{i}{self.rest}" for i in range(self.lo, self.hi + 1)]


def _where(number: int, line: str) -> str:
    return f"line {number} ({line.strip()!r})"


def parse_statements(text: str) -> list[Statement]:
    """Check the syntax of a manual calibration without a model (what the node's ``validate_inputs`` runs).

    Raises:
        ValueError: a malformed line, a reversed range, a non-finite value or a repeated ``weight``;
            the message quotes the line and its number.
    """
    if not isinstance(text, str):
        raise ValueError(f"Calibri: the manual calibration must be text; got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (e.g. "\ud800" sent through the API) cannot be saved
        number = text.count("\n", 0, e.start) + 1
        raise ValueError(f"Calibri: line {number} of the manual calibration holds {text[e.start]!r} at character "
                         f"{e.start}, which is not valid Unicode text (a lone surrogate); delete or retype "
                         f"it.") from None
    statements: list[Statement] = []
    weight_line: Statement | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.count("=") != 1:
            raise ValueError(f"Calibri: {_where(number, raw)} is not of the form `site = value` "
                             f"(e.g. `single_blocks.10 = 0` or `double_blocks.3-5 = 1.2`).")
        name, value_text = (part.strip() for part in line.split("="))
        try:
            value = float(value_text)
        except ValueError:
            raise ValueError(f"Calibri: {_where(number, raw)}: {value_text!r} is not a number.") from None
        if not math.isfinite(value):
            raise ValueError(f"Calibri: {_where(number, raw)}: the value must be a finite number, not {value_text}.")
        limit = WEIGHT_LIMIT if name == WEIGHT_KEY else SCALE_LIMIT
        if abs(value) > limit:
            raise ValueError(f"Calibri: {_where(number, raw)}: {value_text} is outside [-{limit:g}, {limit:g}], the "
                             f"range of a {'weight ω' if name == WEIGHT_KEY else 'scale'} (float16 models end at "
                             f"65504). Use a value in that range.")
        if name == WEIGHT_KEY:
            if weight_line is not None:
                raise ValueError(f"Calibri: {_where(number, raw)} sets the weight ω again; it was already set on "
                                 f"{_where(weight_line.number, weight_line.line)}.")
            weight_line = Statement(number, raw, "", 0, -1, "", value)
            statements.append(weight_line)
            continue
        m = _TARGET.match(name)
        if m is None:
            raise ValueError(f"Calibri: {_where(number, raw)}: {name!r} is not a site name. Write a block, "
                             f"optionally with a range and the rest of the site: `single_blocks.10`, "
                             f"`single_blocks.10-15`, `double_blocks.3-5.attn`, or `weight` for ω.")
        too_long = [d for d in (m["lo"], m["hi"]) if d is not None and len(d) > _INDEX_DIGITS]
        if too_long:  # int() of thousands of digits is slow or refused past 4300 digits
            raise ValueError(f"Calibri: {_where(number, raw)}: block index {too_long[0][:12]}... is not a block of "
                             f"any model (they have at most {MAX_BLOCKS}).")
        lo = int(m["lo"])
        hi = int(m["hi"]) if m["hi"] is not None else lo
        if hi < lo:
            raise ValueError(f"Calibri: {_where(number, raw)}: the range {lo}-{hi} is reversed; write {hi}-{lo}.")
        statements.append(Statement(number, raw, m["container"], lo, hi, m["rest"], value))
    return statements


def _span(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``0-2, 5``."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def _blocks(sites: tuple[str, ...]) -> dict[str, list[int]]:
    """Container → its block indices in model order: ``{"double_blocks": [0, 1], "single_blocks": [0, 1, 2]}``."""
    blocks: dict[str, list[int]] = {}
    for site in sites:
        container, index = site.split(".")[:2]
        indices = blocks.setdefault(container, [])
        if not indices or indices[-1] != int(index):
            indices.append(int(index))
    return blocks


def _unknown(statement: Statement, name: str, sites: tuple[str, ...], granularity: str) -> ValueError:
    blocks = _blocks(sites)
    where = _where(statement.number, statement.line)
    have = "; ".join(f"{c}.{_span(ix)}" for c, ix in blocks.items())
    if statement.container not in blocks:
        near = difflib.get_close_matches(statement.container, list(blocks), n=3)
        hint = f" Did you mean {' or '.join(near)}?" if near else ""
        return ValueError(f"Calibri: {where}: {name} does not exist; this model has {have}.{hint}")
    index = int(name.split(".")[1])
    if index not in blocks[statement.container]:
        return ValueError(f"Calibri: {where}: {name} does not exist; this model has "
                          f"{statement.container}.{_span(blocks[statement.container])}.")
    block = f"{statement.container}.{index}"
    in_block = [s for s in sites if s == block or s.startswith(block + ".")]
    near = difflib.get_close_matches(name, in_block, n=3, cutoff=0.5)
    finer = [g for g in GRANULARITIES[GRANULARITIES.index(granularity) + 1:]]
    hint = f" Did you mean {' or '.join(near)}?" if near else ""
    if finer:
        hint += f" Names finer than the {granularity} granularity need granularity {' or '.join(finer)}."
    return ValueError(f"Calibri: {where}: {name} is not a {granularity} site of this model; {block} has "
                      f"{', '.join(in_block)}.{hint}")


def parse_manual(text: str, layout: SiteLayout, granularity: str = "block") -> Calibration:
    """A one-member calibration from ``site = value`` lines (see the module docstring for the grammar).

    Args:
        text: the lines; blank lines and ``#`` comments are ignored.
        layout: the connected model's layout (``host.model_layout``); names are checked against it.
        granularity: ``block``, ``layer`` or ``gate`` (paper §3.2): which sites the calibration has.
            A name may also be coarser than the granularity (a block at gate granularity sets every gate
            of that block), never finer.

    Returns:
        a ``Calibration`` with one positive-prompt member: the given scales, 1 elsewhere, ω from
        ``weight = ...`` (default 1).

    Raises:
        ValueError: quoting the line and its number, for syntax errors, names the model lacks (with
            near-misses and the valid index range), non-finite values and sites set twice.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"Calibri: granularity {granularity!r} is not one of {GRANULARITIES}.")
    statements = parse_statements(text)
    sites = layout.site_names(granularity)
    column = {name: j for j, name in enumerate(sites)}
    scales = [1.0] * len(sites)
    set_by: dict[str, Statement] = {}
    weight = 1.0
    blocks = {container: set(indices) for container, indices in _blocks(sites).items()}
    covering: dict[str, list[str]] = {}  # every name a line may use → the sites it covers (a dict, not a scan per name)
    for site in sites:
        parts = site.split(".")
        for k in range(2, len(parts) + 1):
            covering.setdefault(".".join(parts[:k]), []).append(site)
    for statement in statements:
        if statement.is_weight:
            weight = statement.value
            continue
        indices = blocks.get(statement.container)
        if indices is None:
            raise _unknown(statement, f"{statement.container}.{statement.lo}{statement.rest}", sites, granularity)
        if statement.hi > statement.lo:  # a range is checked against the model's blocks before it is expanded
            missing = next((i for i in (statement.lo, max(indices) + 1) if i not in indices and
                            statement.lo <= i <= statement.hi), None)
            if missing is not None:  # blocks are numbered 0..n-1, so checking both ends covers the range
                raise _unknown(statement, f"{statement.container}.{missing}{statement.rest}", sites, granularity)
        for name in statement.names():
            covered = covering.get(name, ())
            if not covered:
                raise _unknown(statement, name, sites, granularity)
            for site in covered:
                earlier = set_by.get(site)
                if earlier is not None:
                    raise ValueError(f"Calibri: {_where(statement.number, statement.line)} sets {site} again; "
                                     f"{_where(earlier.number, earlier.line)} already set it. Each site may be "
                                     f"set once: split the range or drop one line.")
                set_by[site] = statement
                scales[column[site]] = statement.value
    return Calibration(layout.family, granularity, sites, (Member(tuple(scales), weight, "positive"),))
