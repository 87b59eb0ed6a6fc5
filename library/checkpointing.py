"""Gradient checkpointing of a frozen transformers model that stays in eval mode.

transformers checkpoints a layer only while it is in training mode, and training mode also turns on the
model's dropout (attention_dropout, hidden dropout of Phi, OPT, GPT-NeoX, Falcon, ...): a memory switch would
change the training maths, and the validation loss would be noisy. Here each checkpointable layer is wrapped
in torch's non-reentrant checkpoint directly, so the model keeps its eval mode: the same losses and gradients
with or without checkpointing, only the memory and time differ.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

_WRAPPED = "_checkpoint_in_eval_mode"


def checkpoint_layers(model: torch.nn.Module) -> int:
    """Checkpoint every transformers ``GradientCheckpointingLayer`` of ``model`` whatever its mode (while
    gradients are enabled); returns how many. 0 means the model has none (older or custom model code): the
    caller falls back to transformers' own switch, which needs training mode."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers before the class existed
        return 0
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        if getattr(layer, _WRAPPED, False):
            continue
        forward = layer.forward  # the class's forward, bound; in eval mode transformers does not checkpoint it

        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                # Non-reentrant: the LoRA inside gets its gradients even when the layer's input needs none
                # (frozen embeddings), and DDP's search for unused parameters keeps working.
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = checkpointed
        setattr(layer, _WRAPPED, True)
    return len(layers)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing for a frozen transformers model, keeping its eval mode where the model allows."""
    model.eval()
    if checkpoint_layers(model):
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()  # transformers checkpoints only in training mode (its dropout then runs too)
