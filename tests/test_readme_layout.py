"""The README's Layout section names every module and package, and every path it names exists.

So the tables cannot go stale in either direction (as diffusers' utils/check_repo.py keeps its docs and its
modules in step). The section is the text between "## Layout" and the next "## " heading; only its table rows are
read (a table is a run of lines starting with "|": a header row, the "| --- |" row, then the rows).

What a row names, reading its cells left to right, in backticks:
- a path from the repository root: a token without spaces whose first folder is one of `ROOTED` (`ldm/serve`,
  `autoencoder/`, `ldm/generation/request.py`). It must exist. A folder path is that folder, a file path's folder
  is its parent, and either becomes the row's current folder.
- a bare module name: a token ending in ".py" with no "/" (`checks.py`). It is relative to the row's current
  folder, i.e. the folder of the last path before it in the same row, so "`ldm/generation/request.py`,
  `checks.py`" and "| `ldm/serve` | the app (`app.py`) |" both resolve. A row whose bare names come before any path
  takes its folder from a path in the table's header ("| module of `ldm/training` | ... |"); with neither, the
  test fails rather than guess.
Anything else in backticks (`AutoencoderKL`, `metadata.jsonl`, `vae/` inside a model folder) is not a path.

Required: every package of ldm/, autoencoder/ and conditioning/ as a folder path (`ldm/serve`, `ldm/`), and every
module file other than __init__.py (a package's __init__ is covered by naming the package; naming it too is fine).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from tests.test_import_graph import DIFFUSION_THIRD_PARTY

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "autoencoder", "conditioning")
ROOTED = ("ldm", "autoencoder", "conditioning", "configs", "benchmarks", "docs", "tests")

CELL_SPLIT = re.compile(r"(?<!\\)\|")  # "\|" inside a cell is a literal bar
TOKEN = re.compile(r"`([^`]+)`")
PATH = re.compile(r"[\w.-]+(/[\w.-]+)*/?")


def layout_section(readme: str) -> str:
    lines = readme.splitlines()
    start = lines.index("## Layout") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def tables(section: str) -> list[list[str]]:
    """The section's tables, each as its lines (header, separator, rows)."""
    found: list[list[str]] = []
    previous_was_row = False
    for line in section.splitlines():
        is_row = line.startswith("|")
        if is_row and not previous_was_row:
            found.append([])
        if is_row:
            found[-1].append(line)
        previous_was_row = is_row
    return found


def _rooted(token: str) -> bool:
    return bool(PATH.fullmatch(token)) and "/" in token and token.split("/")[0] in ROOTED


def _bare_module(token: str) -> bool:
    return bool(PATH.fullmatch(token)) and "/" not in token and token.endswith(".py")


def _folder_of(path: PurePosixPath, root: Path) -> PurePosixPath:
    return path if (root / path).is_dir() or not path.suffix else path.parent


def _tokens(line: str) -> list[str]:
    return [token for cell in CELL_SPLIT.split(line) for token in TOKEN.findall(cell)]


def named_paths(section: str, root: Path) -> tuple[dict[PurePosixPath, str], list[str]]:
    """Every path the section's tables name (-> the row naming it first), and the names that resolve to no folder."""
    named: dict[PurePosixPath, str] = {}
    unresolved: list[str] = []
    for table in tables(section):
        header, rows = table[0], table[2:]
        header_folder = None
        for token in _tokens(header):
            if _rooted(token):
                header_folder = _folder_of(PurePosixPath(token), root)
        for row in rows:
            folder = header_folder
            for token in _tokens(row):
                if _rooted(token):
                    path = PurePosixPath(token)  # drops a trailing "/"
                    folder = _folder_of(path, root)
                elif _bare_module(token):
                    if folder is None:
                        unresolved.append(f"`{token}` in: {row[:80]}")
                        continue
                    path = folder / token
                else:
                    continue
                named.setdefault(path, row)
    return named, unresolved


def required_paths(root: Path, packages: tuple[str, ...]) -> set[PurePosixPath]:
    required = set()
    for package in packages:
        for path in (root / package).rglob("*.py"):
            relative = PurePosixPath(path.relative_to(root).as_posix())
            required.add(relative.parent if path.name == "__init__.py" else relative)
    return required


SECTION = layout_section((ROOT / "README.md").read_text())
NAMED, UNRESOLVED = named_paths(SECTION, ROOT)


def test_every_bare_module_name_has_a_folder():
    assert not UNRESOLVED, "name a path before these in the row, or a folder in the table's header:\n" + "\n".join(
        UNRESOLVED
    )


def test_every_path_in_the_layout_exists():
    missing = sorted(str(path) for path in NAMED if not (ROOT / path).exists())
    assert not missing, f"README.md's Layout names paths that do not exist: {missing}"


def test_every_package_and_module_is_in_the_layout():
    missing = sorted(str(path) for path in required_paths(ROOT, PACKAGES) - set(NAMED))
    assert not missing, f"README.md's Layout does not name: {missing}"


def test_the_diffusion_row_names_what_ldm_diffusion_may_import():
    row = NAMED[PurePosixPath("ldm/diffusion")]
    assert "standard library" in row and all(name in row for name in DIFFUSION_THIRD_PARTY), row


# The parser on a small made-up section and tree.


def test_bare_names_resolve_against_the_last_path_in_the_row_or_the_header(tmp_path):
    for name in ("ldm/__init__.py", "ldm/a.py", "ldm/b.py", "ldm/sub/__init__.py", "ldm/sub/c.py", "ldm/d.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    section = "\n".join(
        [
            "| package | what |",
            "| --- | --- |",
            "| `ldm/a.py`, `b.py` | `AutoencoderKL`, `vae/` and `x.jsonl` are no paths; q(x \\| y) |",
            "| `ldm/sub` | holds `c.py` |",
            "| `ldm/gone.py` | missing |",
            "",
            "| module of `ldm/` | what |",
            "| --- | --- |",
            "| `d.py` | from the header |",
            "",
            "| module | what |",
            "| --- | --- |",
            "| `e.py` | no folder |",
        ]
    )
    named, unresolved = named_paths(section, tmp_path)
    assert set(map(str, named)) == {"ldm/a.py", "ldm/b.py", "ldm/sub", "ldm/sub/c.py", "ldm/gone.py", "ldm/d.py"}
    assert [path for path in map(str, named) if not (tmp_path / path).exists()] == ["ldm/gone.py"]
    assert unresolved == ["`e.py` in: | `e.py` | no folder |"]
    # A folder in a header sets the folder of its rows but is not itself named: the package ldm/ is missing.
    assert required_paths(tmp_path, ("ldm",)) - set(named) == {PurePosixPath("ldm")}
