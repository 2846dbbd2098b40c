"""Did stage 1 learn an alignment? Retrieval and localisation metrics of a pretrained AMVLM on a labelled split.

- **Retrieval**: image-to-report and report-to-image recall@k over the split. Identical reports (e.g. every
  "no lesion" report) are one report: an image retrieves its report when the report's text is among the k best,
  and a report retrieves its images when any image it describes is among the k best. Chance levels are given
  beside each recall: ``k / U`` for image-to-report (U distinct reports) and, for report-to-image, the mean over
  reports of ``1 - C(N - m, k) / C(N, k)`` (N images, m of them with that report).
- **Fact-level retrieval**: reports are paraphrased and many images state the same facts, so exact-pair recall is
  capped. Here a retrieved report is right when its image's facts equal the query image's facts, the facts being
  read from the binary label masks (loaded as (W, H), like PNGs) by :func:`~amvlm_monai.data.describe.find_regions`:
  ``fact`` = (region count,
  set of sides), ``fact_zone`` = (count, sides, set of upper/middle/lower zones). Image-to-report: the report ranked
  first over the U distinct reports; report-to-image: the image ranked first over the N images (the query's own
  report, or image, is a candidate). A distinct report has the facts of every image it describes. Chance: the share
  of candidates with the query's facts, averaged over queries. Skipped (NaN) when the labels are not binary.
- **Localisation**: on images that contain a lesion, the similarity of each patch embedding with the global
  embedding of the image's report (the text mask generator's input, before its decoder), upsampled bilinearly to
  the label's size, scores the lesion pixels: its ROC AUC per image (rank formula) averaged over images; and the
  Dice of the initial text mask ``sigmoid(w (sim - b)) > 0.5``, i.e. ``sim > b`` (b = 0.25, the generator's initial
  bias), beside the Dice of an all-ones mask (what a mask that says nothing scores).

:class:`AlignmentValidation` runs these every epoch of pretraining, logs them, and keeps the best checkpoint. Before it
does, :func:`refresh_bn_statistics` re-estimates the BatchNorm statistics of the online towers and heads on training
batches, so that the evaluated and saved model (which stage 2 runs in eval mode) normalises with statistics that fit
its weights (see ``docs/method.md``, "Stage-1 BatchNorm statistics").

CLI (a stage-1 checkpoint on a split of a converted data set)::

    python -m amvlm_monai.evaluation.alignment --checkpoint models/amvlm_pretrained.pt --datalist DATA/datalist.json \
        [--key validation] [--limit 500]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F

from amvlm_monai.networks.batchnorm import refresh_batchnorm
from amvlm_monai.utils.distributed import unwrap

logger = logging.getLogger(__name__)


#: The fact keys of :func:`label_facts`, in the order they are logged.
FACT_KEYS = ("fact", "fact_zone")


_warned: set[str] = set()


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_index: torch.Tensor,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways, with chance levels.

    Args:
        image_emb: (N, D) L2-normalised image embeddings.
        text_emb: (U, D) L2-normalised embeddings of the U distinct reports.
        text_index: (N,) long: the distinct report of each image.
        ks: the k values.

    Returns:
        ``i2t_r<k>``, ``t2i_r<k>`` and their ``..._chance``, all in [0, 1].

    Example:
        >>> e = torch.eye(3)
        >>> retrieval_recall(e, e, torch.arange(3), ks=(1,))["i2t_r1"]
        1.0
    """
    n, u = image_emb.shape[0], text_emb.shape[0]
    if text_index.shape != (n,) or n == 0 or u == 0:
        raise ValueError(f"text_index must be (N,) = ({n},) with N, U > 0, got {tuple(text_index.shape)}, U = {u}.")
    sim = image_emb.float() @ text_emb.float().T  # (N, U)
    own = sim.gather(1, text_index[:, None])
    i2t_rank = (sim > own).sum(1)  # how many reports score higher than the image's own
    members = F.one_hot(text_index, u).bool()  # (N, U)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
        out[f"i2t_r{k}_chance"] = min(k, u) / u
        top = sim.T.topk(min(k, n), dim=1).indices  # (U, k) best images per report
        out[f"t2i_r{k}"] = float(members.T.gather(1, top).any(1).float().mean())
        m = members.sum(0).tolist()
        out[f"t2i_r{k}_chance"] = sum(1 - _comb_ratio(n, mi, k) for mi in m) / u
    return out


def _comb_ratio(n: int, m: int, k: int) -> float:
    """C(n - m, k) / C(n, k): the chance that k images drawn from n miss all m."""
    if k >= n or n - m < k:
        return 0.0
    return math.exp(math.lgamma(n - m + 1) - math.lgamma(n - m - k + 1) - math.lgamma(n + 1) + math.lgamma(n - k + 1))


def label_facts(labels: torch.Tensor, transposed: bool = True) -> dict[str, list[tuple]]:
    """The facts a report states about each binary mask, from :func:`~amvlm_monai.data.describe.find_regions`
    (the describer's defaults, as the demo's and QaTa's reports are written).

    Args:
        labels: (N, 1, W, H) binary masks ({0, 1}) as the pipelines load PNGs (MONAI's ``PILReader`` puts the image's
            columns first), or (N, 1, H, W) in display orientation with ``transposed=False``. Sides and zones are
            only right in the layout the reports were written from; the count holds in either.
        transposed: the masks are (W, H): swap the last two axes before reading the facts.

    Returns:
        ``{"fact": [(count, sides)], "fact_zone": [(count, sides, zones)]}``, one tuple per mask; ``sides`` and
        ``zones`` are sorted tuples of indices (side 0 patient's right, 1 midline, 2 patient's left; zone 0 upper,
        1 middle, 2 lower).

    Raises:
        ValueError: when the labels are not (N, 1, H, W) or not binary (multi-class label maps), with the reason.

    Example:
        >>> m = torch.zeros(1, 1, 32, 32)
        >>> m[0, 0, 24:28, 2:6] = 1  # (x, y): image top right, the upper zone of the patient's left
        >>> label_facts(m)
        {'fact': [(1, (2,))], 'fact_zone': [(1, (2,), (0,))]}
    """
    from amvlm_monai.data.describe import find_regions

    if labels.ndim != 4 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (N, 1, H, W) masks, got {tuple(labels.shape)}.")
    labels = torch.as_tensor(labels).detach().cpu()
    if not ((labels == 0) | (labels == 1)).all():
        values = torch.unique(labels)[:6].tolist()
        raise ValueError(f"labels are not binary (values {values}...): region facts are defined for binary masks "
                         "only (a multi-class label map states other facts).")
    out: dict[str, list[tuple]] = {k: [] for k in FACT_KEYS}
    for mask in (labels[:, 0].transpose(-2, -1) if transposed else labels[:, 0]).numpy():
        regions = find_regions(mask)
        sides = tuple(sorted({r.side for r in regions}))
        out["fact"].append((len(regions), sides))
        out["fact_zone"].append((len(regions), sides, tuple(sorted({z for r in regions for z in r.vertical}))))
    return out


def fact_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_index: torch.Tensor, facts: Sequence[Any],
                ks: Sequence[int] = (1,), name: str = "fact") -> dict[str, float]:
    """Fact-level recall@k both ways, with chance levels.

    A distinct report has the facts of every image it describes. Image-to-report: a hit when one of the k reports
    ranked best for the image has the image's facts. Report-to-image: a hit when one of the k images ranked best for
    the report has one of the report's facts. Candidates are all U reports (N images), the query's own among them;
    ties in similarity go to the lower index. Chance: the probability that k candidates drawn at random hold a hit,
    ``1 - C(M - m, k) / C(M, k)`` with m of the M candidates matching, averaged over queries (images; distinct reports).

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (U, D) embeddings of the U distinct reports.
        text_index: (N,) long: the distinct report of each image.
        facts: N hashable facts, one per image (e.g. :func:`label_facts`).
        ks: the k values.
        name: the metrics' infix.

    Returns:
        ``i2t_<name>_r<k>``, ``t2i_<name>_r<k>`` and their ``..._chance``, all in [0, 1].

    Example:
        >>> e = torch.eye(3)
        >>> out = fact_recall(e, e, torch.arange(3), ["a", "b", "a"])
        >>> out["i2t_fact_r1"], round(out["t2i_fact_r1_chance"], 4)  # chance (2/3 + 1/3 + 2/3) / 3
        (1.0, 0.5556)
    """
    n, u = image_emb.shape[0], text_emb.shape[0]
    if text_index.shape != (n,) or len(facts) != n or n == 0 or u == 0:
        raise ValueError(f"text_index (N,) and facts (N) must match image_emb's N = {n} > 0 with U = {u} > 0, got "
                         f"{tuple(text_index.shape)} and {len(facts)}.")
    codes = {f: i for i, f in enumerate(dict.fromkeys(facts))}
    f = torch.tensor([codes[x] for x in facts], device=image_emb.device)
    has = torch.zeros(u, len(codes), dtype=torch.bool, device=image_emb.device)  # (U, C): report u states fact c
    has[text_index, f] = True
    match = has[:, f].T  # (N, U): report u states image i's facts
    sim = image_emb.float() @ text_emb.float().T  # (N, U)
    i2t = sim.argsort(dim=1, descending=True, stable=True)
    t2i = sim.T.argsort(dim=1, descending=True, stable=True)
    m_i2t, m_t2i = match.sum(1).tolist(), match.sum(0).tolist()
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_{name}_r{k}"] = float(match.gather(1, i2t[:, :k]).any(1).float().mean())
        out[f"i2t_{name}_r{k}_chance"] = sum(1 - _comb_ratio(u, m, k) for m in m_i2t) / n
        out[f"t2i_{name}_r{k}"] = float(match.T.gather(1, t2i[:, :k]).any(1).float().mean())
        out[f"t2i_{name}_r{k}_chance"] = sum(1 - _comb_ratio(n, m, k) for m in m_t2i) / u
    return out


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of ``scores`` for the binary ``labels`` by the rank-sum formula (ties get average ranks); NaN when one
    class is missing.

    Example:
        >>> roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    from scipy.stats import rankdata

    s, y = scores.flatten().double().cpu().numpy(), labels.flatten().bool().cpu().numpy()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def localisation_scores(sim: torch.Tensor, labels: torch.Tensor, bias: float = 0.25) -> dict[str, Any]:
    """Per-image localisation of lesions by patch-report similarity.

    Args:
        sim: (N, h, w) similarity of each patch with the image's report.
        labels: (N, 1, H, W) binary lesion masks (any foreground).
        bias: the initial text mask's threshold b.

    Returns:
        ``loc_auc`` (mean per-image AUC), ``initial_mask_dice`` (the initial text mask ``sim > bias``) and ``ones_dice`` (all-ones mask),
        each averaged over the images that contain a lesion (NaN when none does), and ``n_lesion_images``.
    """
    if sim.ndim != 3 or labels.ndim != 4 or labels.shape[0] != sim.shape[0]:
        raise ValueError(f"sim must be (N, h, w) and labels (N, 1, H, W), got {tuple(sim.shape)}, {tuple(labels.shape)}.")
    from amvlm_monai.evaluation.metrics import segmentation_scores

    up = F.interpolate(sim[:, None].float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    target = (labels[:, :1] > 0).float()
    lesion = target.flatten(1).any(1)
    if not lesion.any():
        nan = float("nan")
        return {"loc_auc": nan, "initial_mask_dice": nan, "ones_dice": nan, "n_lesion_images": 0}
    up, target = up[lesion], target[lesion]
    aucs = [roc_auc(s, y > 0) for s, y in zip(up[:, 0], target[:, 0])]
    dice, _ = segmentation_scores((up > bias).float(), target)
    ones, _ = segmentation_scores(torch.ones_like(target), target)
    return {"loc_auc": sum(aucs) / len(aucs), "initial_mask_dice": float(dice.mean()), "ones_dice": float(ones.mean()),
            "n_lesion_images": len(aucs)}


@torch.no_grad()
def evaluate_alignment(model: torch.nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu",
                       ks: Sequence[int] = (1, 5), bias: float = 0.25) -> dict[str, float]:
    """Retrieval and localisation metrics of an AMVLM over batches with ``image`` (B, C, H, W), ``label``
    (B, 1, H, W) and ``text`` (B reports).

    Returns:
        The metrics of :func:`retrieval_recall`, :func:`fact_recall` at k = 1 for each key of :func:`label_facts`
        (NaN, with a warning giving the reason, when the labels are not binary) and :func:`localisation_scores`, and
        ``alignment``: the mean of the two recall@k (largest k) and the localisation AUC, the key metric for keeping
        a checkpoint.
    """
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    try:
        cls, sims, labels, texts = [], [], [], []
        grid = tuple(net.image_encoder.grid_size)
        text_cache: dict[str, torch.Tensor] = {}
        for batch in batches:
            images = batch["image"].to(device)
            out = net.encode_image(images)
            reports = list(batch["text"])
            new = sorted({t for t in reports if t not in text_cache})
            if new:
                text_cache.update(zip(new, net.text_embeddings(new).float()))
            t = torch.stack([text_cache[r] for r in reports])
            cls.append(out.cls.float())
            sims.append(torch.einsum("bpd,bd->bp", out.tokens.float(), t).reshape(-1, *grid).cpu())
            labels.append(batch["label"].cpu())
            texts += reports
    finally:
        net.train(was_training)
    if not texts:
        raise ValueError("evaluate_alignment got no batches.")
    distinct = sorted(set(texts))
    index = torch.tensor([distinct.index(t) for t in texts], device=cls[0].device)
    text_emb = torch.stack([text_cache[t] for t in distinct]).to(cls[0].device)
    image_emb, labels_all = torch.cat(cls), torch.cat(labels)
    metrics: dict[str, Any] = retrieval_recall(image_emb, text_emb, index, ks)
    try:
        facts = label_facts(labels_all)
    except ValueError as err:
        reason = f"stage-1 validation: fact-level recall not computed: {err}"
        if reason not in _warned:
            _warned.add(reason)
            logger.warning(reason)
        facts = {}
    for name in FACT_KEYS:
        if name in facts:
            metrics.update(fact_recall(image_emb, text_emb, index, facts[name], ks=(1,), name=name))
        else:
            metrics.update({f"{d}_{name}_r1{c}": float("nan") for d in ("i2t", "t2i") for c in ("", "_chance")})
    metrics.update(localisation_scores(torch.cat(sims), labels_all, bias))
    k = max(ks)
    parts = [metrics[f"i2t_r{k}"], metrics[f"t2i_r{k}"], metrics["loc_auc"]]
    metrics["alignment"] = sum(p for p in parts if math.isfinite(p)) / len(parts)
    metrics["n_images"], metrics["n_reports"] = len(texts), len(distinct)
    return metrics


@torch.no_grad()
def refresh_bn_statistics(model: torch.nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu",
                          max_images: int = 256) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of an AMVLM's online towers and heads as the plain
    average over training batches (``torch.optim.swa_utils.update_bn`` for image-report batches).

    The exponential running averages of training lag behind weights that move fast (``docs/method.md``,
    "Measurements behind the defaults"). The momentum copies normalise with batch statistics and are not touched.

    Args:
        model: the AMVLM (or a DDP wrapper of it).
        batches: dicts with ``image`` (B, C, H, W) and ``text`` (B reports), e.g. the pretraining loader.
        device: where the model is.
        max_images: stop after the batch that reaches this many images.

    Returns:
        The number of images seen (0: no BatchNorm layer or no batch; the statistics are then left as they were).
    """
    net = unwrap(model, parallel_only=True)

    def forward(batch: dict) -> int:
        images = batch["image"].to(device)
        net.encode_image(images)
        net.encode_text(net.tokenize(list(batch["text"]), device))
        return images.shape[0]

    return refresh_batchnorm(net, forward, batches, max_images, skip=lambda name: name.startswith("momentum_"))


@torch.no_grad()
def alignment_maps(model: torch.nn.Module, image: str, reports: Sequence[str]) -> dict:
    """Where on one image each report matches, and how unsure the PDT is there, on the ViT's patch grid (h, w).

    Args:
        model: a pretrained :class:`~amvlm_monai.networks.amvlm.AMVLM`.
        image: an image file (read through the inference transforms of the model's size and channels).
        reports: K reports.

    Returns:
        dict with ``image`` (C, H, W) as the model saw it, ``reports``, ``similarity`` (K, h, w): cosine of every
        patch embedding with each report's global embedding; ``variance_image`` (h, w): the PDT's sigma^2 of the
        patch tokens, mean over D; ``variance_attended`` (K, h, w): the same for the report's words attended by each
        patch (the distribution CSS compares with the patch's).
    """
    from amvlm_monai.networks.outputs import TokenOutput
    from amvlm_monai.transforms.pipelines import inference_transforms

    if not reports:
        raise ValueError("no report given.")
    model.eval()
    chain = inference_transforms(model.config["image_size"], in_channels=model.config.get("in_channels", 1))
    device = next(model.parameters()).device
    x = torch.as_tensor(chain({"image": image})["image"]).float()[None].to(device)
    grid = tuple(model.image_encoder.grid_size)
    k = len(reports)
    img = model.encode_image(x)
    txt = model.encode_text(model.tokenize(list(reports), device))
    sim = (img.tokens[0] @ txt.cls.T).T.reshape(k, *grid)
    _, sigma = model.pdt_image(img.tokens, img.mask)
    per_report = TokenOutput(cls=img.cls.expand(k, -1), tokens=img.tokens.expand(k, -1, -1),
                             mask=img.mask.expand(k, -1), attn=None)
    att_words, _ = model.cross_attend(per_report, txt)
    _, sigma_att = model.pdt_attended(att_words, per_report.mask)
    return {"image": x[0].cpu(), "reports": list(reports), "similarity": sim.cpu(),
            "variance_image": sigma[0].pow(2).mean(-1).reshape(grid).cpu(),
            "variance_attended": sigma_att.pow(2).mean(-1).reshape(k, *grid).cpu()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the alignment metrics of a stage-1 checkpoint on one split of a datalist, as JSON."""
    from amvlm_monai.utils.args import Arg, arg_type

    positive = arg_type(Arg("int", "", 1))
    parser = argparse.ArgumentParser(prog="python -m amvlm_monai.evaluation.alignment", description=main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="stage-1 checkpoint (amvlm_pretrained.pt)")
    parser.add_argument("--datalist", required=True, help="datalist.json of a converted data set")
    parser.add_argument("--key", default="validation", help="the split (its items need label and text)")
    parser.add_argument("--limit", type=positive, default=None, help="score the first N items only (N >= 1)")
    parser.add_argument("--batch-size", type=positive, default=32)
    args = parser.parse_args(argv)
    from amvlm_monai.utils.errors import cli_errors

    with cli_errors():
        from monai.data import DataLoader, Dataset

        from amvlm_monai.data.datalist import load_datalist
        from amvlm_monai.networks.amvlm import load_amvlm
        from amvlm_monai.transforms.pipelines import segmentation_transforms

        model = load_amvlm(args.checkpoint)
        items = load_datalist(args.datalist, args.key)[: args.limit]
        chain = segmentation_transforms(model.config["image_size"], labeled=True,
                                        in_channels=model.config.get("in_channels", 1))
        metrics = evaluate_alignment(model, DataLoader(Dataset(items, chain), batch_size=args.batch_size))
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
