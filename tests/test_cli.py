"""The `sparsecc` command as a newcomer meets it: --help and inspect start without importing torch, a reader that
closes the pipe (`| head`) ends it quietly, artifacts are ordinary files (umask), and a save warns about nothing."""
import importlib.metadata
import os
import stat
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc import cli
from sparsecc.export import archive, artifact, layouts
from models import MLP


def python(code: str, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small saved training step (host programs), and the warnings recorded while saving it."""
    torch.manual_seed(0)
    model = MLP(d_in=8, hidden=32, d_out=4)
    sparsecc.sparsify(model, sparsecc.Sparsity({"fc2.weight": sparsecc.NM(2, 4)}))
    x, y = torch.randn(5, 8), torch.randn(5, 4)
    step = sparsecc.compile_train_step(model, F.mse_loss, optimizer=sparsecc.SGD(0.1),
                                       update=sparsecc.UpdateScheme({"fc2.*": "full", "fc3.bias": "full"}),
                                       example_inputs=(x, y), executor="eager")
    step(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = sparsecc.save(step, tmp_path_factory.mktemp("cli") / "m.sparsecc")
    return path, caught


def test_help_and_import_sparsecc_do_not_import_torch():
    out = python("""
        import sys
        import sparsecc
        from sparsecc.cli import main
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "safetensors", "triton"))
        assert not heavy, heavy
        print("LIGHT")
    """)
    assert out.returncode == 0, out.stderr
    assert "LIGHT" in out.stdout and "inspect" in out.stdout


def test_console_entry_point_is_the_lazy_main():
    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "sparsecc"]
    assert ep.value == "sparsecc.cli:main"
    out = python("""
        import importlib.metadata, sys
        (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "sparsecc"]
        ep.load()
        assert "torch" not in sys.modules
    """)
    assert out.returncode == 0, out.stderr


def test_inspect_reads_an_artifact_without_torch(saved):
    path, _ = saved
    out = python("""
        import sys
        from sparsecc.cli import inspect
        text = inspect(sys.argv[1])
        assert "torch" not in sys.modules
        print(text)
    """, path)
    assert out.returncode == 0, out.stderr
    assert "targets: host" in out.stdout and "fc2.weight" in out.stdout and "nm:2:4" in out.stdout
    assert "trained for 1 steps" in out.stdout
    assert cli.WEIGHTS == artifact.WEIGHTS and cli.DENSE == layouts.DENSE     # the torch-free copies agree


def test_inspect_rejects_a_weights_file_that_is_not_safetensors(saved, tmp_path):
    path, _ = saved
    manifest, files = archive.read(path)
    files[artifact.WEIGHTS] = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......}"
    archive.write(tmp_path / "bad.sparsecc", {k: v for k, v in manifest.items() if k != "files"}, files)
    with pytest.raises(archive.ArtifactError, match="is not a valid safetensors file"):
        cli.inspect(str(tmp_path / "bad.sparsecc"))


def test_a_closed_pipe_ends_the_command_quietly(saved):
    """`sparsecc inspect x --json | head`: head exits early; no BrokenPipeError traceback."""
    path, _ = saved
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "sparsecc.cli", "inspect", str(path), "--json"], stdout=write,
                            stderr=subprocess.PIPE)
    os.close(write)
    os.close(read)                      # the reader is gone before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_saving_warns_about_nothing(saved):
    _, caught = saved
    assert not [str(w.message) for w in caught]


def test_artifacts_are_ordinary_files(saved, tmp_path):
    path, _ = saved
    old = os.umask(0o027)
    try:
        archive.write(tmp_path / "a.sparsecc", {}, {"x.json": b"{}"})
        assert stat.S_IMODE(os.stat(tmp_path / "a.sparsecc").st_mode) == 0o640      # 0666 less the umask
        os.chmod(tmp_path / "a.sparsecc", 0o600)
        archive.write(tmp_path / "a.sparsecc", {}, {"x.json": b"{}"})              # overwriting keeps the mode
        assert stat.S_IMODE(os.stat(tmp_path / "a.sparsecc").st_mode) == 0o600
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~old


def test_example_output_is_ignored_by_git():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = open(os.path.join(root, ".gitignore")).read().split()
    assert "deploy_out/" in lines and "*.html" in lines     # examples/deploy_edge.py's folder, the reports
