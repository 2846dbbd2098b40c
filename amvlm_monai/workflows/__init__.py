"""Workflows with console entry points: the paper's protocol, the demo, the model-zoo export."""
