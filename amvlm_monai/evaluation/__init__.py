"""Evaluation: segmentation metrics, stage-1 alignment scores, alignment uncertainty, figures."""
