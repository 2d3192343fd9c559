"""The package never loads untrusted code: a static scan of every source file for unsafe loads.

What counts as unsafe (each finding is reported as file:line):
- `torch.load` without `weights_only=True`; any import of pickle, dill, cloudpickle, marshal, shelve or joblib;
  `numpy.load(..., allow_pickle=True)`, `pandas.read_pickle`;
- `yaml.load`, `yaml.unsafe_load`, `yaml.full_load` (and `_all`), and any use of yaml's non-safe Loader classes;
- the builtins `eval`, `exec`, `compile`;
- `importlib.import_module` / `__import__` of anything but a string literal or an entry of a module-level
  table of string literals (so no module name can come from a config or the command line);
- `trust_remote_code` set to anything but False; `use_safetensors` set to anything but True;
- `from_pretrained` of a diffusers / transformers class that holds weights without `use_safetensors=True`
  (without it, a folder holding only pickled `.bin` weights would be loaded).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "autoencoder", "conditioning", "benchmarks")

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
_YAML_UNSAFE = "is not yaml's safe loader; use yaml.safe_load"
# Any reference to these (a call, or passing one along) is a finding.
UNSAFE_REFS = {f"yaml.{name}": _YAML_UNSAFE for name in ("load", "load_all", "unsafe_load", "unsafe_load_all")}
UNSAFE_REFS |= {f"yaml.{name}": _YAML_UNSAFE for name in ("full_load", "full_load_all", "Loader", "UnsafeLoader")}
UNSAFE_REFS |= {f"yaml.{name}": _YAML_UNSAFE for name in ("FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader")}
UNSAFE_REFS |= {
    "pandas.read_pickle": "unpickles",
    "eval": "runs arbitrary code",
    "exec": "runs arbitrary code",
    "compile": "builds code objects from text",
}
MUTATING_METHODS = ("update", "setdefault", "append", "extend", "insert", "__setitem__")
# from_pretrained of these loads only configs or vocabularies, never weights.
CONFIG_ONLY_SUFFIXES = ("Tokenizer", "TokenizerFast", "Scheduler", "Config", "FeatureExtractor", "Processor")


class _Scanner(ast.NodeVisitor):
    """Collects findings as (line, message) for one module."""

    def __init__(self, tree: ast.Module) -> None:
        self.findings: list[tuple[int, str]] = []
        self.aliases: dict[str, str] = {}  # local name -> dotted origin, from the module's imports
        self.literal_tables = _literal_tables(tree)

    def report(self, node: ast.AST, message: str) -> None:
        finding = (getattr(node, "lineno", 0), message)
        if finding not in self.findings:
            self.findings.append(finding)

    def qualified(self, node: ast.AST) -> str | None:
        """`torch.load` for `torch.load`, `th.load` (import torch as th) and `load` (from torch import load)."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.qualified(node.value)
            return f"{base}.{node.attr}" if base is not None else None
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(node, alias.name)
            self.aliases[(alias.asname or alias.name).split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0]
            )

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        self._check_module(node, module)
        for alias in node.names:
            origin = f"{module}.{alias.name}" if module else alias.name
            self.aliases[alias.asname or alias.name] = origin
            self._check_reference(node, origin)

    def _check_module(self, node: ast.AST, module: str) -> None:
        if module.split(".")[0] in PICKLE_MODULES:
            self.report(node, f"imports {module}, which deserializes arbitrary objects (use safetensors or JSON)")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check_reference(node, self.qualified(node))
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):  # a field or variable called `eval` or `compile` is no call of the builtin
            self._check_reference(node, self.aliases.get(node.id, node.id))

    def _check_reference(self, node: ast.AST, name: str | None) -> None:
        if name in UNSAFE_REFS:
            self.report(node, f"uses {name}: {UNSAFE_REFS[name]}")

    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualified(node.func)
        keywords = {kw.arg: kw.value for kw in node.keywords if kw.arg is not None}
        if name == "torch.load" and not _is_constant(keywords.get("weights_only"), True):
            self.report(node, "torch.load without weights_only=True can unpickle arbitrary objects")
        if name == "numpy.load" and "allow_pickle" in keywords and not _is_constant(keywords["allow_pickle"], False):
            self.report(node, "numpy.load with allow_pickle unpickles object arrays")
        if name in ("importlib.import_module", "__import__"):
            self._check_import_target(node)
        if "trust_remote_code" in keywords and not _is_constant(keywords["trust_remote_code"], False):
            self.report(node, "trust_remote_code other than False runs code downloaded with the weights")
        if "use_safetensors" in keywords and not _is_constant(keywords["use_safetensors"], True):
            self.report(node, "use_safetensors other than True may load pickled .bin weights")
        if isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            owner = self.qualified(node.func.value) or ""
            library = owner.startswith(("diffusers.", "transformers."))
            holds_weights = library and not owner.endswith(CONFIG_ONLY_SUFFIXES)
            if holds_weights and "use_safetensors" not in keywords:
                self.report(node, f"{owner}.from_pretrained without use_safetensors=True may load pickled weights")
        self.generic_visit(node)

    def _check_import_target(self, node: ast.Call) -> None:
        target = node.args[0] if node.args else next((kw.value for kw in node.keywords if kw.arg == "name"), None)
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            return
        fixed_table = isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
        if fixed_table and target.value.id in self.literal_tables:
            return
        self.report(node, "imports a module whose name is not a literal (a config or argument could name any code)")


def _is_constant(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _literal_tables(tree: ast.Module) -> set[str]:
    """Module-level names bound once to a dict (values) or tuple / list whose entries are all string literals."""
    tables: dict[str, bool] = {}
    for stmt in tree.body:
        targets, value = [], None
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        for target in targets:
            if not isinstance(target, ast.Name):
                continue
            entries = value.values if isinstance(value, ast.Dict) else getattr(value, "elts", None)
            literal = (
                isinstance(value, (ast.Dict, ast.Tuple, ast.List))
                and bool(entries)
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in entries)
            )
            tables[target.id] = literal and target.id not in tables  # rebinding a name makes it unreliable
    for node in ast.walk(tree):  # a table that is mutated anywhere is not a fixed set either
        if isinstance(node, (ast.Subscript, ast.Attribute)) and isinstance(node.ctx, ast.Store):
            base = node.value
            if isinstance(base, ast.Name):
                tables[base.id] = False
        method = node.func if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        if method is not None and isinstance(method.value, ast.Name) and method.attr in MUTATING_METHODS:
            tables[method.value.id] = False
    return {name for name, literal in tables.items() if literal}


def scan_source(text: str, filename: str) -> list[str]:
    """Every unsafe load in one module's source, as 'filename:line: what'."""
    tree = ast.parse(text, filename=filename)
    scanner = _Scanner(tree)
    scanner.visit(tree)
    return [f"{filename}:{line}: {message}" for line, message in sorted(scanner.findings)]


def package_sources() -> list[Path]:
    """Every .py file of the shipped packages and the benchmarks."""
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_package_sources_have_no_unsafe_loads():
    sources = package_sources()
    # The scan must really see the code: every package is there and holds its known modules.
    assert {path.relative_to(ROOT).parts[0] for path in sources} == set(PACKAGES)
    assert len(sources) > 50 and ROOT / "ldm" / "generation" / "pipeline.py" in sources
    findings = [
        finding
        for path in sources
        for finding in scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert findings == [], "unsafe loads:\n" + "\n".join(findings)


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("import torch\nx = torch.load('w.pt')\n", "torch.load without weights_only=True"),
        ("import torch\nx = torch.load('w.pt', weights_only=False)\n", "torch.load without weights_only=True"),
        ("from torch import load\nx = load('w.pt')\n", "torch.load without weights_only=True"),
        ("import torch as th\nx = th.load('w.pt', map_location='cpu')\n", "torch.load without weights_only=True"),
        ("import pickle\n", "imports pickle"),
        ("from dill import loads\n", "imports dill"),
        ("import cloudpickle as cp\n", "imports cloudpickle"),
        ("import marshal\n", "imports marshal"),
        ("import numpy as np\nx = np.load('a.npy', allow_pickle=True)\n", "numpy.load with allow_pickle"),
        ("import yaml\nx = yaml.load(open('c.yaml'))\n", "uses yaml.load"),
        ("import yaml\nx = yaml.unsafe_load('a: 1')\n", "uses yaml.unsafe_load"),
        ("import yaml\nx = yaml.load('a: 1', Loader=yaml.Loader)\n", "uses yaml.Loader"),
        ("from yaml import UnsafeLoader\n", "uses yaml.UnsafeLoader"),
        ("x = eval('1 + 1')\n", "uses eval"),
        ("exec('import os')\n", "uses exec"),
        ("import importlib, json\ncfg = json.load(open('c'))\nimportlib.import_module(cfg['t'])\n", "not a literal"),
        ("import importlib\ndef f(name):\n    return importlib.import_module(f'ldm.{name}')\n", "not a literal"),
        ("m = __import__(input())\n", "not a literal"),
        ("import importlib\nT = {'a': 'os'}\nT['b'] = 'x'\nm = importlib.import_module(T['a'])\n", "not a literal"),
        ("from transformers import CLIPTextModel\nm = CLIPTextModel.from_pretrained('p')\n", "use_safetensors"),
        ("import diffusers\nm = diffusers.UNet2DModel.from_pretrained('p', use_safetensors=False)\n", "safetensors"),
        ("from transformers import AutoModel\nm = AutoModel.from_pretrained('p', trust_remote_code=True)\n", "trust"),
    ],
)
def test_the_scan_catches_each_planted_unsafe_load(snippet, expected):
    findings = scan_source(snippet, "planted.py")
    assert findings, f"the scanner missed: {snippet!r}"
    assert any(expected in finding for finding in findings), findings
    assert all(finding.startswith("planted.py:") for finding in findings)


def test_the_scan_names_the_line_of_the_finding():
    snippet = "import yaml\n\n\ndef read(path):\n    return yaml.load(open(path))\n"
    assert scan_source(snippet, "pkg/mod.py") == [
        "pkg/mod.py:5: uses yaml.load: is not yaml's safe loader; use yaml.safe_load"
    ]


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nx = torch.load('w.pt', weights_only=True)\n",
        "import yaml\nx = yaml.safe_load('a: 1')\ny = yaml.safe_dump(x)\n",
        "import torch\nmodel = torch.nn.Linear(1, 1)\nmodel.eval()\nmodel.compile()\n",
        "from dataclasses import dataclass\n@dataclass\nclass C:\n    eval: int = 0\n    compile: bool = False\n",
        "import importlib\nm = importlib.import_module('ldm.commands.toy')\n",
        "import importlib\nT = {'a': 'os.path'}\ndef f(k):\n    return importlib.import_module(T[k])\n",
        "from transformers import CLIPTokenizer\nt = CLIPTokenizer.from_pretrained('p', subfolder='tokenizer')\n",
        "from diffusers import AutoencoderKL\nv = AutoencoderKL.from_pretrained('p', use_safetensors=True)\n",
        "from safetensors.torch import load_file\nw = load_file('w.safetensors')\n",
    ],
)
def test_safe_code_is_not_flagged(snippet):
    assert scan_source(snippet, "safe.py") == []


class _Payload:
    """An arbitrary object: unpickling it would mean a file can make us build (and run) anything."""


def test_torch_load_in_libraries_we_call_refuses_arbitrary_objects(tmp_path):
    # LPIPS (torchvision backbones) and FID (Inception) weights are pickled .pth files that those libraries
    # read with a bare torch.load; the torch this project requires makes that weights-only by default.
    import torch

    torch.save({"weights": torch.zeros(2), "payload": _Payload()}, tmp_path / "weights.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "weights.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pth")
    assert torch.equal(torch.load(tmp_path / "plain.pth")["weights"], torch.zeros(2))


def test_a_clip_model_folder_without_safetensors_is_not_loaded(tmp_path):
    from ldm.evaluation.pretrained import clip_unavailable_reason

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickled")
    assert "has no .safetensors weights" in clip_unavailable_reason(str(tmp_path))
    assert "is not a folder" in clip_unavailable_reason(str(tmp_path / "missing"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert clip_unavailable_reason(str(tmp_path)) is None
