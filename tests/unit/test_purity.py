"""dfr_core stays pure torch/numpy: no orchestration or I/O library may be imported by it."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"ray", "fsspec", "s3fs", "pyarrow", "click", "boto3", "botocore", "pandas"}
CORE = Path(__file__).resolve().parents[2] / "dfr_core"


def test_no_forbidden_imports_in_source():
    bad = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not bad, bad


def test_importing_everything_loads_no_forbidden_module():
    modules = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        + "".join(f"import dfr_core.{m}\n" for m in modules)
        + f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
