"""The model-family seam: outside pipelines/, samplers/ and testing/, no code names a family's internals (the UNet,
SDXL), so a new family is files of its own. Comments and docstrings aside: this reads identifiers and the
string literals that are keys or kind names."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import diffrl

PACKAGE = Path(diffrl.__file__).parent
FAMILY_HOMES = {"pipelines", "samplers", "testing"}
LEGACY_NAMES = {("config/shared.py", '"compile_unet"')}
"""Old field names kept in the rename table, so that old run records still load and old files get an error naming
the new field (the SDXL fields moved into ``model_options``, which the family checks, are spelled in an f-string)."""
NAME = re.compile(r"unet|^sdxl", re.IGNORECASE)
KEY = re.compile(r"^(sdxl\w*|\w*unet\w*)$", re.IGNORECASE)


def offending_lines(source: str) -> list[tuple[int, str]]:
    """``(line, token)`` for each identifier naming a UNet or SDXL, and each string literal that is such a name."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and NAME.search(tok.string):
            found.append((tok.start[0], tok.string))
        elif tok.type == tokenize.STRING:
            try:
                value = eval(tok.string, {})  # a plain literal; f-strings are left alone
            except Exception:  # noqa: BLE001
                continue
            if isinstance(value, str) and KEY.match(value):
                found.append((tok.start[0], tok.string))
    return found


def test_the_scanner_finds_what_it_looks_for():
    assert [t for _, t in offending_lines('policy.unet.train()\nif kind == "sdxl": x = c.sdxl_target_size\n')] == \
        ["unet", '"sdxl"', "sdxl_target_size"]
    assert offending_lines('"""The UNet of SDXL."""\n# unet\nx = "a UNet call"\n') == []


def test_no_code_outside_the_family_homes_names_a_unet_or_sdxl():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0]
        if top in FAMILY_HOMES or top == "__init__.py":  # the public API lists every family's classes
            continue
        where = path.relative_to(PACKAGE).as_posix()
        hits += [f"{where}:{line}: {token}" for line, token in offending_lines(path.read_text())
                 if (where, token) not in LEGACY_NAMES]
    assert hits == [], "\n".join(hits)
