"""Alignment-uncertainty report: do paraphrased reports (or similar images) stay close under a pretrained AMVLM?

As in the paper's uncertainty analysis: one image against several reports that say the same thing in other words
(and one report against several images), printed as cosine similarities of the global embeddings, together with the
similarities inside each group. Paraphrases that score far apart show that the model has not learnt the
one-to-many correspondences that AMVLM's CSS and ICL target.

Usage:
    python -m amvlm_monai.evaluation.uncertainty --checkpoint models/amvlm_pretrained.pt \\
        --image img.png --reports "Two infected areas, upper left lung." "Upper left lung, two lesions."
    python -m amvlm_monai.evaluation.uncertainty --checkpoint models/amvlm_pretrained.pt \\
        --report "One infected area, lower right lung." --images a.png b.png c.png

``--heatmap out.png`` (with ``--image``) also writes the alignment view: for the image and every report, heat-maps
of the patch-report similarity and of the PDT's predicted variance over the image (:func:`~amvlm_monai.evaluation.alignment.alignment_maps`,
:func:`amvlm_monai.evaluation.figures.alignment_figure`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch


@torch.no_grad()
def embed_images(model: torch.nn.Module, paths: Sequence[str]) -> torch.Tensor:
    """Image files -> normalised global embeddings (N, D), through the inference transforms of the model's size."""
    from amvlm_monai.transforms.pipelines import inference_transforms

    if not paths:
        raise ValueError("no image given.")
    chain = inference_transforms(model.config["image_size"], in_channels=model.config.get("in_channels", 1))
    images = torch.stack([torch.as_tensor(chain({"image": p})["image"]) for p in paths])
    device = next(model.parameters()).device
    return model.encode_image(images.to(device).float()).cls


@torch.no_grad()
def similarity_report(model: torch.nn.Module, images: Sequence[str], reports: Sequence[str]) -> dict:
    """Cosine similarities between every image and report, and within the images and within the reports.

    Returns:
        dict with ``image_text`` (N_img, N_txt), ``image_image`` (N_img, N_img), ``text_text`` (N_txt, N_txt) tensors
        and the inputs under ``images`` and ``reports``.
    """
    if not reports:
        raise ValueError("no report given.")
    model.eval()
    v = embed_images(model, images)
    t = model.text_embeddings(list(reports))
    return {"images": list(images), "reports": list(reports), "image_text": v @ t.T, "image_image": v @ v.T,
            "text_text": t @ t.T}


def _spread(sim: torch.Tensor) -> str:
    if sim.shape[0] < 2:
        return "n/a"
    off = sim[~torch.eye(sim.shape[0], dtype=torch.bool)]
    return f"mean {off.mean():.3f}, min {off.min():.3f}"


def format_report(rep: dict) -> str:
    """A plain-text table of :func:`similarity_report`'s result."""
    lines = ["cosine similarity, image (row) x report (column):"]
    for j, r in enumerate(rep["reports"]):
        lines.append(f"  [r{j}] {r}")
    header = " " * 28 + "".join(f"{f'r{j}':>8}" for j in range(len(rep["reports"])))
    lines.append(header)
    for i, name in enumerate(rep["images"]):
        row = "".join(f"{float(s):8.3f}" for s in rep["image_text"][i])
        lines.append(f"  {str(name)[-26:]:<26}{row}")
    lines.append(f"reports among themselves: {_spread(rep['text_text'])}")
    lines.append(f"images among themselves:  {_spread(rep['image_image'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="stage-1 checkpoint (amvlm_pretrained.pt)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", help="one image, compared with several --reports")
    group.add_argument("--images", nargs="+", help="several images, compared with one --report")
    parser.add_argument("--reports", nargs="+", help="paraphrased reports (with --image)")
    parser.add_argument("--report", help="one report (with --images)")
    parser.add_argument("--text-model", default=None, help="override the text model folder in the checkpoint")
    parser.add_argument("--heatmap", default=None, help="with --image: write the alignment heat-maps to this PNG")
    args = parser.parse_args(argv)
    if args.image and not args.reports:
        parser.error("--image needs --reports")
    if args.images and not args.report:
        parser.error("--images needs --report")
    if args.heatmap and not args.image:
        parser.error("--heatmap needs --image (one image, several --reports)")
    from amvlm_monai.networks.amvlm import load_amvlm
    from amvlm_monai.utils.errors import cli_errors

    with cli_errors():  # a bad checkpoint or image: `error: <file>: <what is wrong>`, exit status 2
        model = load_amvlm(args.checkpoint, text_model=args.text_model)
        images = [args.image] if args.image else args.images
        reports = args.reports if args.image else [args.report]
        print(format_report(similarity_report(model, images, reports)))
        if args.heatmap:
            from amvlm_monai.evaluation.alignment import alignment_maps
            from amvlm_monai.evaluation.figures import alignment_figure, save_png

            maps = alignment_maps(model, args.image, reports)
            path = save_png(alignment_figure(maps["image"], maps["reports"], maps["similarity"],
                                             maps["variance_image"], maps["variance_attended"]), args.heatmap)
            print(f"alignment heat-maps: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
