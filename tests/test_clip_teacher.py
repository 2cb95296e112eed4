"""The CLIP teacher (open_clip): levels, token alignment (class token removed), the global level
against ``encode_image``, the zero-shot text side with the real tokenizer, offline errors and seeded
random weights. A tiny random CLIP (3 blocks, width 64, patch 16) at 64x64: a 4x4 grid."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import open_clip
from apm.errors import ConfigError, TeacherUnavailableError
from teachers import create_teacher
from teachers.clip import TINY_CONFIG, imagenet_templates, text_classifier, zero_shot_logits

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tiny():
    return create_teacher("clip_tiny", image_size=64, levels=["embed", "block1", "block2", "block3",
                                                              "global"])


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    from apm.data import image_transform, skimage_photo

    return torch.stack([image_transform(64)(skimage_photo(n)) for n in ("astronaut", "coffee")])


def test_levels_are_the_blocks_and_the_global_embedding():
    t = create_teacher("clip_tiny", image_size=64)
    assert t.patch_size == 16
    assert [(l.name, l.grid, l.dim) for l in t.levels] == [
        ("block1", (4, 4), 64), ("block2", (4, 4), 64), ("block3", (4, 4), 64), ("global", (1, 1), 32)]
    assert [tuple(f.shape) for f in t(torch.rand(2, 3, 64, 64))] == [(2, 4, 4, 64)] * 3 + [(2, 1, 1, 32)]
    assert t.describe()["prefix_tokens"] == 1
    picked = create_teacher("clip_tiny", image_size=64, levels=[0, -1, "block2"])
    assert [l.name for l in picked.levels] == ["embed", "global", "block2"]
    f = picked(torch.rand(1, 3, 64, 64))
    assert [tuple(x.shape) for x in f] == [(1, 4, 4, 64), (1, 1, 1, 32), (1, 4, 4, 64)]


@pytest.mark.parametrize("row, col", [(1, 2), (0, 0), (3, 3)])
def test_perturbing_one_patch_changes_only_its_embedding_token(tiny, row, col):
    """Keeping the class token (or slicing one place off) moves the changed token or loses the
    last patch; the first block already mixes every token through attention."""
    x = torch.rand(1, 3, 64, 64)
    p = tiny.patch_size
    y = x.clone()
    y[..., row * p:(row + 1) * p, col * p:(col + 1) * p] = torch.rand(3, p, p)
    fx, fy = tiny(x), tiny(y)
    changed = (fx[0][0] - fy[0][0]).abs().amax(-1) > 1e-6
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[row, col] = True
    assert torch.equal(changed, expected)
    assert ((fx[1][0] - fy[1][0]).abs().amax(-1) > 1e-6).sum() > 1


def test_tokens_equal_a_manual_pass_without_the_class_token(tiny, photos):
    v = tiny.model.visual
    with torch.no_grad():
        h = rearrange(v.conv1((photos - MEAN) / STD), "b d h w -> b (h w) d")
        cls = v.class_embedding.expand(h.shape[0], 1, -1)
        h = v.ln_pre(torch.cat([cls, h], dim=1) + v.positional_embedding)
        manual = [h[:, 1:]]
        for blk in v.transformer.resblocks:
            h = blk(h)
            manual.append(h[:, 1:])
    assert h.shape[1] == 1 + 16
    for got, want in zip(tiny(photos)[:4], manual, strict=True):
        torch.testing.assert_close(got, rearrange(want, "b (h w) d -> b h w d", h=4))


@pytest.mark.parametrize("levels", [["global"], ["block1", "global"], None])
def test_global_level_is_encode_image(photos, levels):
    t = create_teacher("clip_tiny", image_size=64, levels=levels)
    with torch.no_grad():
        want = t.model.encode_image((photos - MEAN) / STD)  # projected, not normalized
    got = t(photos)[-1]
    assert got.shape == (2, 1, 1, 32)
    torch.testing.assert_close(got[:, 0, 0], want)
    assert not torch.allclose(want.norm(dim=-1), torch.ones(2))


def test_the_real_tokenizer_ships_with_open_clip(tiny):
    """Offline (tests/conftest.py sets HF_HUB_OFFLINE): OpenAI's BPE, 49408 tokens, context 77."""
    ids = tiny.tokenize(["a photo of a dog.", "a photo of a cat."])
    assert ids.shape == (2, 77)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]  # <start> ... <end>
    assert ids[1, 5] != ids[0, 5] and len(tiny._tokenizer.encoder) == 49408


def test_text_classifier_is_clip_prompt_ensembling(tiny):
    names = ["golden retriever", "espresso", "astronaut"]
    w = text_classifier(tiny, names)
    assert w.shape == (3, 32) and len(imagenet_templates()) == 80
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(3))
    assert (w @ w.T - torch.eye(3)).abs().amax() > 1e-3  # rows differ
    # one row, independently: open_clip's module-level tokenize, encode, normalize, mean, normalize
    prompts = [f"a photo of a {names[1]}.", f"a sketch of the {names[1]}."]
    with torch.no_grad():
        e = F.normalize(tiny.model.encode_text(open_clip.tokenize(prompts)), dim=-1)
    row = F.normalize(e.mean(0), dim=-1)
    templates = ["a photo of a {}.", lambda c: f"a sketch of the {c}."]
    torch.testing.assert_close(text_classifier(tiny, names, templates)[1], row)
    with pytest.raises(ConfigError, match="has no"):
        text_classifier(tiny, names, ["a photo of a dog."])


def test_zero_shot_logits_are_100_times_the_cosine(tiny, photos):
    emb = tiny(photos)[-1]  # (2, 1, 1, 32)
    classifier = F.normalize(torch.randn(5, 32), dim=-1)
    logits = zero_shot_logits(emb, classifier)
    assert logits.shape == (2, 1, 1, 5)
    want = 100 * F.cosine_similarity(emb[:, 0, 0, None], classifier[None], dim=-1)
    torch.testing.assert_close(logits[:, 0, 0], want)


def test_pretrained_weights_offline_give_one_paragraph(tmp_path):
    with pytest.raises(TeacherUnavailableError) as e:
        create_teacher("clip_vit_b16", image_size=224, cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "'ViT-B-16'" in msg and "'openai'" in msg
    assert "model.teacher_args.weights" in msg and "pretrained: false" in msg and "HF_HOME" in msg


def test_a_local_weights_file_loads_and_a_mismatched_one_is_named(tmp_path, tiny, photos):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    kw = dict(model_name="ViT-B-16", weights=str(path), pretrained=True, config_overrides=TINY_CONFIG)
    loaded = create_teacher("clip", image_size=64, levels=[0, 1, 2, 3, 4], **kw)
    for a, b in zip(loaded(photos), tiny(photos), strict=True):
        torch.testing.assert_close(a, b)
    larger = create_teacher("clip", image_size=96, **kw)  # position embedding interpolated 4x4 -> 6x6
    assert [tuple(f.shape) for f in larger(torch.rand(1, 3, 96, 96))] == [(1, 6, 6, 64)] * 3 + [(1, 1, 1, 32)]
    with pytest.raises(TeacherUnavailableError, match="config_overrides"):
        create_teacher("clip", image_size=64, model_name="ViT-B-16", weights=str(path), pretrained=True,
                       config_overrides={**TINY_CONFIG, "embed_dim": 16})


def test_random_weights_are_seeded():
    a, b = (create_teacher("clip_tiny", image_size=64) for _ in range(2))
    c = create_teacher("clip_tiny", image_size=64, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.visual.conv1.weight, c.model.visual.conv1.weight)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="not an open_clip model.*ViT-B-16"):
        create_teacher("clip", model_name="ViT-B-61", pretrained=False)
    with pytest.raises(ConfigError, match="'model.teacher_args.weights'.*laion2b_s32b_b79k"):
        create_teacher("clip", model_name="ViT-H-14", weights="laion9b")
    with pytest.raises(ConfigError, match="ResNet image tower"):
        create_teacher("clip", model_name="RN50", pretrained=False)
    with pytest.raises(ConfigError, match="data.image_size.*patch size 16"):
        create_teacher("clip_tiny", image_size=100)
    with pytest.raises(ConfigError, match="levels"):
        create_teacher("clip_tiny", image_size=64, levels=["block4"])
    with pytest.raises(ConfigError, match="no released weights"):
        create_teacher("clip_tiny", pretrained=True)


def test_the_global_level_standardizes_from_two_or_more_images(photos):
    """The 1x1 level has one location per image: its per-channel mean and scale need >= 2 images
    (with one, the scale is 0, clamped to 1e-6: see docs/clip.md)."""
    from apm.module import APMModule

    m = APMModule(teacher="clip_tiny", teacher_args={"pretrained": False}, image_size=64,
                  hidden_dims=[32], pe_dim=16, level_dim=4, stats_images=2)
    assert [(l.name, l.grid) for l in m.levels][-2:] == [("global", (1, 1)), ("rgb", (4, 4))]
    m.fit_statistics([photos])
    g = [l.name for l in m.levels].index("global")
    z = m.standardizer.encode(g, m.targets(photos)[g])
    assert abs(float(z.pow(2).mean()) - 1) < 1e-4 and float(m.standardizer.std(g)) > 1e-3
    loss, logs = m.distillation_loss(photos, m.targets(photos))
    assert torch.isfinite(loss) and "train/loss_global" in logs
    pred = m.student.dense(photos, ["global"])[0]  # one query, at the image centre
    assert pred.shape == (2, 1, 1, 32)
    centre = m.student.query(photos, g, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(pred[:, 0, 0], centre[:, 0])
