"""Per-level standardization: statistics from the data, and exact maps to and from the unit scale."""

import torch

from apm.standardize import LevelStandardizer


def test_levels_of_very_different_scales_become_unit_scale():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(6, 5, 5, 8, generator=g) * 0.01 + 3.0
    large = torch.randn(6, 3, 3, 4, generator=g) * 500.0 - 20.0
    st = LevelStandardizer([8, 4])
    assert not bool(st.ready)
    st.update([small[:2], large[:2]])
    st.update([small[2:], large[2:]])  # accumulates over batches
    st.finalize()
    assert bool(st.ready)
    for i, f in enumerate([small, large]):
        flat = f.reshape(-1, f.shape[-1]).double()
        torch.testing.assert_close(st.mean(i).double(), flat.mean(0), rtol=1e-5, atol=1e-6)
        z = st.encode(i, f)
        assert abs(z.reshape(-1, f.shape[-1]).mean(0)).max() < 1e-3
        assert abs(z.pow(2).mean().sqrt() - 1) < 1e-3  # unit RMS per level
        torch.testing.assert_close(st.decode(i, z), f, rtol=1e-4, atol=1e-3 * f.abs().max().item())


def test_statistics_travel_in_the_state_dict():
    st = LevelStandardizer([3])
    st.update([torch.arange(12.0).reshape(4, 3)])
    st.finalize()
    other = LevelStandardizer([3])
    other.load_state_dict(st.state_dict())
    assert bool(other.ready)
    torch.testing.assert_close(other.mean(0), st.mean(0))
    torch.testing.assert_close(other.std(0), st.std(0))


def test_module_computes_statistics_from_the_teacher_on_training_images(astronaut_224):
    from apm.module import APMModule

    m = APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=224,
                  hidden_dims=[32], pe_dim=16, level_dim=4, stats_images=1)
    m.fit_statistics([astronaut_224])
    feats = m.targets(astronaut_224)
    for i, f in enumerate(feats):
        z = m.standardizer.encode(i, f)
        assert abs(z.mean()) < 1e-3 and abs(z.pow(2).mean() - 1) < 1e-3, m.levels[i].name
