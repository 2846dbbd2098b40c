"""Jobs run in one process or as one rank of ``torchrun`` (used by test_distributed.py).

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR pretrain  # each rank: OUT_DIR/rank{r}.pt
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR metric
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from conftest import REPORTS as _REPORTS  # noqa: E402  (this file's folder is first on sys.path)
from conftest import TINY

REPORTS = _REPORTS + ["Small effusion.", "Lower left lung."]
GLOBAL_BATCH, STEPS = 6, 2


def batches(rank: int = 0, world: int = 1) -> list[dict]:
    """STEPS global batches of GLOBAL_BATCH pairs; this rank's rows [rank * B, (rank + 1) * B)."""
    g = torch.Generator().manual_seed(0)
    b = GLOBAL_BATCH // world
    out = []
    for s in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 1, 32, 32, generator=g)
        texts = [REPORTS[(i + s) % len(REPORTS)] for i in range(GLOBAL_BATCH)]
        rows = slice(rank * b, (rank + 1) * b)
        out.append({"image": x[rows].double(), "image_aug": x.flip(-1)[rows].double(), "text": texts[rows],
                    "text_aug": texts[::-1][rows]})
    return out


def run(rank: int = 0, world: int = 1) -> tuple[list[dict], dict]:
    """Train STEPS steps; returns the logged outputs and the final state dict (model, momentum copies, buffers).

    In float64: one process and two compute the same sums in different orders, and float32 rounding differences,
    amplified by BatchNorm over 6 samples and by Adam (which turns any tiny gradient into a full step), would hide
    what the test checks (that the two are the same computation).
    """
    from ignite.engine import Events

    from amvlm_monai.engines.pretrainer import AMVLMPretrainer
    from amvlm_monai.engines.step import param_groups
    from amvlm_monai.losses.amvlm import AMVLMLoss
    from amvlm_monai.networks.amvlm import AMVLM

    torch.manual_seed(0)
    model = AMVLM(**TINY).double()
    for m in model.modules():  # dropout masks cannot agree between one process and two
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # SGD: Adam turns a gradient that is 0 up to rounding (e.g. the key bias, to which softmax is blind) into a
    # full step of either sign, so weights could not be compared between differently ordered sums
    opt = torch.optim.SGD(param_groups(model, 0.1, 0.05), lr=0.1, momentum=0.9)
    trainer = AMVLMPretrainer("cpu", 1, batches(rank, world), model, opt, AMVLMLoss(mil_weight=0.5), grad_clip=1.0)
    outputs: list[dict] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    return outputs, {k: v.detach().clone() for k, v in model.state_dict().items()}


def predictions() -> tuple[torch.Tensor, torch.Tensor]:
    """5 images' logits and labels (16 x 16) with different Dice each."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 1, 16, 16, generator=g), (torch.rand(5, 1, 16, 16, generator=g) > 0.5).float()


def metric(rank: int = 0, world: int = 1) -> float:
    """The validation Dice of SegmentationMetric over this rank's shard (images rank, rank + world, ...)."""
    from amvlm_monai.handlers.metrics import SegmentationMetric

    pred, label = predictions()
    m = SegmentationMetric("dice", output_transform=lambda out: out)
    m.reset()
    for i in range(rank, pred.shape[0], world):  # unequal shards: 3 and 2 images
        m.update((pred[i: i + 1], label[i: i + 1], [f"img{i}"]))
    return m.compute()


def main() -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if sys.argv[2] == "pretrain":
            outputs, state = run(dist.get_rank(), dist.get_world_size())
            result = {"outputs": outputs, "state": state}
        else:
            result = {"dice": metric(dist.get_rank(), dist.get_world_size())}
        torch.save(result, os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer is still in a collective (a rare SIGABRT under load)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
