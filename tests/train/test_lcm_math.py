"""LCM distillation pieces that need no data: the schedule, the guidance embedding, the student's init."""

import pytest
import torch

from diffrt.train import lcm, models


def test_skipping_schedule_is_lcm_schedulers_origin_schedule():
    t, prev = lcm.skipping_schedule(1000, 50)
    assert t[:3].tolist() == [19, 39, 59] and t[-1] == 999
    assert prev[0] == 0 and torch.equal(prev[1:], t[:-1])
    scheduler = models.lcm_scheduler(dict(models.eps_scheduler().config), 50, 10.0)
    for n in (1, 2, 3, 4, 8, 50):
        scheduler.set_timesteps(n)
        assert set(scheduler.timesteps.tolist()) <= set(t.tolist())


def test_guidance_embedding_matches_the_pipelines_and_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    from diffrt.models.families.base import guidance_embedding

    scales = torch.tensor([1.0, 2.5, 8.0])
    batched = lcm.guidance_embedding(scales, 128)
    for k, g in enumerate(scales.tolist()):
        torch.testing.assert_close(batched[k], guidance_embedding(g, 128, torch.zeros(1))[0])
    reference = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, scales - 1, embedding_dim=128)
    torch.testing.assert_close(batched, reference)


def test_consistency_output_meets_the_boundary_condition():
    acp = models.alphas_cumprod(models.eps_scheduler())
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = lcm.consistency_output(eps, x, torch.tensor([0, 0]), acp.float(), 10.0)
    torch.testing.assert_close(out, x)  # c_skip(0) = 1, c_out(0) = 0
    high = lcm.consistency_output(eps, x, torch.tensor([999, 999]), acp.float(), 10.0)
    abar = acp[999].float()
    torch.testing.assert_close(high, (x - (1 - abar).sqrt() * eps) / abar.sqrt(), rtol=1e-4, atol=1e-3)


def test_student_starts_as_the_teacher():
    torch.manual_seed(0)
    teacher = models.build_unet("tiny").eval()
    student = lcm.make_student(teacher, 32).eval()
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999, 19]), torch.randn(2, 16, 384)
    with torch.no_grad():
        expected = teacher(x, t, encoder_hidden_states=cond).sample
        for scale in (1.0, 6.0):
            w = lcm.guidance_embedding(torch.full((2,), scale), 32)
            torch.testing.assert_close(student(x, t, encoder_hidden_states=cond, timestep_cond=w).sample, expected)


def test_random_guidance_projection_makes_the_guidance_input_act_from_the_start():
    torch.manual_seed(0)
    teacher = models.build_unet("tiny").eval()
    student = lcm.make_student(teacher, 32, cond_init="random").eval()
    assert student.time_embedding.cond_proj.weight.abs().sum() > 0
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 384)
    with torch.no_grad():
        low, high = (student(x, t, encoder_hidden_states=cond, timestep_cond=lcm.guidance_embedding(
            torch.tensor([w]), 32)).sample for w in (2.0, 8.0))  # fmt: skip
    assert not torch.allclose(low, high)


def test_lcm_settings_are_checked():
    with pytest.raises(ValueError, match="guidance_min <= guidance_max"):
        lcm.LCMSettings(teacher="x", guidance_min=5.0, guidance_max=2.0).check()
    with pytest.raises(ValueError, match="cond_init must be 'zero' or 'random'"):
        lcm.LCMSettings(teacher="x", cond_init="ones").check()
