"""What the MONAI model zoo's ``ci/unit_tests/test_<bundle>.py`` do, for this repository's bundles: every workflow
of the bundle (stage-1 pretraining, training, evaluation, inference) as a ``ConfigWorkflow`` that is initialised,
has its properties checked, runs and is finalised (the zoo's ``ci/unit_tests/utils.py`` ``check_workflow``), on tiny
synthetic data in the bundle's converted layout (32 px images, one epoch, a tiny stage-1 model)."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STAGE1 = {"image_size": 32, "batch_size": 4, "num_workers": 0, "amp": False, "max_epochs": 1, "cache_rate": 0.0,
          "network_def#patch_size": 8, "network_def#vit_width": 32, "network_def#vit_depth": 1,
          "network_def#vit_heads": 2, "network_def#vit_mlp": 64, "network_def#text_layers": 1,
          "network_def#embed_dim": 16, "network_def#head_hidden": 32, "network_def#pdt_heads": 2,
          "tensorboard": False}
STAGE2 = {"image_size": 32, "unet_size": "light", "batch_size": 4, "unlabeled_batch_size": 4, "num_workers": 0,
          "amp": False, "max_epochs": 1, "cache_rate": 0.0, "tensorboard": False}


def check_workflow(workflow, check_properties: bool = False) -> None:
    """Initialise, check the properties (every missing one is an error), run and finalise ``workflow``."""
    workflow.initialize()
    if check_properties:
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"check properties for workflow failed: {missing}")
    workflow.run()
    workflow.finalize()


def run_bundle(name: str, data: Path, work: Path, infer_count: int = 2) -> Path:
    """Run the bundle ``name`` of ``bundles/`` (a copy in ``work``, as a fresh checkout has it) on the converted data
    set ``data``: pretraining, training, evaluation of the test split, inference on ``infer_count`` test images.

    Returns:
        the bundle copy (``models/``, ``eval/`` and ``predictions/`` hold what the workflows wrote).
    """
    from monai.bundle import ConfigWorkflow

    from amvlm_monai.data.datalist import load_datalist

    bundle = work / name
    shutil.copytree(ROOT / "bundles" / name, bundle, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    configs = bundle / "configs"
    common = dict(meta_file=str(configs / "metadata.json"), logging_file=str(configs / "logging.conf"),
                  bundle_root=str(bundle))
    # stage 1 has no train properties of its own (its components are under "pretrain#"): run only
    check_workflow(ConfigWorkflow(config_file=str(configs / "pretrain.json"), dataset_dir=str(data), **STAGE1,
                                  **common))
    check_workflow(ConfigWorkflow(workflow_type="train", config_file=str(configs / "train.json"),
                                  dataset_dir=str(data), **STAGE2, **common), check_properties=True)
    # the evaluation overrides train.json, so it is a "train" workflow, as in the zoo's tests
    check_workflow(ConfigWorkflow(workflow_type="train", config_file=[str(configs / "train.json"),
                                                                      str(configs / "evaluate.json")],
                                  dataset_dir=str(data), eval_panels=1, **STAGE2, **common), check_properties=True)
    images = work / "images"
    images.mkdir()
    for item in load_datalist(data / "datalist.json", "test")[:infer_count]:
        shutil.copy(item["image"], images / Path(item["image"]).name)
    check_workflow(ConfigWorkflow(workflow_type="infer", config_file=str(configs / "inference.json"),
                                  input_dir=str(images), num_workers=0, **common), check_properties=True)
    return bundle
