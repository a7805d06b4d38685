"""Structural facts about the rewritten graphs: what each pass removed, what is saved, what the report holds."""
import re

import pytest
import torch
import torch.nn as nn

import sparsecc
from models import make
from sparsecc.report import registered, reports_since

aten = torch.ops.aten
C = sparsecc.Channels
US = sparsecc.UpdateScheme


def count(code: str, op: str) -> int:
    return len(re.findall(rf"torch\.ops\.aten\.{op}\.", code))


def saved_inputs(code: str) -> dict[str, str]:
    """name -> type annotation of each input of a backward graph (what the forward saved, plus tangents)."""
    start = code.index("def forward(self, ")
    header = code[start:code.index("):", start)]
    return dict(re.findall(r'(\w+): "([^"]+)"', header))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


GOLDEN_BIAS_ONLY_FC2 = """\
def forward(self, tangents_1: "f32[5, 3]"):
    sum_1: "f32[1, 3]" = torch.ops.aten.sum.dim_IntList(tangents_1, [0], True)
    view: "f32[3]" = torch.ops.aten.view.default(sum_1, [3])
    return (None, None, None, None, view)"""


def normalised(code: str) -> str:
    lines = [line[4:] for line in code.splitlines()
             if line.strip() and not line.strip().startswith("#") and "class GraphModule" not in line]
    return "\n".join(lines)


def test_golden_bias_only_last_layer():
    """Training only the last bias: the backward graph is one reduction of the tangent, nothing else."""
    torch.manual_seed(0)
    report = sparsecc.explain(Tiny(), torch.randn(5, 4), update=US({"fc2.bias": "full"}), executor="eager")
    assert normalised(report.graphs["backward/after"]) == GOLDEN_BIAS_ONLY_FC2
    assert report.stats["grads_pruned"] == 3
    assert report.stats["backward_flops_after"] == 0
    assert report.stats["saved_bytes_after"] == 0


def test_backward_stops_at_lowest_trained_layer():
    model, (x,) = make("mlp")
    full = sparsecc.explain(model, x, update=US.full(), executor="eager")
    top = sparsecc.explain(model, x, update=US({"fc3.*": "full"}), executor="eager")
    two = sparsecc.explain(model, x, update=US({"fc2.*": "full", "fc3.*": "full"}), executor="eager")
    # full backprop: 2 GEMMs per layer except the input gradient of fc1
    assert count(full.graphs["backward/after"], "mm") == 5
    assert count(top.graphs["backward/after"], "mm") == 1          # only fc3's weight gradient
    assert count(two.graphs["backward/after"], "mm") == 3          # fc3 weight + input, fc2 weight; nothing below fc2
    assert top.stats["grads_pruned"] == 4 and two.stats["grads_pruned"] == 2
    assert top.stats["backward_flops_after"] < two.stats["backward_flops_after"] < full.stats["backward_flops_after"]
    assert top.stats["saved_bytes_after"] < full.stats["saved_bytes_after"]


def test_bias_only_saves_no_input_activation():
    model, (x,) = make("mlp")
    report = sparsecc.explain(model, x, update=US({"*.bias": "full"}), executor="eager")
    bw = report.graphs["backward/after"]
    assert count(bw, "mm") == 2                           # only input-gradient GEMMs of fc3 and fc2 remain
    saved = saved_inputs(bw)
    assert all(t.startswith("b8") or not name.startswith(("relu", "addmm")) for name, t in saved.items()), saved


def test_channels_in_saves_only_the_slice():
    """Channels(0.25) on fc2: the forward saves a [7, 8] slice of fc1's activation, not the [7, 32] tensor."""
    model, (x,) = make("mlp")
    report = sparsecc.explain(model, x, update=US({"fc2.weight": C(0.25)}), executor="eager")
    saved = saved_inputs(report.graphs["backward/after"])
    float_saved = {n: t for n, t in saved.items() if t.startswith("f32") and not n.startswith(("primals", "tangents"))}
    assert list(float_saved.values()) == ["f32[7, 8]"], saved
    weight_grad_mm = re.findall(r'"f32\[(\d+), (\d+)\]" = torch\.ops\.aten\.mm\.default', report.graphs["backward/after"])
    assert ("8", "32") in weight_grad_mm or ("32", "8") in weight_grad_mm   # the GEMM computes only 8 channels
    assert report.stats["saved_bytes_after"] == 7 * 8 * 4 + 7 * 32  # the slice, and the bool mask of relu(fc2)
    assert report.stats["grads_sliced"] == 1


def test_channels_out_on_conv_slices_convolution_backward():
    model, (x,) = make("convnet")
    report = sparsecc.explain(model, x, update=US({"pw.weight": C(0.5, dim="out")}), executor="eager")
    bw = report.graphs["backward/after"]
    assert count(bw, "convolution_backward") == 1
    line = next(l for l in bw.splitlines() if "convolution_backward" in l)
    assert "[False, True, False]" in line                    # weight gradient only
    assert re.search(r"f32\[8, 8, 1, 1\]", bw)                # for 8 of the 16 output channels


def test_frozen_convs_need_no_convolution_backward():
    model, (x,) = make("convnet")
    report = sparsecc.explain(model, x, update=US({"head.*": "full", "bn3.*": "full"}), executor="eager")
    assert count(report.graphs["backward/before"], "convolution_backward") == 3
    assert count(report.graphs["backward/after"], "convolution_backward") == 0


def test_channels_on_a_parameter_no_gemm_uses_is_rejected_with_the_op_named():
    """The position table enters by an add: no contraction to slice, so the rule is refused, naming both."""
    model, (ids,) = make("transformer")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sparsecc.ConfigError, match=r"'pos'.*aten\.add\.Tensor"):
        sparsecc.explain(model, ids, update=US({"pos": C(0.5), "head.*": "full"}), executor="eager")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_report_stats_graphs_html_and_registry(tmp_path):
    model, (ids,) = make("transformer")
    n = registered()          # not len(reports()): the registry keeps the last 64, which a worker may have filled
    report = sparsecc.explain(model, ids, update=US({"blocks.2.*.bias": "full", "blocks.2.mlp.fc1.weight": C(0.25)}),
                              executor="eager")
    assert reports_since(n) == [report] and sparsecc.reports()[-1] is report
    for key in ("backward_flops_before", "backward_flops_after", "saved_bytes_before", "saved_bytes_after",
                "grads_pruned", "nodes_removed"):
        assert isinstance(report.stats[key], int), key
    assert report.stats["backward_flops_after"] < 0.2 * report.stats["backward_flops_before"]
    assert set(report.graphs) >= {"joint/input", "joint/after prune_backward", "joint/after subtensor_grads",
                                  "forward/before", "forward/after", "backward/before", "backward/after"}
    text = str(report)
    assert "backward FLOPs" in text and "blocks.2.mlp.fc1.weight" in text
    page = report.save_html(tmp_path / "r.html").read_text()
    assert page.count("<details>") == len(report.graphs) and "class='del'" in page


def test_debug_dir_dumps_every_compilation(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_DEBUG_DIR", str(tmp_path))
    model, (x,) = make("mlp")
    compiled = torch.compile(model, backend="sparsecc", options={"update": US({"fc3.*": "full"}), "executor": "eager"})
    compiled(x).sum().backward()
    dumps = sorted(tmp_path.glob("compile_*"))
    assert len(dumps) == 1
    files = {p.name for p in dumps[0].iterdir()}
    assert {"report.html", "stats.json", "summary.txt", "backward__after.py", "joint__after_prune_backward.py"} <= files


def test_explain_leaves_the_model_unchanged():
    model, (x,) = make("convnet")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sparsecc.explain(model, x, update=US({"head.*": "full"}), executor="eager")
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_graph_break_compiles_each_part():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(torch.relu(h))

    torch.manual_seed(0)
    model, x = Broken(), torch.randn(3, 6)
    scheme = US({"a.weight": C(0.5), "b.bias": "full"})
    compiled = torch.compile(model, backend=sparsecc.backend(update=scheme, executor="eager"))
    compiled(x).square().sum().backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    assert got["a.bias"] is None and got["b.weight"] is None
    torch.testing.assert_close(got["b.bias"], model.b.bias.grad)
    torch.testing.assert_close(got["a.weight"][:, :3], model.a.weight.grad[:, :3])
    assert (got["a.weight"][:, 3:] == 0).all()
