"""A sparse weight's stored index, tampered with and the artifact re-signed (sha256 in the manifest and fresh zip
CRCs), so that every integrity check passes and only the index validation at load can reject it."""
import io
import json
import math
import re
import warnings
import zipfile

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.export import archive
from models import MLP

WEIGHTS = "weights.safetensors"
SPEC = sparsecc.Sparsity({"fc1.weight": sparsecc.NM(2, 4),               # [16, 8]:  uint8 offsets in groups of 4
                          "fc2.weight": sparsecc.Blocks(8, 0.5),         # [16, 16]: int32 ids of 2 of 4 blocks
                          "fc3.weight": sparsecc.Unstructured(0.3)})     # [8, 16]:  int32 flat positions


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(artifact bytes, batch) of a saved MLP step with one weight of each sparse layout."""
    torch.manual_seed(0)
    model = MLP(d_in=8, hidden=16, d_out=8)
    sparsecc.sparsify(model, SPEC)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    step = sparsecc.compile_train_step(model, F.mse_loss, optimizer=sparsecc.SGD(0.1), update=sparsecc.UpdateScheme.full(),
                                       example_inputs=(x, y), executor="eager")
    return sparsecc.save(step, tmp_path_factory.mktemp("index") / "m.sparsecc").read_bytes(), (x, y)


def resigned(blob: bytes, path, change) -> str:
    """The artifact with change(tensors) applied to its weights file, re-signed (rewritten)."""
    def edit(files):
        tensors = safetensors.torch.load(files[WEIGHTS])
        change(tensors)
        files[WEIGHTS] = safetensors.torch.save(tensors)
    return rewritten(blob, path, edit_files=edit)


def setter(name, edit):
    """A change that replaces tensors[f"index/{name}"] with edit(a copy of it)."""
    def change(tensors):
        tensors[f"index/{name}"] = edit(tensors[f"index/{name}"].clone())
    return change


def at(i, value):
    def edit(t):
        t[i] = value
        return t
    return edit


def swap(i, j):
    def edit(t):
        t[[i, j]] = t[[j, i]]
        return t
    return edit


def test_stored_indices_are_what_the_layouts_say(saved):
    blob, _ = saved
    tensors = safetensors.torch.load(zipfile.ZipFile(io.BytesIO(blob)).read(WEIGHTS))
    nm, blocks, flat = tensors["index/fc1.weight"], tensors["index/fc2.weight"], tensors["index/fc3.weight"]
    assert nm.dtype == torch.uint8 and nm.numel() == 16 * 8 // 2 and int(nm.max()) < 4
    assert blocks.dtype == torch.int32 and blocks.numel() == 2 and int(blocks.max()) < 4
    assert flat.dtype == torch.int32 and flat.numel() == math.ceil(0.3 * 128) and bool((flat[1:] > flat[:-1]).all())


def test_a_resigned_artifact_with_its_own_indices_loads_and_trains(saved, tmp_path):
    """The control: re-signing alone changes nothing, so the rejections below are the index checks' doing."""
    blob, (x, y) = saved
    runner = sparsecc.load(resigned(blob, tmp_path / "same.sparsecc", lambda tensors: None))
    assert torch.isfinite(runner.train_step(x, y))


BAD = {
    "unstructured: a position past the end": ("fc3.weight", "unstructured", at(-1, 8 * 16)),
    "unstructured: a negative position": ("fc3.weight", "unstructured", at(0, -1)),
    "unstructured: a position twice": ("fc3.weight", "unstructured", lambda t: at(1, int(t[0]))(t)),
    "unstructured: out of order": ("fc3.weight", "unstructured", swap(0, 1)),
    "nm: offsets out of order in a group": ("fc1.weight", "nm:2:4", swap(0, 1)),
    "nm: an offset beyond the weight": ("fc1.weight", "nm:2:4", at(-1, 200)),
    "nm: an entry missing": ("fc1.weight", "nm:2:4", lambda t: t[:-1]),
    "blocks: a block outside the grid": ("fc2.weight", "blocks:8", at(1, 4)),          # the grid is 2x2
    "blocks: a negative block": ("fc2.weight", "blocks:8", at(0, -1)),
    "blocks: a block twice": ("fc2.weight", "blocks:8", lambda t: at(1, int(t[0]))(t)),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_index_is_rejected_at_load(saved, tmp_path, case):
    blob, _ = saved
    name, layout, edit = BAD[case]
    path = resigned(blob, tmp_path / "bad.sparsecc", setter(name, edit))
    archive.read(path)                                  # the integrity checks pass: only the index is wrong
    with pytest.raises(sparsecc.ArtifactError, match=rf"holds no valid {layout} index for {name}") as error:
        sparsecc.load(path)
    if case.startswith("blocks: a block outside"):      # caught by the grid check, before the positions are made
        assert "outside the 2x2 block grid" in str(error.value)


def offset_into_the_next_group(t):
    """An nm:2:4 index where one offset is >= 4, i.e. points into the next group, while every position stays
    strictly increasing and inside the weight (group i's last entry moved just before group i+1's first)."""
    groups = t.view(-1, 2)
    i = next(i for i in range(len(groups) - 1) if groups[i + 1, 0] >= 1)
    groups[i, 1] = 4 + groups[i + 1, 0] - 1
    return t


def test_an_nm_offset_into_the_next_group_is_rejected(saved, tmp_path):
    blob, _ = saved
    path = resigned(blob, tmp_path / "nm.sparsecc", setter("fc1.weight", offset_into_the_next_group))
    with pytest.raises(sparsecc.ArtifactError, match=r"holds no valid nm:2:4 index for fc1\.weight"):
        sparsecc.load(path)


def rewritten(blob: bytes, path, edit_manifest=lambda m: None, edit_files=lambda f: None):
    """The artifact with its manifest and member files edited, every digest updated: it passes every integrity
    check."""
    zin = zipfile.ZipFile(io.BytesIO(blob))
    members = {i.filename: zin.read(i.filename) for i in zin.infolist()}
    edit_files(members)
    manifest = json.loads(members["manifest.json"])
    edit_manifest(manifest)
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": archive.digest(members[name]), "bytes": len(members[name])}
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    return path


def test_an_artifact_of_another_torch_release_says_so(saved, tmp_path):
    blob, (x, y) = saved
    older = lambda m: m.update(torch_version="2.9.1")
    path = rewritten(blob, tmp_path / "old.sparsecc", older)
    with pytest.warns(UserWarning, match=rf"saved by torch 2\.9\.1 and this is torch {re.escape(torch.__version__)}"):
        runner = sparsecc.load(path)
    assert torch.isfinite(runner.train_step(x, y))         # readable after all: only a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # this torch: no warning
        sparsecc.load(rewritten(blob, tmp_path / "same.sparsecc"))

    def truncate(files):
        files["programs/host/train_step.json"] = files["programs/host/train_step.json"][:100]
    path = rewritten(blob, tmp_path / "bad.sparsecc", older, truncate)
    with pytest.warns(UserWarning), pytest.raises(sparsecc.ArtifactError,
                                                  match=r"not a valid torch.export program .*saved by torch 2\.9\.1"):
        sparsecc.load(path).train_step(x, y)
