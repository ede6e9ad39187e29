"""The kind's own test, run with `python -m pytest` in this folder: its draws have Student-t's variance."""

import pytest
import torch

from student_t_noise import StudentT


@pytest.mark.parametrize("dof", [3, 5, 10])
def test_student_t_draws_have_the_variance_dof_over_dof_minus_two(dof):
    kind = StudentT.__new__(StudentT)  # sample() reads only the config: no model needed
    kind.cfg = StudentT.Config(dof=dof)
    x = kind.sample(torch.Size([400_000]), torch.Generator().manual_seed(0), "cpu")
    assert x.mean().item() == pytest.approx(0.0, abs=0.02)
    assert torch.median(x.abs()).item() == pytest.approx({3: 0.7649, 5: 0.7267, 10: 0.6998}[dof], rel=0.02)
