"""README.md cannot rot: every ```python block runs, in README order, in one fresh interpreter (the Quickstart first,
as pasted; later blocks continue its session), except a block right after a `<!-- not-run: reason -->` line.
Whatever blocks the README holds when the test runs are the ones it runs."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")
MOST_NOT_RUN = 4          # deliberate fragments stay few

RUNNER = r"""
import json, sys, traceback, types
blocks = json.load(open(sys.argv[1]))
main = types.ModuleType("__main__")         # the blocks run as one script would: their globals are __main__'s
sys.modules["__main__"] = main
session = main.__dict__
for line, heading, code in blocks:
    print(f"=== README.md line {line} ({heading})", flush=True)
    try:
        exec(compile("\n" * (line - 1) + code, "README.md", "exec"), session)
    except BaseException:
        traceback.print_exc()
        print(f"README block at line {line} ({heading}) failed", file=sys.stderr, flush=True)
        sys.exit(1)
print("README OK", flush=True)
"""


def readme_blocks() -> list[dict]:
    """Every python block: its first code line, the heading above it, its code, and why it is not run (or None)."""
    text = README.read_text()
    out = []
    for m in BLOCK.finditer(text):
        above = text[:m.start()].rstrip("\n").splitlines()
        mark = NOT_RUN.search(above[-1]) if above else None
        heading = next((h.lstrip("#").strip() for h in reversed(above) if h.startswith("#")), "")
        out.append({"line": text.count("\n", 0, m.start()) + 2, "heading": heading, "code": m.group(1),
                    "not_run": mark.group(1) if mark else None})
    return out


def test_blocks_parse_and_exceptions_are_few_and_explained():
    blocks = readme_blocks()
    assert blocks and blocks[0]["heading"] == "Quickstart" and blocks[0]["not_run"] is None
    for b in blocks:
        compile(b["code"], f"README.md:{b['line']}", "exec")      # a SyntaxError names the block
        assert b["not_run"] is None or len(b["not_run"]) > 10, f"line {b['line']}: say why it is not run"
    skipped = [b for b in blocks if b["not_run"] is not None]
    assert len(skipped) <= MOST_NOT_RUN, [(b["line"], b["heading"]) for b in skipped]


@pytest.mark.slow
def test_every_runnable_block_runs_without_noise(tmp_path):
    """~2 minutes: the Quickstart compiles with Inductor, the sparse-weights block measures and compiles again."""
    blocks = [(b["line"], b["heading"], b["code"]) for b in readme_blocks() if b["not_run"] is None]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    out = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    assert "README OK" in out.stdout
    assert (tmp_path / "report.html").exists()
    noise = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("[sparsecc")]
    assert not noise, "stderr besides sparsecc's progress lines:\n" + "\n".join(noise[:40])
