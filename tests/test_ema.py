"""EMA teacher: alpha schedule, parameters and BatchNorm buffers averaged, integer buffers copied, eval mode kept."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from amvlm_monai.engines.ema import EMATeacher, ema_alpha, ema_update, make_teacher


def _lin(w, b=0.0):
    m = nn.Linear(1, 1)
    with torch.no_grad():
        m.weight.fill_(w)
        m.bias.fill_(b)
    return m


def test_alpha_schedule():
    assert [ema_alpha(t) for t in (0, 1, 2, 3, 9)] == pytest.approx([0.0, 0.5, 2 / 3, 0.75, 0.9])
    assert ema_alpha(99) == pytest.approx(0.99) and ema_alpha(10**6) == 0.99
    assert ema_alpha(10**6, max_alpha=0.999) == pytest.approx(0.999)
    assert ema_alpha(np.int64(1)) == 0.5


def test_parameters_by_hand():
    teacher, student = _lin(1.0, 10.0), _lin(3.0, 2.0)
    assert ema_update(teacher, student, step=0) == 0.0  # t = 0: teacher := student
    assert teacher.weight.item() == 3.0 and teacher.bias.item() == 2.0
    with torch.no_grad():
        student.weight.fill_(5.0)
    ema_update(teacher, student, step=1)  # alpha 1/2
    assert teacher.weight.item() == pytest.approx(4.0)
    with torch.no_grad():
        student.weight.fill_(8.0)
    ema_update(teacher, student, step=3)  # alpha 3/4: .75 * 4 + .25 * 8
    assert teacher.weight.item() == pytest.approx(5.0)
    ema_update(teacher, student, step=10**5)  # alpha capped at .99
    assert teacher.weight.item() == pytest.approx(0.99 * 5.0 + 0.01 * 8.0)
    ema_update(teacher, student, alpha=0.25)  # fixed momentum
    assert teacher.weight.item() == pytest.approx(0.25 * 5.03 + 0.75 * 8.0)


def test_batchnorm_buffers_averaged_and_counter_copied():
    student, teacher = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        student.running_mean.copy_(torch.tensor([2.0, 4.0]))
        student.running_var.copy_(torch.tensor([3.0, 5.0]))
        student.num_batches_tracked.fill_(7)
        teacher.running_mean.zero_()
        teacher.running_var.fill_(1.0)
    ema_update(teacher, student, step=1)
    torch.testing.assert_close(teacher.running_mean, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(teacher.running_var, torch.tensor([2.0, 3.0]))
    assert teacher.num_batches_tracked.item() == 7 and teacher.num_batches_tracked.dtype == torch.long


def test_make_teacher_copy_frozen_eval():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    student.train()
    teacher = make_teacher(student)
    assert isinstance(teacher, EMATeacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert not teacher.training and not teacher.module.training
    assert teacher.module[0].weight.data_ptr() != student[0].weight.data_ptr()

    parent = nn.ModuleDict({"student": student, "teacher": teacher})
    parent.train()
    assert student.training and not teacher.training and not teacher.module[2].training
    x = torch.randn(5, 3)
    student.eval()
    torch.testing.assert_close(teacher(x), student(x))  # a copy: same outputs in eval mode
    teacher(x + 10.0)
    torch.testing.assert_close(teacher.module[1].running_mean, student[1].running_mean)  # eval: stats untouched

    # the student trains; the teacher follows by EMA and gets no gradient
    student.train()
    student(x).sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = teacher.module[0].weight.clone()
    ema_update(teacher, student, step=1)
    torch.testing.assert_close(teacher.module[0].weight, 0.5 * before + 0.5 * student[0].weight.detach())
    assert not teacher.module[0].weight.requires_grad


def test_errors():
    a, b = _lin(1.0), _lin(2.0)
    with pytest.raises(ValueError, match="exactly one"):
        ema_update(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        ema_update(a, b, step=1, alpha=0.5)
    with pytest.raises(ValueError, match="step"):
        ema_update(a, b, 0.995)  # a momentum passed as the step
    with pytest.raises(ValueError, match="step"):
        ema_update(a, b, step=-1)
    with pytest.raises(ValueError, match="alpha"):
        ema_update(a, b, alpha=1.5)
    with pytest.raises(ValueError, match="max_alpha"):
        ema_update(a, b, step=1, max_alpha=2.0)
    with pytest.raises(ValueError, match="shape"):
        ema_update(nn.Linear(2, 1), nn.Linear(1, 1), step=1)
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Linear(1, 1), nn.Linear(1, 1, bias=False), step=1)
