"""Checkpoint safety: no code runs from a crafted file, a kill during a save loses nothing, a killed run resumes."""

import builtins
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bundle import QATA, TINY_OVERRIDES, _run

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates the marker file: the stand-in for a shell command in a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _chain(err):
    out = []
    while err is not None:
        out.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(out)


@pytest.fixture
def evil(tmp_path, tiny_amvlm):
    """A stage-1 checkpoint with the right keys whose config runs code when unpickled unsafely."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_amvlm.state_dict(), "config": _Payload(marker)}, path)
    return path, marker


def test_the_crafted_file_does_run_code_when_loaded_unsafely(evil):
    path, marker = evil
    torch.load(path, weights_only=False)  # the hazard the entry points must not reach
    assert marker.exists()


def test_every_entry_point_refuses_a_crafted_checkpoint_without_running_it(evil, tmp_path, demo_data, capsys):
    from amvlm_monai.handlers.checkpoint import LoadModel
    from ignite.engine import Engine

    from amvlm_monai.evaluation import uncertainty
    from amvlm_monai.engines.guidance import build_text_guidance
    from amvlm_monai.inference import volume
    from amvlm_monai.io.checkpoint import CheckpointError, load_checkpoint
    from amvlm_monai.networks.amvlm import load_amvlm

    path, marker = evil
    refused = f"{path}: refused to load"
    for load in (load_checkpoint, load_amvlm, build_text_guidance):
        with pytest.raises(CheckpointError, match=refused):
            load(path)
    with pytest.raises(SystemExit):  # python -m amvlm_monai.evaluation.uncertainty --checkpoint ...
        uncertainty.main(["--checkpoint", str(path), "--image", "x.png", "--reports", "a", "b"])
    assert refused in capsys.readouterr().err
    with pytest.raises(SystemExit):  # python -m amvlm_monai.inference.volume --model ...
        import nibabel as nib
        import numpy as np

        volume_file = tmp_path / "x.nii.gz"  # a real input: the command checks its inputs before the model
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), str(volume_file))
        volume.main(["--model", str(path), "--input", str(volume_file), "--output", str(tmp_path / "out")])
    assert refused in capsys.readouterr().err
    loader = LoadModel(load_path=str(path), network=torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=refused):  # the evaluation and inference bundles' loader
        loader(Engine(lambda e, b: None))

    bundle = tmp_path / "bundle"  # bundle training's --pretrained_path
    shutil.copytree(QATA, bundle, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    with pytest.raises(Exception) as err:
        _run(bundle, "training", ["train.json"], dataset_dir=str(demo_data), pretrained_path=str(path),
             ckpt_dir=str(tmp_path / "ckpt"), **TINY_OVERRIDES)
    assert refused in _chain(err.value)
    assert not marker.exists()


def test_a_crafted_resumable_state_is_refused(tmp_path):
    from amvlm_monai.engines.state import TrainingState
    from amvlm_monai.io.checkpoint import CheckpointError

    marker = tmp_path / "marker"
    torch.save({"network": _Payload(marker)}, tmp_path / "train_state_epoch=1.pt")
    handler = TrainingState(tmp_path, {"network": torch.nn.Linear(2, 2)}, resume=True)
    with pytest.raises(CheckpointError, match="train_state_epoch=1.pt: refused to load"):
        handler.load(tmp_path / "train_state_epoch=1.pt", engine=None)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_a_damaged_checkpoint_gives_one_error_naming_it(damage, tiny_amvlm, tmp_path):
    from amvlm_monai.handlers.checkpoint import LoadModel
    from ignite.engine import Engine

    from amvlm_monai.io.checkpoint import CheckpointError, load_checkpoint
    from amvlm_monai.networks.amvlm import load_amvlm

    good = tmp_path / "good.pt"
    torch.save({"model": tiny_amvlm.state_dict(), "config": tiny_amvlm.config}, good)
    bad = tmp_path / f"{damage}.pt"
    data = good.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not a checkpoint"}[damage])
    for load in (load_checkpoint, load_amvlm):
        with pytest.raises(CheckpointError, match=f"{bad}: not a readable PyTorch checkpoint") as err:
            load(bad)
        assert len(str(err.value).splitlines()) == 1 and err.value.__cause__ is None
    loader = LoadModel(load_path=str(bad), network=torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=f"{bad}: not a readable"):
        loader(Engine(lambda e, b: None))


def test_the_loader_memory_maps_on_request(tmp_path):
    from amvlm_monai.io.checkpoint import load_checkpoint

    torch.save({"w": torch.arange(6.0)}, tmp_path / "a.pt")
    assert torch.equal(load_checkpoint(tmp_path / "a.pt", mmap=True)["w"], torch.arange(6.0))
    with pytest.raises(FileNotFoundError, match="b.pt"):
        load_checkpoint(tmp_path / "b.pt")


def test_stage1_config_holds_only_plain_values(tiny_amvlm):
    from amvlm_monai.io.checkpoint import plain_config

    config = plain_config(dict(tiny_amvlm.config, image_size=(np.int64(32), 32), text_model=Path("/m")))
    assert config["image_size"] == (32, 32) and type(config["image_size"][0]) is int and config["text_model"] == "/m"
    with pytest.raises(TypeError, match="'norm' is a function"):
        plain_config({"norm": torch.nn.functional.relu})


# ---- atomic saves ---------------------------------------------------------------------------------------------------
def test_a_failure_during_the_save_keeps_the_previous_file(tmp_path, monkeypatch):
    from amvlm_monai.io.checkpoint import atomic_save

    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, path)

    def torn(obj, f, *args, **kwargs):  # writes half a file, then the process is interrupted
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model.pt"]  # the partial temporary file is gone


_WRITER = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
from amvlm_monai.io.checkpoint import atomic_save
path, ready, mode = sys.argv[1:4]

class Slow:  # a file object that stalls half way, so that the kill lands inside the write
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        n = self.f.write(b)
        self.n += len(b)
        if self.n > 2 ** 20:
            self.f.flush()
            open(ready, "w").close()
            time.sleep(60)
        return n
    def __getattr__(self, name):
        return getattr(self.f, name)

save = torch.save
torch.save = lambda obj, f, **kw: save(obj, Slow(f) if not isinstance(f, str) else f, **kw)
state = {{"w": torch.zeros(2 ** 20)}}
if mode == "atomic":
    atomic_save(state, path)
else:  # what MONAI's CheckpointSaver does: torch.save straight onto the target
    with open(path, "wb") as f:
        torch.save(state, f)
"""


@pytest.mark.parametrize("mode", ["atomic", "in_place"])
def test_a_kill_during_the_save_keeps_the_previous_file(mode, tmp_path):
    from amvlm_monai.io.checkpoint import CheckpointError, atomic_save, clean_stale_tmp, load_checkpoint

    path, ready = tmp_path / "model.pt", tmp_path / "ready"
    atomic_save({"w": torch.ones(8)}, path)
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(ready), mode])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer did not reach the save"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    if mode == "in_place":  # the hazard: the previous model is destroyed
        with pytest.raises(CheckpointError, match="not a readable"):
            load_checkpoint(path)
        return
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(8))
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".model.pt.")]
    assert len(stale) == 1 and stale[0].stat().st_size > 2 ** 20
    assert clean_stale_tmp(tmp_path) == stale  # the next start removes it
    assert not stale[0].exists() and path.exists()


def test_stale_files_of_live_writers_are_kept(tmp_path):
    from amvlm_monai.io.checkpoint import _tmp_name, clean_stale_tmp

    parent = _tmp_name(tmp_path / "model.pt").name.replace(f".{os.getpid()}.", f".{os.getppid()}.")
    live = tmp_path / parent  # a live process (pytest's parent) may be in the middle of a save
    other_host = tmp_path / f".model.pt.elsewhere.{os.getpid()}.0123abcd.tmp"
    unrelated = tmp_path / ".notes.tmp"
    reused_pid = _tmp_name(tmp_path / "model.pt")  # this pid, but no save of this process is writing it
    for p in (live, other_host, unrelated, reused_pid):
        p.write_bytes(b"x")
    assert clean_stale_tmp(tmp_path) == [reused_pid]
    assert live.exists() and other_host.exists() and unrelated.exists()


def _tensors(state, prefix=""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _tensors(v, f"{prefix}/{i}")


# ---- best model and resumable state ---------------------------------------------------------------------------------
def _engine(metric):
    from ignite.engine import Engine

    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"val_mean_dice": metric}
    engine.state.key_metric_name = "val_mean_dice"
    return engine


def test_states_rotate_across_a_resume(tmp_path):
    """n_saved latest states are kept, those of the run before a resume included (ignite's Checkpoint rotation)."""
    from ignite.engine import Engine

    from amvlm_monai.engines.state import TrainingState

    lin = torch.nn.Linear(2, 1)

    def run(max_epochs, resume):
        engine = Engine(lambda e, b: None)
        TrainingState(tmp_path, {"network": lin}, n_saved=2, resume=resume).attach(engine)
        engine.run([0, 1], max_epochs=max_epochs)
        return sorted(os.listdir(tmp_path))

    assert run(3, False) == ["train_state_epoch=2.pt", "train_state_epoch=3.pt"]
    assert run(5, True) == ["train_state_epoch=4.pt", "train_state_epoch=5.pt"]
    state = torch.load(tmp_path / "train_state_epoch=5.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 10 and set(state["network"]) == {"weight", "bias"}


def test_a_fresh_run_does_not_replace_an_earlier_runs_outputs_unless_told(tmp_path):
    from amvlm_monai.engines.state import TrainingState

    (tmp_path / "model.pt").write_bytes(b"earlier best")
    (tmp_path / "train_state_epoch=3.pt").write_bytes(b"earlier state")
    outputs = [tmp_path / "model.pt"]
    engine = _engine(0.0)
    with pytest.raises(FileExistsError, match="model.pt.*train_state_epoch=3.pt.*--resume true.*--overwrite true"):
        TrainingState(tmp_path, {}, outputs=outputs).start(engine)
    (tmp_path / "train_state_epoch=3.pt").unlink()
    with pytest.raises(FileExistsError, match="no state to resume from"):
        TrainingState(tmp_path, {}, outputs=outputs, resume="true").start(engine)
    (tmp_path / "train_state_epoch=3.pt").write_bytes(b"earlier state")
    TrainingState(tmp_path, {}, outputs=outputs, overwrite="True").start(engine)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # states of the earlier run removed, the best model kept
    with pytest.raises(ValueError, match="--resume: .maybe. is not a boolean; allowed: true or false"):
        TrainingState(tmp_path, {}, resume="maybe")


def test_pretraining_resumes_to_the_same_weights(demo_data, tmp_path):
    """Stage 1 stopped after one epoch and resumed equals two epochs straight (towers, heads, momentum copies, PDT,
    Adam, and the random augmentation of the ICL views)."""
    from conftest import TINY
    from monai.data import DataLoader, Dataset
    from monai.utils import set_determinism

    from amvlm_monai.data.datalist import load_datalist
    from amvlm_monai.engines.pretrainer import AMVLMPretrainer
    from amvlm_monai.engines.state import TrainingState
    from amvlm_monai.engines.step import param_groups
    from amvlm_monai.losses.amvlm import AMVLMLoss
    from amvlm_monai.networks.amvlm import AMVLM
    from amvlm_monai.transforms.pipelines import pretrain_transforms

    items = load_datalist(demo_data / "datalist.json", "training")[:4]

    def pretrain(folder, max_epochs, resume=False):
        set_determinism(seed=0)
        model = AMVLM(**TINY)
        loader = DataLoader(Dataset(items, pretrain_transforms(32)), batch_size=4, shuffle=True, drop_last=True)
        opt = torch.optim.Adam(param_groups(model, 1e-3, 1e-4), lr=1e-3)
        state = TrainingState(folder, {"network": model, "optimizer": opt}, prefix="pretrain_state", resume=resume)
        AMVLMPretrainer("cpu", max_epochs, loader, model, opt, AMVLMLoss(), train_handlers=[state]).run()
        return state

    pretrain(tmp_path / "straight", 2)
    pretrain(tmp_path / "resumed", 1)
    assert pretrain(tmp_path / "resumed", 2, resume=True).resumed_from.name == "pretrain_state_epoch=1.pt"
    set_determinism(seed=None)
    a, b = (torch.load(tmp_path / d / "pretrain_state_epoch=2.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["trainer"] == b["trainer"] == {"epoch_length": 1, "iteration": 2, "max_epochs": 2}
    assert any(k.startswith("momentum_") for k in a["network"]) and any(k.startswith("pdt_") for k in a["network"])
    assert len(a["random"]["transforms"]) >= 8  # the ICL view's random transforms
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    assert ta.keys() == tb.keys() and not [k for k in ta if not torch.equal(ta[k], tb[k])]
    from amvlm_monai.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="pretrain_state_epoch=2.pt: the run being resumed already trained 2 "
                                              "epochs, so --max_epochs 2 leaves nothing to train; give --max_epochs > 2"):
        pretrain(tmp_path / "resumed", 2, resume=True)  # a finished run resumed as it was: nothing to train


# ---- a real training process killed mid-epoch -----------------------------------------------------------------------
def _training_cmd(bundle, data, stage1, ckpt_dir, **extra):
    configs = str([str(bundle / "configs" / "train.json")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs, "--bundle_root",
           str(bundle), "--logging_file", str(bundle / "configs" / "logging.conf"), "--dataset_dir", str(data),
           "--pretrained_path", str(stage1), "--ckpt_dir", str(ckpt_dir)]
    for key, value in dict(TINY_OVERRIDES, max_epochs=2, **extra).items():
        cmd += [f"--{key}", repr(value)]
    return cmd


def test_training_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(demo_data, tiny_amvlm, tmp_path):
    """Student, teacher, text-mask decoder, optimiser, scheduler, best score and random states all come back.

    The killed and the resumed runs are the bundle's command in a subprocess; the uninterrupted reference runs in
    this process meanwhile (one thread in both, so that the arithmetic is the same).
    """
    bundle = tmp_path / "bundle"
    shutil.copytree(QATA, bundle, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    stage1 = tmp_path / "stage1.pt"
    torch.save({"model": tiny_amvlm.state_dict(), "config": tiny_amvlm.config}, stage1)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = subprocess.Popen(_training_cmd(bundle, demo_data, stage1, killed), cwd=bundle, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []

    def kill_mid_epoch():  # after the first step of epoch 2
        for line in run.stdout:
            log.append(line)
            if "Epoch: 2/2, Iter: 1/" in line:
                os.kill(run.pid, signal.SIGKILL)
                break

    watcher = threading.Thread(target=kill_mid_epoch)
    watcher.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(bundle, "training", ["train.json"], dataset_dir=str(demo_data), pretrained_path=str(stage1),
             ckpt_dir=str(straight), **dict(TINY_OVERRIDES, max_epochs=2))
    finally:
        torch.set_num_threads(threads)
        watcher.join(timeout=300)
        run.kill()
        run.wait()
    assert any("Epoch: 2/2, Iter: 1/" in line for line in log), "".join(log[-30:])
    assert sorted(p.name for p in killed.glob("*.pt")) == ["model.pt", "train_state_epoch=1.pt"]

    resumed = subprocess.run(_training_cmd(bundle, demo_data, stage1, killed, resume=True), cwd=bundle, env=env,
                             capture_output=True, text=True, timeout=300)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "train_state_epoch=1.pt: epoch 1, iteration 3" in out, out[-3000:]
    assert "Epoch: 2/2, Iter: 1/" in out and "Epoch: 1/2" not in out  # the epoch count continues

    a = torch.load(straight / "train_state_epoch=2.pt", weights_only=True)
    b = torch.load(killed / "train_state_epoch=2.pt", weights_only=True)
    assert a["trainer"] == b["trainer"] == {"epoch_length": 3, "iteration": 6, "max_epochs": 2}
    assert {"network", "teacher", "guidance", "optimizer", "lr_scheduler", "best_model", "random"} <= set(a)
    assert len(a["guidance"]["trainable"]) >= 3 and len(a["random"]["transforms"]) > 0
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:10]
    assert a["best_model"] == b["best_model"] and a["lr_scheduler"] == b["lr_scheduler"]
    ma, mb = (torch.load(d / "model.pt", weights_only=True) for d in (straight, killed))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
