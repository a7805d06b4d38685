"""What the compiler did, for people: per-pass graphs, statistics, a summary table and an HTML page.

Every compilation registers its Report; sparsecc.reports() lists them, and SPARSECC_DEBUG_DIR=dir
dumps each one (graphs as .py files, stats as JSON, the HTML page) as it is made.
"""
from __future__ import annotations

import collections
import difflib
import html
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .memory import Timeline
from .passes import PassResult

_REPORTS: collections.deque["Report"] = collections.deque(maxlen=64)   # the most recent compilations
_REGISTERED = 0                                                            # how many were ever registered


@dataclass
class Report:
    """One compilation: graphs[name] is readable code ("joint/input", "joint/after <pass>",
    "forward/before", "backward/before", "forward/after", "backward/after"); stats holds the counts."""

    graphs: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    passes: list[PassResult] = field(default_factory=list)
    params: list[tuple[str, str, tuple]] = field(default_factory=list)   # (name, rule, shape)
    timeline: Timeline | None = None    # a training step's memory model: bytes live at each node (or buffer)

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
        if s.get("sparse_ops"):
            rows.insert(1, ("forward FLOPs", "forward_flops"))
        lines = ["sparsecc report", f"{'':28}{'before':>14}{'after':>14}{'ratio':>8}"]
        for label, key in rows:
            before, after = s.get(f"{key}_before"), s.get(f"{key}_after")
            if before is not None and after is not None:
                ratio = f"{after / before:.3f}" if before else "-"
                lines.append(f"{label:28}{before:>14,}{after:>14,}{ratio:>8}")
        if len(lines) > 2:
            lines.append("(before: plain autograd training every parameter, weights dense; after: what sparsecc compiled)")
        if "peak_bytes_estimate" in s:
            measured = s.get("peak_bytes_measured")
            model = self.timeline.model if self.timeline is not None else "model"
            lines.append(f"peak training memory (bytes above weights): {model} {s['peak_bytes_estimate']:,}"
                         + (f", measured {measured:,} ({s['peak_bytes_estimate'] / measured:.2f}x)" if measured else ""))
        lines.append(f"gradients removed: {s.get('grads_pruned', 0)}, gradients cut to some channels: "
                     f"{s.get('grads_sliced', 0)}, graph nodes removed: {s.get('nodes_removed', 0)}")
        if s.get("sparse_ops") or s.get("sparse_refused"):
            lines.append(f"sparse weights: {s.get('sparse_ops', 0)} GEMM calls rewritten to compute on the stored entries "
                         f"only, {s.get('sparse_refused', 0)} kept dense; est. forward+backward FLOPs saved "
                         f"{s.get('sparse_flops_saved', 0):,}")
        lines += self._per_parameter()
        lines.append("")
        lines.append("passes (graphs before and after each: report.graphs, or the HTML page):")
        names = {n for n, _, _ in self.params}
        for p in self.passes:
            lines.append(f"[{p.name}] " + ", ".join(f"{k}={v}" for k, v in p.counts.items()))
            lines += [f"    {n}" for n in p.notes if n.split(": ", 1)[0] not in names]
        return "\n".join(lines)

    def _notes_by_parameter(self) -> dict[str, list[str]]:
        """Each parameter's notes from every pass (notes start with "<parameter name>: "), less the frozen ones'
        "gradient removed" that the summary states once for all of them."""
        names, notes = {n for n, _, _ in self.params}, {}
        for p in self.passes:
            for note in p.notes:
                name = note.split(": ", 1)[0]
                if name in names and not (p.name == "prune_backward" and note.endswith("(frozen)")):
                    notes.setdefault(name, []).append(note)
        return notes

    def _per_parameter(self) -> list[str]:
        """What happened to each parameter and why: the frozen ones and the plainly trained ones in groups,
        every parameter a pass says something about on its own lines."""
        if not self.params:
            return []
        names = [n for n, _, _ in self.params]
        notes = self._notes_by_parameter()
        rules = {n: r for n, r, _ in self.params}
        frozen = [n for n in names if rules[n] == "frozen" and n not in notes]
        full = [n for n in names if rules[n] == "full" and n not in notes]
        counts = {k: sum(1 for r in rules.values() if (r if r in ("full", "frozen") else "channels") == k)
                  for k in ("full", "channels", "frozen")}
        lines = ["", f"parameters: {len(names)}; {counts['full']} trained in full, {counts['channels']} trained on some "
                     f"channels (Channels), {counts['frozen']} frozen"]
        if frozen:
            lines.append(f"  frozen, so no gradient, and every backward op that served only them was removed: "
                         f"{_grouped(frozen, names)}")
        if full:
            lines.append(f"  trained in full, as plain autograd would: {_grouped(full, names)}")
        for name in names:
            if name in notes:
                lines.append(f"  {name} [{rules[name]}]")
                lines += [f"    {n}" for n in notes[name]]
        return lines

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
                 "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}",
                 "td.num{text-align:right}",
                 "</style></head><body><h1>sparsecc report</h1>", f"<pre>{html.escape(str(self))}</pre>",
                 "<h2>Parameters</h2><table><tr><th>name</th><th>rule</th><th>shape</th>"
                 "<th>what sparsecc did</th></tr>"]
        if self.timeline is not None:
            parts.insert(-1, f"<h2>Memory timeline ({html.escape(self.timeline.model)})</h2>"
                         + _svg_timeline(self.timeline, self.stats.get("peak_bytes_measured")))
        done = self._notes_by_parameter()
        parts += [f"<tr><td>{html.escape(n)}</td><td>{html.escape(r)}</td><td class='num'>{s}</td><td>"
                  + html.escape(_did(r, done.get(n, []))) + "</td></tr>" for n, r, s in self.params]
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


def _did(rule: str, notes: list[str]) -> str:
    """One table cell: what happened to a parameter, in words."""
    if notes:
        return "; ".join(n.split(": ", 1)[1] for n in notes)
    if rule == "frozen":
        return "no gradient (frozen); backward ops that served only it were removed"
    return "trained in full, as plain autograd would"


def _grouped(chosen: list[str], every: list[str]) -> str:
    """Names compacted by module: "blocks.0.* (16)" when every parameter under blocks.0 is chosen."""
    chosen_set, out, seen = set(chosen), [], set()
    for name in chosen:
        parts = name.split(".")
        label = name
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i]) + "."
            under = [n for n in every if n.startswith(prefix)]
            if len(under) > 1 and all(n in chosen_set for n in under):
                label = f"{prefix}* ({len(under)})"
                break
        if label not in seen:
            seen.add(label)
            out.append(label)
    return ", ".join(out)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def _svg_timeline(t: Timeline, measured: int | None = None, width: int = 900, height: int = 220) -> str:
    """The liveness model's live bytes at each node of the step as a line plot: labelled axes with units, the
    model's peak, and the measured peak as a second line when one was measured."""
    left, bottom, top_pad, right = 80, 40, 16, 170
    top = max(t.peak, measured or 0, 1)
    n = max(len(t.live_bytes) - 1, 1)

    def x(i):
        return left + i * width / n

    def y(b):
        return top_pad + height - b * height / top

    points = " ".join(f"{x(i):.1f},{y(b):.1f}" for i, b in enumerate(t.live_bytes))
    parts = [f"<svg width='{left + width + right}' height='{top_pad + height + bottom}' "
             f"xmlns='http://www.w3.org/2000/svg' font-family='sans-serif' font-size='12'>",
             f"<line x1='{left}' y1='{y(0)}' x2='{left + width}' y2='{y(0)}' stroke='#555'/>",
             f"<line x1='{left}' y1='{top_pad}' x2='{left}' y2='{y(0)}' stroke='#555'/>"]
    for frac in (0, 0.25, 0.5, 0.75, 1):
        yy = y(top * frac)
        parts.append(f"<line x1='{left - 4}' y1='{yy:.1f}' x2='{left}' y2='{yy:.1f}' stroke='#555'/>"
                     f"<text x='{left - 6}' y='{yy + 4:.1f}' text-anchor='end'>{_mb(top * frac)}</text>")
    for frac in (0, 0.5, 1):
        xx = x(round(n * frac))
        parts.append(f"<text x='{xx:.1f}' y='{y(0) + 15:.1f}' text-anchor='middle'>{round(n * frac)}</text>")
    parts.append(f"<text x='{left + width / 2}' y='{y(0) + 32:.1f}' text-anchor='middle'>graph node, in execution "
                 f"order ({len(t.live_bytes)} nodes)</text>")
    parts.append(f"<text transform='translate(14,{top_pad + height / 2}) rotate(-90)' text-anchor='middle'>"
                 f"live bytes above the weights</text>")
    parts.append(f"<polyline fill='none' stroke='#0969da' points='{points}'/>")
    parts.append(f"<line x1='{left}' y1='{y(t.peak):.1f}' x2='{left + width}' y2='{y(t.peak):.1f}' stroke='#0969da' "
                 f"stroke-dasharray='4 3'/><text x='{left + width + 6}' y='{y(t.peak) + 4:.1f}' fill='#0969da'>"
                 f"model peak {_mb(t.peak)}</text>")
    if measured:
        dy = 14 if abs(y(measured) - y(t.peak)) < 14 else 0
        parts.append(f"<line x1='{left}' y1='{y(measured):.1f}' x2='{left + width}' y2='{y(measured):.1f}' "
                     f"stroke='#cf222e' stroke-dasharray='4 3'/><text x='{left + width + 6}' "
                     f"y='{y(measured) + 4 + dy:.1f}' fill='#cf222e'>measured peak {_mb(measured)}</text>")
    parts.append("</svg>")
    caption = (f"<p>Bytes live while each node of the training step runs, as the liveness model predicts "
               f"(graph inputs, i.e. weights, optimizer state and the batch, not counted). Model peak {t.peak:,} bytes"
               + (f"; measured peak of one real step {measured:,} bytes." if measured else
                  "; call step.measure_memory(x, y) to add the measured peak.") + "</p>")
    return "".join(parts) + caption


def _html_diff(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        cls = "add" if line.startswith("+") and not line.startswith("+++") else \
              "del" if line.startswith("-") and not line.startswith("---") else None
        text = html.escape(line)
        lines.append(f"<span class='{cls}'>{text}</span>" if cls else text)
    return "\n".join(lines) or "(no change)"


def register(report: Report) -> None:
    global _REGISTERED
    _REGISTERED += 1
    _REPORTS.append(report)
    debug_dir = os.environ.get("SPARSECC_DEBUG_DIR")
    if debug_dir:
        report.dump(debug_dir)


def reports() -> list[Report]:
    """The reports of the most recent (up to 64) sparsecc compilations in this process, oldest first."""
    return list(_REPORTS)


def reports_since(count: int) -> list[Report]:
    """The reports registered after the first `count` ever registered (count from registered())."""
    new = _REGISTERED - count
    return list(_REPORTS)[-new:] if new > 0 else []


def registered() -> int:
    """How many reports were ever registered in this process."""
    return _REGISTERED
