"""What the compiler did, for people: per-pass graphs, statistics, a summary table and an HTML page.

Every compilation registers its Report; sparsecc.reports() lists them, and SPARSECC_DEBUG_DIR=dir
dumps each one (graphs as .py files, stats as JSON, the HTML page) as it is made.
"""
from __future__ import annotations

import difflib
import html
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .memory import Timeline
from .passes import PassResult

_REPORTS: list["Report"] = []


@dataclass
class Report:
    """One compilation: graphs[name] is readable code ("joint/input", "joint/after <pass>",
    "forward/before", "backward/before", "forward/after", "backward/after"); stats holds the counts."""

    graphs: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    passes: list[PassResult] = field(default_factory=list)
    params: list[tuple[str, str, tuple]] = field(default_factory=list)   # (name, rule, shape)
    timeline: Timeline | None = None    # a training step's liveness model: bytes live at each node

    @classmethod
    def merge(cls, reports: list["Report"]) -> "Report":
        """One report for several graphs of one model (a graph break): graphs prefixed, stats summed."""
        if len(reports) == 1:
            return reports[0]
        merged = cls()
        for i, r in enumerate(reports):
            merged.graphs.update({f"graph{i}/{k}": v for k, v in r.graphs.items()})
            for k, v in r.stats.items():
                merged.stats[k] = merged.stats.get(k, 0) + v
            merged.passes += r.passes
            merged.params += r.params
        return merged

    def __str__(self) -> str:
        s = self.stats
        rows = [("backward FLOPs", "backward_flops"), ("saved for backward (bytes)", "saved_bytes"),
                ("backward nodes", "backward_nodes")]
        lines = ["sparsecc report", f"{'':28}{'before':>14}{'after':>14}{'ratio':>8}"]
        for label, key in rows:
            before, after = s.get(f"{key}_before"), s.get(f"{key}_after")
            if before is not None:
                ratio = f"{after / before:.3f}" if before else "-"
                lines.append(f"{label:28}{before:>14,}{after:>14,}{ratio:>8}")
        if "peak_bytes_estimate" in s:
            measured = s.get("peak_bytes_measured")
            lines.append(f"peak training memory (bytes above weights): model {s['peak_bytes_estimate']:,}"
                         + (f", measured {measured:,} ({s['peak_bytes_estimate'] / measured:.2f}x)" if measured else ""))
        lines.append(f"gradients pruned: {s.get('grads_pruned', 0)}, gradients sliced: {s.get('grads_sliced', 0)}, "
                     f"nodes removed: {s.get('nodes_removed', 0)}")
        if s.get("sparse_ops") or s.get("sparse_refused"):
            lines.append(f"sparse ops: {s.get('sparse_ops', 0)} rewritten, {s.get('sparse_refused', 0)} kept dense, "
                         f"est. fwd+bwd FLOPs saved {s.get('sparse_flops_saved', 0):,}")
        for p in self.passes:
            lines.append(f"[{p.name}] " + ", ".join(f"{k}={v}" for k, v in p.counts.items()))
            lines += [f"    {n}" for n in p.notes if "frozen" not in n]
        return "\n".join(lines)

    @property
    def kernels(self) -> dict[str, str]:
        """Source of the Triton kernels sparsecc generated in this process so far (they are generated when the
        compiled graphs first run on a GPU, or with SPARSECC_TRITON=1), by name."""
        triton = sys.modules.get("sparsecc.codegen.triton")
        return triton.generated_sources() if triton is not None else {}

    def diff(self, before: str, after: str) -> str:
        return "\n".join(difflib.unified_diff(self.graphs[before].splitlines(), self.graphs[after].splitlines(),
                                              before, after, lineterm=""))

    def _diff_pairs(self) -> list[tuple[str, str]]:
        joint = [k for k in self.graphs if k.startswith("joint/")]
        dynamo = [("dynamo/input", "dynamo/after sparsify")] if "dynamo/input" in self.graphs else []
        return dynamo + list(zip(joint, joint[1:])) + [("forward/before", "forward/after"),
                                                       ("backward/before", "backward/after")]

    def to_html(self) -> str:
        parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sparsecc report</title><style>",
                 "body{font-family:sans-serif;margin:2em}pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:12px}",
                 ".add{color:#116329;background:#dafbe1}.del{color:#82071e;background:#ffebe9}",
                 "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}",
                 "</style></head><body><h1>sparsecc report</h1>", f"<pre>{html.escape(str(self))}</pre>",
                 "<h2>Parameters</h2><table><tr><th>name</th><th>rule</th><th>shape</th></tr>"]
        if self.timeline is not None:
            parts.insert(-1, "<h2>Memory timeline (liveness model)</h2>" + _svg_timeline(self.timeline))
        parts += [f"<tr><td>{html.escape(n)}</td><td>{html.escape(r)}</td><td>{s}</td></tr>" for n, r, s in self.params]
        parts.append("</table><h2>What each pass changed</h2>")
        for before, after in self._diff_pairs():
            if before in self.graphs and after in self.graphs:
                parts.append(f"<h3>{html.escape(before)} &rarr; {html.escape(after)}</h3><pre>{_html_diff(self.diff(before, after))}</pre>")
        parts.append("<h2>Graphs</h2>")
        for name, code in self.graphs.items():
            parts.append(f"<details><summary>{html.escape(name)}</summary><pre>{html.escape(code)}</pre></details>")
        if self.kernels:
            parts.append("<h2>Generated Triton kernels</h2>")
            for name, code in self.kernels.items():
                parts.append(f"<details><summary>{html.escape(name)}</summary><pre>{html.escape(code)}</pre></details>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def save_html(self, path) -> Path:
        path = Path(path)
        path.write_text(self.to_html())
        return path

    def dump(self, directory) -> Path:
        """Write every graph, the stats and the HTML page into a new numbered folder under directory."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        out = root / f"compile_{len(list(root.glob('compile_*'))):03d}"
        out.mkdir()
        for name, code in self.graphs.items():
            (out / (name.replace("/", "__").replace(" ", "_") + ".py")).write_text(code)
        (out / "stats.json").write_text(json.dumps(self.stats, indent=2))
        (out / "summary.txt").write_text(str(self))
        self.save_html(out / "report.html")
        return out


def _svg_timeline(t: Timeline, width: int = 900, height: int = 200) -> str:
    top = max(t.peak, 1)
    n = max(len(t.live_bytes) - 1, 1)
    points = " ".join(f"{i * width / n:.1f},{height - b * height / top:.1f}" for i, b in enumerate(t.live_bytes))
    return (f"<svg width='{width}' height='{height + 20}' xmlns='http://www.w3.org/2000/svg'>"
            f"<polyline fill='none' stroke='#0969da' points='{points}'/>"
            f"<text x='0' y='{height + 15}' font-size='12'>peak {t.peak:,} bytes over {len(t.live_bytes)} nodes</text></svg>")


def _html_diff(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        cls = "add" if line.startswith("+") and not line.startswith("+++") else \
              "del" if line.startswith("-") and not line.startswith("---") else None
        text = html.escape(line)
        lines.append(f"<span class='{cls}'>{text}</span>" if cls else text)
    return "\n".join(lines) or "(no change)"


def register(report: Report) -> None:
    _REPORTS.append(report)
    debug_dir = os.environ.get("SPARSECC_DEBUG_DIR")
    if debug_dir:
        report.dump(debug_dir)


def reports() -> list[Report]:
    """The reports of every sparsecc compilation in this process, oldest first."""
    return list(_REPORTS)
