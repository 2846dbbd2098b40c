"""The GPU paths end to end (skipped without CUDA): stage 1 and stage 2 train under AMP on CUDA with text guidance,
and the global-negative gather's NCCL path. Run where a GPU is: ``pytest tests/test_cuda.py tests/test_speed.py``."""

import math
import os
import socket

import pytest
import torch
from conftest import REPORTS
from ignite.engine import Events

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _batches(n, size, labeled, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        batch = {"image": torch.randn(size, 1, 32, 32, generator=g), "image_aug": torch.randn(size, 1, 32, 32, generator=g),
                 "text": [REPORTS[(b * size + i) % len(REPORTS)] for i in range(size)]}
        batch["text_aug"] = batch["text"][::-1]
        if labeled:
            batch["label"] = (torch.rand(size, 1, 32, 32, generator=g) > 0.7).float()
        out.append(batch)
    return out


@CUDA
def test_both_stages_train_on_cuda_under_amp(tiny_amvlm, tmp_path):
    from amvlm_monai.engines.ema import make_teacher
    from amvlm_monai.engines.guidance import build_text_guidance
    from amvlm_monai.engines.mean_teacher import MeanTeacherTrainer
    from amvlm_monai.engines.pretrainer import AMVLMPretrainer
    from amvlm_monai.engines.step import param_groups, trainable_parameters
    from amvlm_monai.losses.amvlm import AMVLMLoss
    from amvlm_monai.losses.semi import ConsistencyLoss, build_supervised_loss
    from amvlm_monai.networks.segmentation import build_segmentation_net

    model = tiny_amvlm.cuda()
    opt = torch.optim.Adam(param_groups(model, 1e-3, 0.0), lr=1e-3)
    pre = AMVLMPretrainer("cuda", 2, _batches(2, 4, False, 0), model, opt, AMVLMLoss(mil_weight=0.5), amp=True)
    outputs = []
    pre.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    pre.run()
    assert len(outputs) == 4 and all(math.isfinite(v) for o in outputs for v in o.values())
    ckpt = tmp_path / "amvlm.pt"
    torch.save({"model": model.cpu().state_dict(), "config": model.config}, ckpt)

    guidance = build_text_guidance(str(ckpt), device="cuda")
    net = build_segmentation_net(channels=(4, 8, 16), strides=(2, 2)).cuda()
    opt = torch.optim.Adam(trainable_parameters([net, guidance]), lr=1e-2)
    trainer = MeanTeacherTrainer("cuda", 2, _batches(2, 3, True, 1), net, opt, build_supervised_loss(),
                                 unlabeled_loader=_batches(2, 2, False, 2), teacher=make_teacher(net),
                                 consistency_loss=ConsistencyLoss(), guidance=guidance, amp=True,
                                 diagnostic_interval=1)
    steps = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(dict(e.state.output)))
    trainer.run()
    assert len(steps) == 4 and all(math.isfinite(v) for o in steps for v in o.values())
    assert {"sup", "consistency", "tg"} <= set(steps[0])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@CUDA
def test_global_negatives_gather_on_nccl():
    """One NCCL rank: the forward is the identity and the backward (a reduce-scatter) returns the gradient."""
    import torch.distributed as dist

    from amvlm_monai.utils.distributed import gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        x = torch.randn(3, 4, device="cuda", requires_grad=True)
        weight = torch.randn(3, 4, device="cuda")
        y, offset = gather_with_grad(x)
        (y.t() * weight.t()).sum().backward()  # a non-contiguous gradient reaches the gather
        assert offset == 0 and torch.equal(y, x)
        torch.testing.assert_close(x.grad, weight)
    finally:
        dist.destroy_process_group()
