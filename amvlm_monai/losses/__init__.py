"""Losses of AMVLM: stage 1 (contrastive, CSS, ICL) and stage 2."""

from amvlm_monai.losses.contrastive import (
    ImageTextContrastiveLoss,
    LocalGlobalLoss,
    NonFiniteLossError,
    PooledPatchTextLoss,
    info_nce,
)
from amvlm_monai.losses.css import CSSLoss, attention_token_weights, w2_pairwise
from amvlm_monai.losses.icl import ICLLoss
