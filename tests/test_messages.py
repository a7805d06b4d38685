"""What a newcomer reads: reports in plain words (what was removed, per parameter, and why), a headline that counts
what sparse weights save, a memory plot with axes, units and the measured peak, and "matches no parameter" errors
that say where the parameters are."""
import re

import pytest
import torch

import sparsecc
from sparsecc.errors import module_prefixes
from sparsecc.memory import Timeline
from sparsecc.report import Report
from sparsecc.search import Candidate, SearchReport
from models import MLP, make

US, C = sparsecc.UpdateScheme, sparsecc.Channels


@pytest.mark.parametrize("make_error", [
    lambda params: US({"layer.4.*": "full"}).resolve(params),
    lambda params: sparsecc.Sparsity({"layer.4.*": sparsecc.NM(2, 4)}).resolve(params),
], ids=["UpdateScheme", "Sparsity"])
def test_a_pattern_far_from_every_name_is_told_where_parameters_live(make_error):
    model, _ = make("transformer")
    with pytest.raises(sparsecc.ConfigError) as e:
        make_error(dict(model.named_parameters()))
    assert "'layer.4.*' matches no parameter. Parameters live under: " in str(e.value)
    assert "blocks.0, blocks.1, blocks.2" in str(e.value) and "ln_f" in str(e.value)


def test_module_prefixes_look_into_wrappers_and_shorten_module_lists():
    llama = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)),
             "model.norm.weight", "lm_head.weight"]
    assert module_prefixes(llama) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "...",
                                      "model.layers.11", "model.norm", "lm_head"]
    assert module_prefixes(["fc1.weight", "fc1.bias", "fc2.weight"]) == ["fc1", "fc2"]


def test_report_says_per_parameter_what_was_removed_and_why():
    model, (ids,) = make("transformer")
    report = sparsecc.explain(model, ids, executor="eager", update=US({
        "blocks.2.*.bias": "full", "blocks.2.mlp.fc1.weight": C(0.25),
        "blocks.2.mlp.fc2.weight": C(0.5, dim="out", select="magnitude"), "ln_f.*": "full"}))
    text = str(report)
    assert "(before: plain autograd training every parameter" in text
    assert re.search(r"frozen, so no gradient, and every backward op that served only them was removed: "
                     r"embed\.weight, pos, blocks\.0\.\* \(16\), blocks\.1\.\* \(16\)", text)
    assert "blocks.2.mlp.fc1.weight: gradient computed for 8 of 32 input channels (dim 1)" in text
    assert "the forward keeps only those channels of" in text
    assert "blocks.2.mlp.fc2.weight: gradient computed for 16 of 32 output channels (dim 0)" in text
    assert "also feeds other gradients, so it is needed in full" in text           # why part stays full-size
    for jargon in ("no slicing rule", "is also used elsewhere", "activations selected before saving"):
        assert jargon not in text
    page = report.to_html()
    assert "gradient computed for 8 of 32 input channels" in page and "no gradient (frozen)" in page


def test_the_headline_counts_what_sparse_weights_save():
    torch.manual_seed(0)
    model, x = MLP(d_in=32, hidden=64, d_out=8), torch.randn(16, 32)
    sparsecc.sparsify(model, sparsecc.Sparsity({"fc2.weight": sparsecc.Blocks(16, 0.25)}))
    report = sparsecc.explain(model, x, executor="eager", cost_model="off")   # every parameter trained
    s = report.stats
    assert s["sparse_ops"] == 1
    saved_bwd = 2 * 2 * 16 * 64 * 64 * 3 // 4          # input and weight gradient GEMMs of fc2, 3/4 of them skipped
    assert s["backward_flops_before"] - s["backward_flops_after"] == saved_bwd
    assert s["forward_flops_before"] - s["forward_flops_after"] == saved_bwd // 2
    headline = str(report).split("\n(before")[0]
    bwd = re.search(r"backward FLOPs\s+[\d,]+\s+[\d,]+\s+([\d.]+)", headline)
    assert bwd and float(bwd.group(1)) < 0.9, headline
    assert re.search(r"forward FLOPs\s+[\d,]+\s+[\d,]+\s+0\.\d+", headline), headline


def test_memory_plot_has_axes_units_and_the_measured_peak():
    report = Report(params=[("fc1.weight", "full", (4, 4)), ("a_long_parameter_name.weight", "frozen", (4, 4))],
                    timeline=Timeline(["a", "b", "c", "d"], [1_000_000, 3_500_000, 2_000_000, 500_000]))
    page = report.to_html()
    assert "live bytes above the weights" in page and "graph node, in execution order (4 nodes)" in page
    assert "3.50 MB" in page and "model peak 3.50 MB" in page and "#cf222e" not in page     # nothing measured yet
    report.stats["peak_bytes_measured"] = 4_200_000
    page = report.to_html()
    assert "measured peak 4.20 MB" in page and "stroke='#cf222e'" in page
    assert "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}" in page     # names read left-aligned


def test_search_report_says_what_its_bound_is():
    chosen = Candidate({"fc3.bias": "full"}, "greedy", 100, 120, 0.5, 0.4, 130)
    text = str(SearchReport(1000, 100, [chosen], chosen, 1.0))
    assert "lower bound above the compiled estimate" not in text
    assert "quick memory bound that skips compiling schemes which cannot fit was never above" in text
