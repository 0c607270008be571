"""Imports run one way (STYLE.md 13 and 18): the commands at the root sit on top of the library in
pelvicseg/ and the two root files the project was specified with (dataset.py, modules.py); a
command never imports another command; the library never imports a command or a tool;
modules.py imports nothing of the project; dataset.py at most pelvicseg.errors and pelvicseg.atomic (standard library only); the tools in
tools/ may import the library, dataset.py and modules.py, never a command.

Every import statement of every .py file is read with ast, those inside functions included (a
late ``import predict`` in a function is still a dependency on predict.py). The checker is run
on a copy with a bad import planted, to show that it can fail.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"train", "predict", "adapt", "export", "phantom"}
SPECIFIED = {"dataset", "modules"}  # root files the library may import
LIBRARY, TOOLS = "pelvicseg", "tools"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in the file; ``from a import b`` gives a.b as
    well as a, since b may be a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's package
                package = path.parent.relative_to(path.parents[len(path.parent.parts) - 1]).parts
                base = ".".join(list(package)[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def kind_of(name: str) -> str | None:
    """What a module of this project is: command, dataset, modules, library or tools (None: not ours)."""
    top = name.split(".")[0]
    if top in COMMANDS:
        return "command"
    if top in SPECIFIED:
        return top
    if top in (LIBRARY, TOOLS):
        return "library" if top == LIBRARY else "tools"
    return None


def allowed(importer: str, name: str) -> bool:
    """May a file of kind ``importer`` import the project module ``name``?"""
    target = kind_of(name)
    if importer == "modules":
        return False
    if importer == "dataset":
        return name == "pelvicseg" or name.startswith(("pelvicseg.errors", "pelvicseg.atomic"))  # leaves: standard library only
    if importer in ("command", "tools"):
        return target != "command"
    if importer == "library":
        return target in ("library", "dataset", "modules")
    return True


def file_kind(root: Path, path: Path) -> str | None:
    relative = path.relative_to(root)
    if len(relative.parts) == 1:
        return "command" if relative.stem in COMMANDS else (relative.stem if relative.stem in SPECIFIED else None)
    return {LIBRARY: "library", TOOLS: "tools"}.get(relative.parts[0])


def layout_violations(root: Path) -> list[str]:
    """'file:line imports name (rule)' for each import against the rules above."""
    violations = []
    files = sorted(root.glob("*.py")) + sorted((root / LIBRARY).rglob("*.py")) + sorted((root / TOOLS).rglob("*.py"))
    for path in files:
        importer = file_kind(root, path)
        if importer is None:
            continue
        for line, name in imported_modules(path):
            if kind_of(name) is None or allowed(importer, name):
                continue
            rule = {"modules": "modules.py imports nothing of the project",
                    "dataset": "dataset.py imports only pelvicseg.errors and pelvicseg.atomic",
                    "command": "a command never imports another command",
                    "tools": "a tool never imports a command",
                    "library": "the library never imports a command or a tool"}[importer]
            where = f"{path.relative_to(root)}:{line}"
            if not any(v.startswith(where + " ") for v in violations):  # one per statement: its first name
                violations.append(f"{where} imports {name} ({rule})")
    return violations


def test_imports_run_from_the_commands_down_to_the_library():
    assert layout_violations(REPO) == []


def copy_sources(destination: Path) -> Path:
    for path in list(REPO.glob("*.py")) + list((REPO / LIBRARY).rglob("*.py")) + list((REPO / TOOLS).rglob("*.py")):
        target = destination / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return destination


def test_the_checker_reports_each_kind_of_bad_import(tmp_path):
    root = copy_sources(tmp_path / "repo")
    before = set(layout_violations(root))
    plants = {  # file: (appended code, the rule it breaks)
        "pelvicseg/metrics.py": ("def _late():\n    import predict\n", "predict (the library never imports a "
                                 "command or a tool)"),
        "pelvicseg/dicom/pixels.py": ("from tools.bench import dynunet_strides\n", "tools.bench (the library never "
                                      "imports a command or a tool)"),
        "export.py": ("from train import get_args\n", "train (a command never imports another command)"),
        "tools/gpu_check.py": ("import train\n", "train (a tool never imports a command)"),
        "modules.py": ("from pelvicseg import errors\n", "pelvicseg (modules.py imports nothing of the project)"),
        "dataset.py": ("from pelvicseg import metrics\n", "pelvicseg.metrics (dataset.py imports only "
                       "pelvicseg.errors and pelvicseg.atomic)"),
    }
    expected = set()
    for name, (code, message) in plants.items():
        path = root / name
        text = path.read_text()
        path.write_text(text + code)
        expected.add(f"{name}:{text.count(chr(10)) + code.count(chr(10))} imports {message}")
    assert set(layout_violations(root)) - before == expected


def test_dicom_reading_loads_neither_torch_nor_monai_and_the_writers_no_pyplot():
    """What the import rules buy: the DICOM series reader takes its DataError from pelvicseg.errors,
    not from dataset.py (MONAI, torch), and the RTSTRUCT/SEG writers and the report their colours
    from pelvicseg.palette, not from figures.py (pyplot). A fresh interpreter, so nothing else has
    loaded them."""
    import subprocess
    import sys
    code = ("import sys\n"
            "import pelvicseg.dicom.series, pelvicseg.dicom.pixels\n"
            "assert not {'torch', 'monai'} & set(sys.modules), sorted({'torch', 'monai'} & set(sys.modules))\n"
            "import pelvicseg.dicom.outputs, pelvicseg.report\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_palette_is_the_one_matplotlib_gave_the_figures():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pelvicseg import figures, palette
    assert figures.class_colours is palette.class_colours
    for n in range(1, 20):  # HipMRI's six, then tab10 as plt.cm.tab10(i) gives it (its last colour past ten)
        extra = [matplotlib.colors.to_hex(plt.cm.tab10(i)) for i in range(max(0, n - 6))]
        assert palette.class_colours(n) == (palette.CLASS_COLOURS + extra)[:n], n
