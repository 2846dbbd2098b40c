"""Several processes: global negatives, synchronised BatchNorm, reduced metrics (gloo on CPU, two processes)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_worker as w  # noqa: E402


def _torchrun(out: Path, job: str) -> list[dict]:
    """Run ``tests/ddp_worker.py OUT JOB`` on two CPU processes (gloo); each rank's result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get(
        "PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), str(out), job]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_of_b_equal_one_process_of_2b(tmp_path):
    """Stage 1 on 2 x 3 pairs under torchrun equals one process on the same 6 pairs: every logged term at every step,
    and the weights after two steps (momentum copies and BatchNorm statistics included); both ranks end identical."""
    ranks = _torchrun(tmp_path, "pretrain")

    single_out, single_state = w.run()
    assert len(single_out) == w.STEPS
    for step, expected in enumerate(single_out):
        for r in ranks:
            got = r["outputs"][step]
            assert set(got) == set(expected)
            for key, value in expected.items():
                assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-12), (step, key, got[key], value)
    for key, value in single_state.items():
        a, b = ranks[0]["state"][key], ranks[1]["state"][key]
        assert torch.equal(a, b), key
        if value.is_floating_point():
            torch.testing.assert_close(a, value, rtol=1e-7, atol=1e-9, msg=key)  # float64 round-off
        else:
            assert torch.equal(a, value), key
    assert any("momentum_" in k for k in single_state) and any("running_var" in k for k in single_state)


def test_validation_dice_is_reduced_across_ranks(tmp_path):
    """Two ranks scoring different shards (3 and 2 images) both return the Dice of all 5 images."""
    ranks = _torchrun(tmp_path, "metric")
    whole = w.metric()
    assert ranks[0]["dice"] == pytest.approx(whole, abs=1e-6) and ranks[1]["dice"] == pytest.approx(whole, abs=1e-6)
    shard0 = w.metric(0, 2)  # what rank 0 printed before: its shard only
    assert shard0 != pytest.approx(whole, abs=1e-3)


def test_single_process_helpers_are_identities():
    from amvlm_monai.utils import distributed as d

    x = torch.randn(3, 2, requires_grad=True)
    y, offset = d.gather_with_grad(x)
    assert y is x and offset == 0 and d.gather(x) is x and d.world_size() == 1 and d.is_main_process()
    assert d.gather_rows(x) is x and d.gather_objects(["a"]) == ["a"]
    assert float(d.mean_count(torch.tensor(5))) == 5.0
    bn = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4))
    assert d.sync_batchnorm(bn) is bn and type(bn[1]) is torch.nn.BatchNorm1d  # nothing to synchronise


def test_sync_batchnorm_module_matches_batchnorm_without_a_group():
    from amvlm_monai.utils.distributed import SyncBatchNorm

    torch.manual_seed(0)
    ref, syn = torch.nn.BatchNorm1d(4), SyncBatchNorm(4)
    x = torch.randn(5, 4)
    torch.testing.assert_close(syn(x), ref(x))  # no process group: plain BatchNorm1d
    torch.testing.assert_close(syn.running_var, ref.running_var)


@pytest.mark.slow
def test_pretraining_overlay_runs_on_two_cpu_processes_and_rank0_writes(demo_data, tmp_path):
    """`torchrun ... pretraining` with multi_gpu_pretrain.json on gloo: each rank its shard, one checkpoint."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(HERE.parent / "bundles" / "qata_covid19_cxr_segmentation", bundle,
                    ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    configs = str([str(bundle / "configs" / n) for n in ("pretrain.json", "multi_gpu_pretrain.json")])
    tiny = {"image_size": 32, "batch_size": 2, "num_workers": 0, "amp": False, "max_epochs": 1, "cache_rate": 0.0,
            "network_def#patch_size": 8, "network_def#vit_width": 32, "network_def#vit_depth": 1,
            "network_def#vit_heads": 2, "network_def#vit_mlp": 64, "network_def#text_layers": 1,
            "network_def#embed_dim": 16, "network_def#head_hidden": 32, "network_def#pdt_heads": 2}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "monai.bundle", "run", "pretraining", "--config_file", configs, "--dataset_dir", str(demo_data),
           "--bundle_root", str(bundle)]
    for key, value in tiny.items():
        cmd += [f"--{key}", repr(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(bundle / "models" / "amvlm_pretrained.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])
    assert not list((bundle / "models").glob("*.tmp"))
