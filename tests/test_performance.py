"""The fast paths compute exactly what the plain ones do: the factorized first layer against the
concatenated query (outputs and every gradient), streamed chunks against one pass, and the
precision default and compile flag wire through."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from apm.precision import autocast, cpu_has_bf16, default_precision
from apm.student import APMStudent
from teachers.base import Level

# Levels on different grids and widths, like a video teacher's, plus the pixel level.
ROOT = Path(__file__).resolve().parents[1]
LEVELS = [Level("a", (4, 4), 6), Level("b", (2, 2), 5), Level("c", (4, 4), 7), Level("rgb", (4, 4), 3)]


def make_student(dtype=torch.float64) -> APMStudent:
    torch.manual_seed(0)
    return APMStudent(LEVELS, image_size=56, patch_size=14, pe_dim=8, level_dim=4,
                      hidden_dims=[16, 12]).to(dtype)


def images(dtype=torch.float64) -> torch.Tensor:
    return torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1)).to(dtype)


def concatenated_forward(s: APMStudent, x: torch.Tensor, locations) -> list[torch.Tensor]:
    """The plain APM forward: the full first layer on [T, PE, E] for every query."""
    col = s.trigger(x)
    out = []
    for lvl, loc in enumerate(locations):
        q = s.query_vectors(col, lvl, s.coords(lvl))  # (B, N, col+pe+level)
        if loc is not None:
            q = q.gather(1, loc[..., None].expand(-1, -1, q.shape[-1]))
        out.append(s.decode(lvl, s.first(q)))
    return out


def grads(s: APMStudent, preds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    s.zero_grad(set_to_none=True)
    w = torch.Generator().manual_seed(2)  # a loss that weighs every output differently
    loss = sum((p * torch.randn(p.shape, generator=w, dtype=p.dtype)).sum() for p in preds)
    loss.backward()
    return {n: p.grad.clone() for n, p in s.named_parameters()}


@pytest.mark.parametrize("sampled", [False, True])
def test_factorized_first_layer_equals_concatenated(sampled):
    s, x = make_student(), images()
    g = torch.Generator().manual_seed(3)
    locs = [torch.randint(0, l.num_locations, (2, 5), generator=g) if sampled else None for l in LEVELS]
    fast = s(x, locs)
    g_fast = grads(s, fast)
    plain = concatenated_forward(s, x, locs)
    g_plain = grads(s, plain)
    for a, b in zip(fast, plain):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert set(g_fast) == {n for n, _ in s.named_parameters()}
    for name in g_fast:
        assert g_fast[name].abs().sum() > 0, name  # every parameter is trained
        torch.testing.assert_close(g_fast[name], g_plain[name], rtol=1e-9, atol=1e-11, msg=name)


def test_factorized_equals_concatenated_float32():
    s, x = make_student(torch.float32), images(torch.float32)
    for a, b in zip(s(x, [None] * len(LEVELS)), concatenated_forward(s, x, [None] * len(LEVELS))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_trigger_folds_normalization_into_the_filter():
    from teachers.base import normalize

    s, x = make_student(), images()
    plain = rearrange(s.column(normalize(x)), "b 1 h w -> b (h w)")
    torch.testing.assert_close(s.trigger(x), plain, rtol=1e-10, atol=1e-12)


def test_dense_shares_positional_term_and_matches_forward():
    s, x = make_student(), images()
    with torch.no_grad():
        full = s(x, [None] * len(LEVELS))
        for chunk in (None, 3):
            for lvl, (d, f) in enumerate(zip(s.dense(x, chunk=chunk), full)):
                torch.testing.assert_close(rearrange(d, "b h w d -> b (h w) d"), f)


def random_queries(n: int, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(LEVELS), (n,), generator=g)
    coords = torch.rand(n, 2, generator=g, dtype=torch.float64)
    coords[::7] = coords[1::7][: len(coords[::7])]  # repeated locations are fine
    return ids, coords


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_streaming_chunks_equal_all_at_once(chunk):
    s, x = make_student(), images()
    ids, coords = random_queries(61)
    with torch.no_grad():
        once = s.predict_queries(x, ids, coords, chunk=len(ids))
        chunked = s.predict_queries(x, ids, coords, chunk=chunk)
        for lvl, (a, b) in enumerate(zip(once, chunked)):
            assert a.shape == (2, int((ids == lvl).sum()), LEVELS[lvl].dim)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            # and the same as asking that level alone, in the same order
            torch.testing.assert_close(a, s.query(x, lvl, coords[ids == lvl]), rtol=1e-10, atol=1e-12)
        # every query answered exactly once, positions in order within a level
        seen = torch.cat([pos for pos, _, _ in s.stream(x, ids, coords, chunk)])
        assert sorted(seen.tolist()) == list(range(len(ids)))


def test_streaming_on_the_grid_equals_dense():
    s, x = make_student(), images()
    ids = torch.cat([torch.full((l.num_locations,), i) for i, l in enumerate(LEVELS)])
    coords = torch.cat([s.coords(i) for i in range(len(LEVELS))])
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = s.predict_queries(x, ids[perm], coords[perm], chunk=7)
        dense = s.dense(x)
    for lvl, (g, d) in enumerate(zip(got, dense)):
        order = perm[ids[perm] == lvl] - sum(l.num_locations for l in LEVELS[:lvl])
        torch.testing.assert_close(g, rearrange(d, "b h w d -> b (h w) d")[:, order])


def test_stream_rejects_mismatched_inputs():
    s = make_student()
    with pytest.raises(ValueError, match="level ids"):
        list(s.stream(images(), torch.zeros(3, dtype=torch.long), torch.rand(4, 2)))


def test_bf16_is_native_only_with_the_bf16_instructions():
    # flag sets of real CPUs: Zen 3 (AVX2), Skylake-SP (AVX-512 without bf16), Cooper Lake, Sapphire Rapids
    zen3 = ["sse4_2", "avx", "avx2", "fma", "f16c"]
    skylake = zen3 + ["avx512f", "avx512bw", "avx512vl", "avx512_vnni"]
    assert not cpu_has_bf16(zen3, "x86_64") and not cpu_has_bf16(skylake, "x86_64")
    assert cpu_has_bf16(skylake + ["avx512_bf16"], "x86_64")
    assert cpu_has_bf16(skylake + ["amx_bf16", "amx_tile"], "x86_64")
    assert not cpu_has_bf16(["avx512_bf16"], "aarch64")  # no probe there: fp32
    with open("/proc/cpuinfo") as f:  # this machine, read independently
        here = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    native = platform.machine() == "x86_64" and bool(here & {"avx512_bf16", "amx_bf16"})
    assert default_precision("cpu") == ("bf16-mixed" if native else "32-true")
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        assert default_precision("cuda") == "bf16-mixed"
    with autocast("cpu", "bf16-mixed"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "32-true"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_cli_resolves_default_precision(tmp_path):
    from apm.cli import build_cli

    args = ["-c", str(ROOT / "configs/apm.yaml"), "-c", str(ROOT / "configs/smoke.yaml"), "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    cli = build_cli(args, run=False)
    assert cli.config.trainer.precision is None  # the config leaves it to the hardware
    expected = default_precision("cpu")
    assert cli.trainer.precision == expected
    cli = build_cli(args + ["--trainer.precision", "bf16-mixed"], run=False)
    assert cli.trainer.precision == "bf16-mixed"  # an explicit choice wins


def test_compiled_student_trains_like_the_plain_one():
    from apm.module import APMModule

    kw = dict(teacher="dinov2_tiny", image_size=28, hidden_dims=[16], pe_dim=8, level_dim=4)
    torch.manual_seed(0)
    plain = APMModule(**kw)
    torch.manual_seed(0)
    compiled = APMModule(**kw, compile="eager")  # dynamo tracing without a C++ toolchain
    assert plain.state_dict().keys() == compiled.state_dict().keys()
    x = torch.rand(2, 3, 28, 28)
    locs = [None] * len(plain.levels)
    for a, b in zip(plain.student(x, locs), compiled.student(x, locs)):
        torch.testing.assert_close(a, b)
    # three AdamW steps on the same batch move both to the same weights
    target = [torch.randn_like(p) for p in plain.student(x, locs)]
    start = plain.student.first.weight.detach().clone()
    for m in (plain, compiled):
        opt = torch.optim.AdamW(m.student.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            sum(F.mse_loss(p, t) for p, t in zip(m.student(x, locs), target)).backward()
            opt.step()
    moved = (plain.student.first.weight - start).abs().max()
    for (n, a), b in zip(plain.student.named_parameters(), compiled.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    assert moved > 1e-3
