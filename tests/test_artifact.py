"""Artifacts: save a compiled training step, load it where the model's code is absent, train and run it on
the host (torch.export), on x86_64 and on aarch64 (IREE, under qemu-user); reject every corrupt artifact
without running anything from it."""
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.export import archive, artifact, layouts, programs
from models import MLP, Transformer

US = sparsecc.UpdateScheme
SPEC = sparsecc.Sparsity({"blocks.*.mlp.fc1.weight": sparsecc.Blocks(8, 0.5),
                          "blocks.*.attn.q.weight": sparsecc.NM(2, 4),
                          "blocks.*.mlp.fc2.weight": sparsecc.Unstructured(0.3)})
# attention's key bias has a true gradient of 0: it stays frozen so no optimizer amplifies rounding noise
SCHEME = US({"blocks.*.k.bias": "frozen", "blocks.*.mlp.fc1.weight": "full", "blocks.*.attn.q.weight": "full",
             "blocks.*.bias": "full", "blocks.*.ln*": "full", "blocks.0.attn.proj.weight": sparsecc.Channels(0.5),
             "blocks.0.attn.v.weight": sparsecc.Channels(0.25, dim="out", select="magnitude")})


def seq_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def batches(n, vocab, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, shape, generator=g), torch.randint(0, vocab, shape, generator=g)) for _ in range(n)]


def sparse_transformer_step(optimizer, **size):
    torch.manual_seed(0)
    model = Transformer(**size)
    sparsecc.sparsify(model, SPEC)
    x, y = batches(1, size.get("vocab", 40), (2, size.get("seq", 16)))[0]
    return sparsecc.compile_train_step(model, seq_loss, optimizer=optimizer, update=SCHEME, example_inputs=(x, y),
                                       executor="eager", cost_model="off")   # host programs: the sparse kernels


# ---- host: a fresh process without the model's code ---------------------------------------------------

FRESH = """
import importlib.util, sys
import numpy as np, torch, sparsecc
assert importlib.util.find_spec("models") is None, "the model's module must not be importable here"
data = np.load(sys.argv[2])
runner = sparsecc.load(sys.argv[1])
losses = [float(runner.train_step(torch.from_numpy(data[f"x{i}"]), torch.from_numpy(data[f"y{i}"])))
          for i in range(int(data["k"]))]
out = {"losses": np.array(losses), "logits": runner(torch.from_numpy(data["x0"])).numpy()}
out.update({f"param:{n}": p.numpy() for n, p in runner.parameters().items()})
np.savez(sys.argv[3], **out)
runner.save()
"""


@pytest.mark.parametrize("optimizer", [sparsecc.SGD(0.05, momentum=0.9, weight_decay=1e-3), sparsecc.AdamW(3e-3)],
                         ids=["sgd_momentum", "adamw"])
def test_fresh_process_without_model_source_trains_like_the_step(tmp_path, optimizer):
    step = sparse_transformer_step(optimizer)
    data = batches(5, 40, (2, 16))
    for x, y in data[:2]:           # optimizer state and step count are not at their initial values
        step(x, y)
    path = sparsecc.save(step, tmp_path / "t.sparsecc")
    k = 3
    np.savez(tmp_path / "data.npz", k=k, **{f"x{i}": x.numpy() for i, (x, _) in enumerate(data[2:])},
             **{f"y{i}": y.numpy() for i, (_, y) in enumerate(data[2:])})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", FRESH, str(path), str(tmp_path / "data.npz"), str(tmp_path / "out.npz")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    want = [float(step(x, y)) for x, y in data[2:]]
    np.testing.assert_allclose(got["losses"], want, rtol=1e-5, atol=1e-6)
    step.model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(got["logits"], step.model(data[2][0]).numpy(), rtol=1e-4, atol=1e-5)
    for name, p in step.model.named_parameters(remove_duplicate=False):
        np.testing.assert_allclose(got[f"param:{name}"], p.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    for name, mask in step.model.sparsecc_masks.items():
        assert (got[f"param:{name}"][~mask.numpy()] == 0).all(), name
    again = sparsecc.load(path)       # runner.save() in the child wrote the trained state back
    assert int(again.tensors["step"]) == 2 + k


def test_batchnorm_buffers_and_channels_through_an_artifact(tmp_path):
    from models import ConvNet
    torch.manual_seed(0)
    model = ConvNet()
    sparsecc.sparsify(model, sparsecc.Sparsity({"head.weight": sparsecc.Unstructured(0.5)}))
    x, y = torch.randn(4, 3, 10, 10), torch.randint(0, 5, (4,))
    scheme = US({"bn*.*": "full", "head.*": "full", "stem.weight": sparsecc.Channels(0.5, dim="out")})
    # SGD: a conv feeding BatchNorm has near-zero gradient directions that Adam would blow up to lr-sized noise
    step = sparsecc.compile_train_step(model, F.cross_entropy, optimizer=sparsecc.SGD(0.05, momentum=0.9),
                                       update=scheme, example_inputs=(x, y), executor="eager")
    runner = sparsecc.load(sparsecc.save(step, tmp_path / "c.sparsecc"))
    for _ in range(3):
        torch.testing.assert_close(runner.train_step(x, y), step(x, y))
    for name, buf in model.named_buffers():
        torch.testing.assert_close(runner.tensors[f"buffer/{name}"], buf, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    for name, p in model.named_parameters():
        torch.testing.assert_close(runner.parameters()[name], p.detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    assert tuple(runner.tensors["state/stem.weight/momentum_buffer"].shape) == (4, 3, 3, 3)   # trained half only
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), rtol=1e-4, atol=1e-5)


def test_transformers_llama_with_keyword_inputs_on_host_and_x86(tmp_path):
    """A real transformers model: keyword inputs, a ModelOutput with a KV cache object (returned as a dict with
    None for the cache), constants its forward creates, rotary buffers."""
    from models import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama()
    ids, y = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    scheme = US({"*norm*": "full", "model.layers.1.mlp.*": sparsecc.Channels(0.5)})
    step = sparsecc.compile_train_step(model, lambda out, y: seq_loss(out.logits, y), optimizer=sparsecc.AdamW(1e-3),
                                       update=scheme, example_inputs=({"input_ids": ids}, y), executor="eager")
    path = sparsecc.save(step, tmp_path / "llama.sparsecc", targets=["host", "x86_64"])
    host, x86 = sparsecc.load(path), sparsecc.load(path, target="x86_64")
    for _ in range(2):
        want = step({"input_ids": ids}, y)
        torch.testing.assert_close(host.train_step({"input_ids": ids}, y), want)
        torch.testing.assert_close(x86.train_step({"input_ids": ids}, y), want, rtol=1e-5, atol=1e-5)
    out = host({"input_ids": ids})
    assert set(out) == {"logits", "past_key_values"} and out["past_key_values"] is None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x86({"input_ids": ids})["logits"], out["logits"], rtol=1e-4, atol=1e-5)


def test_the_host_step_runs_the_sparse_kernels_from_the_compact_index(tmp_path):
    """A step on the sparse kernels saves a host train_step that calls them (IREE's reads the weights densely);
    the file holds only the compact index, from which loading rebuilds the kernels' operands; runner, the step
    it came from (which keeps training after the save) and the step's own next losses agree."""
    step = sparse_transformer_step(sparsecc.AdamW(3e-3), d=16, heads=2, layers=1, seq=8, vocab=24)
    assert step.report.stats["sparse_ops"] == 3           # fc1 (blocks), q (N:M), fc2 (unstructured)
    data = batches(3, 24, (2, 8))
    path = sparsecc.save(step, tmp_path / "k.sparsecc")
    manifest, files = archive.read(path)
    host = artifact.host_exported(path, "programs/host/train_step.json", files["programs/host/train_step.json"],
                                  manifest)
    called = {n.target for n in host.graph.nodes if n.op == "call_function"}
    ops = torch.ops.sparsecc
    assert {ops.block_sparse_mm.default, ops.block_sddmm.default, ops.nm_mm.default, ops.nm_sddmm.default,
            ops.csr_mm.default, ops.csr_mm_t.default} <= called
    assert ops.csr_sddmm.default not in called           # fc2 is frozen: no weight gradient
    stored = safetensors.torch.load(files["weights.safetensors"])
    assert not [k for k in stored if k.startswith("kernel/")]
    runner = sparsecc.load(path)
    rebuilt = {k for k in runner.tensors if k.startswith("kernel/blocks.0.mlp.fc1.weight/")}
    assert rebuilt == {f"kernel/blocks.0.mlp.fc1.weight/{k}" for k in ("keep", "rows", "cols")}
    for x, y in data:
        torch.testing.assert_close(runner.train_step(x, y), step(x, y), rtol=1e-5, atol=1e-6)
    for name, value in runner.parameters().items():
        torch.testing.assert_close(value, step.params[name].detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    runner.save(tmp_path / "again.sparsecc")             # the rebuilt operands are not written back
    assert not [k for k in safetensors.torch.load(archive.read(tmp_path / "again.sparsecc")[1]["weights.safetensors"])
                if k.startswith("kernel/")]


def test_a_host_program_calling_any_other_op_is_refused(tmp_path):
    class Calls(torch.nn.Module):
        def forward(self, x):
            return x + torch.ops.sparsecc.index_constant([1, 2], x.device)
    exported = torch.export.export(Calls(), (torch.zeros(2, dtype=torch.int64),))
    data = programs.dumps(programs.Program("forward", exported, ["input/0"], ["out"], [torch.zeros(2)]))
    with pytest.raises(sparsecc.ArtifactError, match=r"calls sparsecc.index_constant.default, which is neither an "
                                                     r"ATen/prims operator nor one of sparsecc's sparse kernels"):
        artifact.host_exported(tmp_path / "x.sparsecc", "programs/host/forward.json", data, {})


def test_sparse_weights_are_stored_compressed(tmp_path):
    step = sparse_transformer_step(sparsecc.SGD(0.1, momentum=0.9), d=64, heads=4, layers=2, vocab=48)
    path = sparsecc.save(step, tmp_path / "s.sparsecc")
    manifest, files = archive.read(path)
    index_bytes = {"unstructured": 4, "nm": 1}
    compressed = 0
    for p in manifest["parameters"]:
        if p["tied_to"]:
            continue
        param = step.params[p["name"]]
        mask = step.masks.get(p["name"])
        nnz = int(mask.sum()) if mask is not None else param.numel()
        kind = p["layout"].split(":")[0]
        compressed += nnz * 4 + (nnz // 64 * 4 if kind == "blocks" else nnz * index_bytes.get(kind, 0))
        if p["trained_shape"] is not None:
            trained = nnz if mask is not None else torch.Size(p["trained_shape"]).numel()
            compressed += trained * 4 * len(step.optimizer.state_names)
        assert p["layout"] == (layouts.name(step.model.sparsecc_patterns[p["name"]]) if mask is not None else "dense")
    compressed += sum(b.numel() * b.element_size() for n, b in step.model.named_buffers())
    weights = manifest["files"]["weights.safetensors"]["bytes"]
    assert weights <= 1.15 * compressed, (weights, compressed)
    dense = sum(p.numel() * 4 for p in step.model.parameters())
    assert weights < 0.8 * (dense + sum(s.numel() * 4 for st in step.state.values() for s in st.values()))


# ---- CPU targets through IREE -------------------------------------------------------------------------

def _aarch64_tool():
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 is not installed (Debian: apt-get install qemu-user libc6-arm64-cross); "
                    ".ci/run installs it")
    try:
        return sparsecc.export.fetch_iree_run_module("aarch64")
    except RuntimeError as e:
        pytest.skip(f"cannot fetch the aarch64 iree-run-module: {e}")


TUNED = ["host", "x86_64", "x86_64:host", "aarch64", "aarch64:cortex-a76"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(path, batches) of a small sparse transformer saved with a generic and a CPU-tuned module for x86_64 and
    for aarch64: one save (the compiling is what takes time) for the tests below."""
    if platform.machine() != "x86_64":
        pytest.skip(f"compares against x86_64 modules run in process; this machine is {platform.machine()}")
    step = sparse_transformer_step(sparsecc.SGD(0.05, momentum=0.9), d=16, heads=2, layers=1, seq=8, vocab=24)
    return sparsecc.save(step, tmp_path_factory.mktemp("tuned") / "edge.sparsecc", targets=TUNED), batches(2, 24, (2, 8))


def _assert_same_training(runners: dict, data, rtol=1e-5, atol=1e-5):
    """Every runner gives the first one's forward, losses and trained parameters."""
    (_, ref), *others = runners.items()
    for name, r in others:
        torch.testing.assert_close(r(data[0][0]), ref(data[0][0]), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for x, y in data:
        want = ref.train_step(x, y)
        for name, r in others:
            torch.testing.assert_close(r.train_step(x, y), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for name, r in others:
        for p, value in r.parameters().items():
            torch.testing.assert_close(value, ref.parameters()[p], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name} {p}: {m}")
        torch.testing.assert_close(r(data[1][0]), ref(data[1][0]), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_x86_module_tuned_for_this_cpu_trains_like_the_generic_one_and_the_host(tuned):
    path, data = tuned
    manifest, files = archive.read(path)
    assert manifest["targets"] == TUNED
    assert {"programs/x86_64-host/train_step.vmfb", "programs/aarch64-cortex-a76/forward.vmfb"} <= set(files)
    assert manifest["cpu_flags"]["aarch64:cortex-a76"] == sorted(sparsecc.export.iree.CPUS["aarch64"]["cortex-a76"])
    _assert_same_training({t: sparsecc.load(path, target=t) for t in ("x86_64:host", "x86_64", "host")}, data)


def test_a_module_tuned_for_features_this_machine_lacks_is_refused(tuned, monkeypatch):
    path, _ = tuned
    needed = archive.read(path)[0]["cpu_flags"]["x86_64:host"]
    assert "sse4_2" in needed                       # x86-64-v2, which any x86_64 CI machine has
    monkeypatch.setattr(sparsecc.export.iree, "_machine_flags", lambda: set(needed) - {"sse4_2"})
    with pytest.raises(sparsecc.ConfigError, match="x86_64:host module needs CPU features this machine lacks "
                                                   r"\(not in /proc/cpuinfo: sse4_2\) and would crash with SIGILL"):
        sparsecc.load(path, target="x86_64:host")
    sparsecc.load(path, target="x86_64")            # the generic module needs nothing beyond x86_64


def test_aarch64_modules_under_qemu_match_x86(tuned):
    """The generic and the Cortex-A76 aarch64 modules under qemu-aarch64 (-cpu max and -cpu cortex-a76: qemu's
    model of that core, so an instruction it lacks would fail here) train like the x86_64 module."""
    path, data = tuned
    tool = _aarch64_tool()
    assert sparsecc.export.iree._qemu_cpu(shutil.which("qemu-aarch64"), "cortex-a76") == ["-cpu", "cortex-a76"]
    _assert_same_training({"x86_64": sparsecc.load(path, target="x86_64"),
                           **{t: sparsecc.load(path, target=t, iree_run_module=tool)
                              for t in ("aarch64", "aarch64:cortex-a76")}}, data)


def test_cli_runs_a_tuned_target_and_names_the_artifacts_targets(tuned, tmp_path, capsys):
    from sparsecc import cli
    path, data = tuned
    np.savez(tmp_path / "b.npz", x=np.stack([x.numpy() for x, _ in data]), y=np.stack([y.numpy() for _, y in data]))
    args = ["run", str(path), "--data", str(tmp_path / "b.npz"), "--steps", "2", "--no-save", "--target"]
    assert cli.main(args + ["x86_64:host"]) == 0
    assert "trained 2 steps on x86_64:host" in capsys.readouterr().out
    assert cli.main(args + ["x86_64:hots"]) == 2
    err = capsys.readouterr().err
    assert f"holds targets {TUNED}, not 'x86_64:hots'. Did you mean: 'x86_64:host'" in err, err


def test_target_names_are_checked_before_anything_is_compiled(small, tmp_path, monkeypatch):
    from sparsecc.export import iree
    from sparsecc.export.artifact import _program_file
    path, _, _, step = small
    assert iree.split("x86_64") == ("x86_64", "generic")
    assert iree.split("aarch64:cortex-a76") == ("aarch64", "cortex-a76")
    assert _program_file("x86_64:x86-64-v3", "forward") == "programs/x86_64-x86-64-v3/forward.vmfb"
    monkeypatch.setattr(sparsecc.export.programs, "train_step_program", lambda *a: pytest.fail("exported"))
    bad = {"arm64:cortex-a76": "'arm64' is not a CPU architecture.*Did you mean: 'aarch64'",
           "x86_64:skylake": "no CPU 'skylake' for x86_64; known: x86-64-v2, x86-64-v3, x86-64-v4, or 'host'",
           "aarch64:cortex-a67": "no CPU 'cortex-a67' for aarch64.*Did you mean: 'cortex-a76'",
           "x86_64:X86-64-V3": "Did you mean: 'x86-64-v3'",
           "x86_64:": "no CPU '' for x86_64",
           "host:x86-64-v3": "'host' .torch.export programs. takes no CPU",
           "riscv64:host": f"means the CPU of the machine that saves, but this machine is {platform.machine()}; "
                           f"for riscv64 name one of sifive-u74, spacemit-x60"}
    for target, message in bad.items():
        with pytest.raises(sparsecc.ConfigError, match=message):
            sparsecc.save(step, tmp_path / "no.sparsecc", targets=["host", "x86_64", target])
    assert not (tmp_path / "no.sparsecc").exists()
    with pytest.raises(sparsecc.ConfigError, match=r"holds targets \['host'\], not 'x86_64:host'"):
        sparsecc.load(path, target="x86_64:host")
    assert iree._cpu_flags("processor\t: 0\nisa\t\t: rv64imafdcv_zba_zbb\n") == {*"imafdcv", "zba", "zbb"}
    assert iree._cpu_flags("Features\t: fp asimd atomics\n") == {"fp", "asimd", "atomics"}


def test_each_cpu_target_module_is_built_for_its_machine(tmp_path):
    """Each .vmfb embeds the ELF of its dispatch code: its e_machine must be the target's architecture's."""
    import struct
    torch.manual_seed(0)
    model = MLP(d_in=8, hidden=16, d_out=4)
    sparsecc.sparsify(model, sparsecc.Sparsity({"fc2.weight": sparsecc.Blocks(8, 0.5)}))
    x, y = torch.randn(4, 8), torch.randn(4, 4)
    step = sparsecc.compile_train_step(model, F.mse_loss, optimizer=sparsecc.SGD(0.1), update=US.full(),
                                       example_inputs=(x, y), executor="eager")
    targets = ["x86_64", "aarch64", "riscv64", "x86_64:x86-64-v3", "riscv64:spacemit-x60"]
    manifest, files = archive.read(sparsecc.save(step, tmp_path / "m.sparsecc", targets=targets))
    assert manifest["targets"] == targets
    for target in targets:
        machine = {"x86_64": 62, "aarch64": 183, "riscv64": 243}[target.partition(":")[0]]
        for fn in ("train_step", "forward"):
            module = files[f"programs/{target.replace(':', '-')}/{fn}.vmfb"]
            elf = module.find(b"\x7fELF")
            assert elf > 0 and struct.unpack("<H", module[elf + 18:elf + 20])[0] == machine, (target, fn)


# ---- robustness ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(path, bytes, batch, step) of a saved MLP step with a sparse weight (host target)."""
    torch.manual_seed(0)
    model = MLP(d_in=8, hidden=64, d_out=4)
    sparsecc.sparsify(model, sparsecc.Sparsity({"fc2.weight": sparsecc.NM(2, 4)}))
    x, y = torch.randn(5, 8), torch.randn(5, 4)
    step = sparsecc.compile_train_step(model, F.mse_loss, optimizer=sparsecc.AdamW(1e-2),
                                       update=US({"fc2.*": "full", "fc3.bias": "full"}), example_inputs=(x, y),
                                       executor="eager", cost_model="off")
    path = sparsecc.save(step, tmp_path_factory.mktemp("small") / "m.sparsecc")
    return path, path.read_bytes(), (x, y), step


def _rewrite(src: bytes, dst, *, manifest=None, replace=None):
    """Copy an artifact's members to dst, optionally changing the manifest (a function of it) or members."""
    zin = zipfile.ZipFile(io.BytesIO(src))
    members = {i.filename: zin.read(i.filename) for i in zin.infolist()}
    members.update(replace or {})
    if manifest is not None:
        members["manifest.json"] = json.dumps(manifest(json.loads(members["manifest.json"]))).encode()
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    return dst


def _resign(m, name, data):
    m["files"][name] = {"sha256": archive.digest(data), "bytes": len(data)}
    return m


def test_truncated_artifact(small, tmp_path):
    _, blob, _, _ = small
    for cut in (len(blob) // 2, len(blob) - 10, 100):
        (tmp_path / "t.sparsecc").write_bytes(blob[:cut])
        with pytest.raises(sparsecc.ArtifactError, match="t.sparsecc: not a readable artifact"):
            sparsecc.load(tmp_path / "t.sparsecc")


def _unchanged(archive_bytes: bytes, name: str, original: bytes) -> bool:
    """True when a damaged archive still yields the member's original bytes (a flipped padding bit of a
    deflate stream changes nothing)."""
    try:
        return zipfile.ZipFile(io.BytesIO(archive_bytes)).read(name) == original
    except Exception:     # noqa: BLE001 (any failure means the damage shows)
        return False


def test_a_flipped_byte_in_any_file_is_caught_and_named(small, tmp_path):
    _, blob, _, _ = small
    zf = zipfile.ZipFile(io.BytesIO(blob))
    for info in zf.infolist():
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        for where in (start, start + info.compress_size // 2, start + info.compress_size - 1):
            bad = bytearray(blob)
            bad[where] ^= 0x01
            if _unchanged(bytes(bad), info.filename, zf.read(info.filename)):
                continue
            (tmp_path / "f.sparsecc").write_bytes(bad)
            with pytest.raises(sparsecc.ArtifactError, match=info.filename.replace(".", r"\.")):
                sparsecc.load(tmp_path / "f.sparsecc")
        if info.filename != "manifest.json":    # the same flip written as a fresh member: its sha256 catches it
            data = bytearray(zf.read(info.filename))
            data[len(data) // 2] ^= 0x01
            with pytest.raises(sparsecc.ArtifactError, match=f"{info.filename.replace('.', '[.]')} fails its sha256"):
                sparsecc.load(_rewrite(blob, tmp_path / "g.sparsecc", replace={info.filename: bytes(data)}))


def test_wrong_sha256_unknown_version_and_paths_outside(small, tmp_path):
    _, blob, _, _ = small
    p = tmp_path / "x.sparsecc"

    def sha(m):
        m["files"]["weights.safetensors"]["sha256"] = "0" * 64
        return m
    with pytest.raises(sparsecc.ArtifactError, match="weights.safetensors fails its sha256"):
        sparsecc.load(_rewrite(blob, p, manifest=sha))
    with pytest.raises(sparsecc.ArtifactError, match="format version 99 is not supported"):
        sparsecc.load(_rewrite(blob, p, manifest=lambda m: {**m, "format_version": 99}))
    for outside in ("../escape.bin", "/etc/passwd", "programs/../../x"):
        with pytest.raises(sparsecc.ArtifactError, match="outside the artifact"):
            sparsecc.load(_rewrite(blob, p, manifest=lambda m: _resign(m, outside, b"x")))
    with pytest.raises(sparsecc.ArtifactError, match="stray.bin is in the artifact but not in manifest.json"):
        sparsecc.load(_rewrite(blob, p, replace={"stray.bin": b"x"}))
    with pytest.raises(sparsecc.ArtifactError, match="missing or malformed"):
        sparsecc.load(_rewrite(blob, p, manifest=lambda m: {**m, "functions": {}}))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("member", ["weights.safetensors", "programs/host/train_step.json"])
def test_a_pickle_payload_is_never_run(small, tmp_path, member):
    import pickle
    _, blob, _, _ = small
    marker = tmp_path / "pwned"
    for payload in (pickle.dumps(_Payload(marker)), _torch_save_bytes(_Payload(marker))):
        p = _rewrite(blob, tmp_path / "p.sparsecc", replace={member: payload},
                     manifest=lambda m: _resign(m, member, payload))
        with pytest.raises(sparsecc.ArtifactError, match=member.replace(".", r"\.")):
            sparsecc.load(p)
        assert not marker.exists()


def _torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save({"state": obj}, buf)
    return buf.getvalue()


SAVER = """
import sys, sparsecc
runner = sparsecc.load(sys.argv[1])
print("loaded", flush=True)
while True:
    runner.tensors["step"] += 1
    runner.save()
"""


def test_killing_a_save_midway_leaves_a_loadable_artifact(small, tmp_path):
    _, blob, (x, y), _ = small
    path = tmp_path / "k.sparsecc"
    path.write_bytes(blob)
    for delay in (0.05, 0.13, 0.31, 0.47):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "loaded"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        runner = sparsecc.load(path)           # the previous or the new artifact, never a torn one
        assert runner.train_step(x, y).isfinite()


def test_bad_save_and_load_requests_change_nothing(small, tmp_path):
    path, _, (x, y), step = small
    with pytest.raises(sparsecc.ConfigError, match="saving a model .OptimizedModule. needs optimizer=, example_inputs= and loss_fn="):
        sparsecc.save(torch.compile(MLP(), backend="sparsecc"), tmp_path / "no.sparsecc")
    with pytest.raises(sparsecc.ConfigError, match="a TrainStep from sparsecc.compile_train_step or a model, got dict"):
        sparsecc.save({}, tmp_path / "no.sparsecc")
    with pytest.raises(sparsecc.ConfigError, match="unknown target 'arm64'.*Did you mean: 'aarch64'"):
        sparsecc.save(step, tmp_path / "no.sparsecc", targets=["host", "arm64"])
    runner = sparsecc.load(path)
    with pytest.raises(sparsecc.ConfigError, match=r"holds targets \['host'\], not 'aarch64'"):
        sparsecc.load(path, target="aarch64")
    before = {k: v.clone() for k, v in runner.tensors.items()}      # before the rejected calls
    with pytest.raises(sparsecc.ConfigError, match=r"input/0 is torch.float32 \[3, 8\].*\[5, 8\]"):
        runner.train_step(torch.randn(3, 8), y)
    with pytest.raises(sparsecc.ConfigError, match="structured as"):
        runner.train_step((x, x), y)
    with pytest.raises(sparsecc.ConfigError, match="lr must be a number >= 0, got -1"):
        runner.set_lr(-1)
    assert torch.equal(runner.tensors["step"], before["step"])     # a rejected batch does not advance the step
    assert runner.tensors.keys() == before.keys()
    assert all(torch.equal(v, runner.tensors[k]) for k, v in before.items())
    assert not (tmp_path / "no.sparsecc").exists()


def test_host_programs_under_inductor_match_eager(small):
    path, _, (x, y), _ = small
    eager, compiled = sparsecc.load(path), sparsecc.load(path, executor="inductor")
    for _ in range(2):
        torch.testing.assert_close(compiled.train_step(x, y), eager.train_step(x, y))
    for name, p in eager.parameters().items():
        torch.testing.assert_close(compiled.parameters()[name], p, msg=name)
    torch.testing.assert_close(compiled(x), eager(x))


def test_a_compiled_model_saves_through_its_training_step(tmp_path):
    """sparsecc.save(torch.compile(model, backend="sparsecc"), ...): the loss, optimizer and scheme given build
    the training step; the runner then trains like compile_train_step on an identical model."""
    torch.manual_seed(0)
    model = MLP(d_in=8, hidden=16, d_out=4)
    twin = MLP(d_in=8, hidden=16, d_out=4)
    twin.load_state_dict(model.state_dict())
    scheme = US({"fc1.bias": "full", "fc3.*": "full"})
    compiled = torch.compile(model, backend="sparsecc", options={"update": scheme})
    x, y = torch.randn(5, 8), torch.randn(5, 4)
    path = sparsecc.save(compiled, tmp_path / "c.sparsecc", loss_fn=F.mse_loss, optimizer=sparsecc.SGD(0.1),
                         update=scheme, example_inputs=(x, y))
    runner = sparsecc.load(path)
    step = sparsecc.compile_train_step(twin, F.mse_loss, optimizer=sparsecc.SGD(0.1), update=scheme,
                                       example_inputs=(x, y), executor="eager")
    for _ in range(2):
        torch.testing.assert_close(runner.train_step(x, y), step(x, y))
    assert [p["update"] for p in runner.manifest["parameters"]] == ["frozen", "full", "frozen", "frozen", "full", "full"]


def test_set_lr_reaches_the_program_and_the_saved_artifact(small, tmp_path):
    path, _, (x, y), _ = small
    runner = sparsecc.load(path)
    before = {n: p.clone() for n, p in runner.parameters().items()}
    runner.set_lr(0.0)
    runner.train_step(x, y)                  # AdamW with lr 0: nothing moves, weight decay included
    assert all(torch.equal(p, before[n]) for n, p in runner.parameters().items())
    assert float(sparsecc.load(runner.save(tmp_path / "lr0.sparsecc")).tensors["lr"]) == 0.0


# ---- command line ---------------------------------------------------------------------------------------

def test_cli_inspect_and_run(small, tmp_path):
    path, blob, (x, y), _ = small
    art = tmp_path / "cli.sparsecc"
    art.write_bytes(blob)
    cli = [sys.executable, "-m", "sparsecc.cli"]
    shown = subprocess.run(cli + ["inspect", str(art)], capture_output=True, text=True, check=True).stdout
    assert "targets: host" in shown and "nm:2:4" in shown and "fc2.weight" in shown and "weights.safetensors" in shown
    code = subprocess.run(cli + ["inspect", str(art), "--graph", "train_step"], capture_output=True, text=True,
                          check=True).stdout
    assert "param/fc2.weight" in code and "index/fc2.weight" in code and "torch.ops.aten.index_put.default" in code
    assert "torch.ops.aten.mm.default" in code and "kernel/fc2.weight/col" in code     # fc2 on the N:M kernels:
    assert "torch.ops.sparsecc.nm_mm.default" in code and "torch.ops.sparsecc.nm_sddmm.default" in code
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 4, generator=g)
    np.savez(tmp_path / "b.npz", x=xs.numpy(), y=ys.numpy())
    run = subprocess.run(cli + ["run", str(art), "--data", str(tmp_path / "b.npz"), "--steps", "6"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "step 6/6" in run.stderr and "trained 6 steps on host" in run.stdout
    reference = sparsecc.load(path)
    for i in range(6):
        reference.train_step(xs[i % 4], ys[i % 4])
    trained = sparsecc.load(art)
    for name, p in reference.parameters().items():
        torch.testing.assert_close(trained.parameters()[name], p, msg=name)
    bad = subprocess.run(cli + ["run", str(art), "--data", str(path), "--steps", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "must hold arrays 'x'" in bad.stderr
    assert art.read_bytes() == trained.path.read_bytes()          # a failed run leaves the artifact alone
