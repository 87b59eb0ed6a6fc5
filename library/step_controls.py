"""What the loop does to the network around each optimizer step, besides the step itself.

sd-scripts' ``--scale_weight_norms`` (max-norm regularisation after the step) and
``--stop_text_encoder_training`` (the text encoder LoRA stops training after N steps); the loop
calls each in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from library.errors import UserError


def check_max_norm_support(network: Any, max_norm: float | None, network_module: str) -> None:
    """Refuse --scale_weight_norms up front for a network module without kohya's method for it."""
    if max_norm and not callable(getattr(network, "apply_max_norm_regularization", None)):
        raise UserError(f"--scale_weight_norms: the network of --network_module {network_module} has no "
                        "apply_max_norm_regularization(max_norm_value, device); remove the option.")


def max_norm_logs(network: Any, max_norm: float | None, device: Any) -> dict[str, float]:
    """Apply --scale_weight_norms after an optimizer step; returns the values sd-scripts logs ({} when off)."""
    if not max_norm:
        return {}
    keys_scaled, mean_norm, largest = network.apply_max_norm_regularization(max_norm, device)
    return {"max_norm/keys_scaled": keys_scaled, "max_norm/average_key_norm": mean_norm,
            "max_norm/max_key_norm": largest}


class TextEncoderStop:
    """--stop_text_encoder_training: after ``at_step`` optimizer steps the text encoder LoRA stops training.

    With one process, its parameters stop requiring gradients and the text encoders run without
    autograd, as in sd-scripts (less work per step). With several, DDP expects a gradient for every
    parameter it was built with, so the graph stays and the synced gradients of those parameters are
    dropped before each optimizer step instead. Either way the optimizer skips a parameter without a
    gradient: the weights, and their optimizer state, stay exactly as they are (no weight decay either).
    ``at_step`` <= 0: the text encoder LoRA never trains.
    """

    def __init__(self, at_step: int | None, network: Any, family: Any, num_processes: int,
                 log: Callable[[str], None]) -> None:
        self.at_step, self.family, self.num_processes, self.log = at_step, family, num_processes, log
        self.params: list[torch.nn.Parameter] = [
            p for lora in getattr(network, "text_encoder_loras", []) for p in lora.parameters() if p.requires_grad]
        self.stopped = False
        if at_step is not None and not self.params:
            log("--stop_text_encoder_training: no text encoder LoRA is being trained; nothing to stop.")

    def update(self, global_step: int) -> None:
        """Call before the first step (a resumed run may be past it) and after every optimizer step."""
        if self.stopped or self.at_step is None or not self.params or global_step < self.at_step:
            return
        self.stopped = True
        if self.num_processes == 1:
            for p in self.params:
                p.requires_grad_(False)
            if hasattr(self.family, "train_text_encoder"):
                self.family.train_text_encoder = False
        self.log(f"--stop_text_encoder_training {self.at_step}: the text encoder LoRA stops training "
                 f"at step {global_step}.")

    def drop_gradients(self) -> None:
        """Call when the step's gradients are synced, before clipping and the optimizer step."""
        if self.stopped and self.num_processes > 1:
            for p in self.params:
                p.grad = None
