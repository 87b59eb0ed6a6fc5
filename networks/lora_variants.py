"""LoRA variants as small pieces over :class:`networks.lora.LoRAModule`: rsLoRA and DoRA.

rsLoRA (Kalajdzievski 2023) scales the update by ``alpha / sqrt(r)`` instead of ``alpha / r``.
It needs no module of its own: the network stores ``alpha' = alpha · sqrt(r)`` in each module's
``alpha`` buffer, so ``alpha' / r = alpha / sqrt(r)`` and every kohya consumer of the file applies
the right scale; the PEFT export divides it back out and writes ``use_rslora: true``.

DoRA (Liu et al. 2024) splits each weight into a magnitude and a direction:

    y = m ⊙ (W x + s · B A x) / ‖W + s · B A‖_row  (+ bias)

``m`` (one value per output feature) starts at ``‖W‖_row`` and is trained with ``A`` and ``B``;
the norm is detached, as the paper's section 4.3 and PEFT do. The base weight of a
bitsandbytes 4-bit or 8-bit layer is dequantized for the norm.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import nn

from library.errors import UserError
from networks.conv1d import is_linear_like, linear_weight
from networks.lora import LoRAModule
from networks.targets import TargetSpec, unet_spec_for


def rslora_alpha(alpha: float | None, dim: int) -> float:
    """The alpha to store so that kohya's ``alpha / dim`` equals rsLoRA's ``alpha / sqrt(dim)``."""
    alpha = float(dim) if alpha is None or float(alpha) == 0 else float(alpha)
    return alpha * math.sqrt(dim)


def user_alpha(stored_alpha: float, dim: int, use_rslora: bool) -> float:
    """The inverse of :func:`rslora_alpha` (identity without rsLoRA), rounded off float noise."""
    return round(stored_alpha / math.sqrt(dim), 6) if use_rslora else stored_alpha


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense ``(out, in)`` tensor: bitsandbytes 4-bit / 8-bit weights are dequantized, a
    transformers Conv1D's ``(in, out)`` weight is transposed (a view), so DoRA's row norms are per output feature."""
    weight = module.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnb_f

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU kernel on the first no-grad forward;
            # undo that on a copy of the state, leaving the layer as it is.
            data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        return bnb_f.dequantize_4bit(data, state)
    if kind == "Int8Params":
        scale = getattr(weight, "SCB", None)
        if scale is None:
            scale = module.state.SCB
        # Linear8bitLt stores W row-wise as round(127 · W / absmax(row)), absmax in SCB.
        return weight.data.float() * scale.float().view(-1, 1) / 127.0
    return linear_weight(module)


class DoRAModule(LoRAModule):
    """A LoRA whose update is rescaled row by row to a trained magnitude (see the module docstring).

    The magnitude is the parameter ``magnitude`` (key ``<lora_name>.magnitude``); a PEFT export
    writes it as ``lora_magnitude_vector``.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, *args, **kwargs) -> None:
        super().__init__(lora_name, org_module, *args, **kwargs)
        if self.is_conv:
            raise UserError(f"{lora_name}: use_dora supports Linear layers only; leave out conv_dim.")
        with torch.no_grad():
            norm = torch.linalg.norm(dense_weight(org_module).float(), dim=1)
        self.magnitude = nn.Parameter(norm)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0:
            return out
        if self.training and self.module_dropout > 0 and torch.rand(()).item() < self.module_dropout:
            return out
        scale = self.multiplier * self.scale
        with torch.no_grad():
            delta = self.lora_up.weight.float() @ self.lora_down.weight.float()
            weight = dense_weight(self.org_module).float().to(delta.device)
            norm = torch.linalg.norm(weight + scale * delta, dim=1)
        mag_scale = (self.magnitude / norm).to(out.dtype)
        bias = self.org_module.bias
        base = out if bias is None else out - bias
        # W x + (m/‖·‖ - 1) W x + m/‖·‖ · s B A x  =  m/‖·‖ · (W x + s B A x)
        return (out + (mag_scale - 1) * base + mag_scale * self.lora_delta(x)).to(out.dtype)


class Variant:
    """The variant options of ``--network_args`` (target_modules, use_rslora, use_dora) for one network."""

    def __init__(self, args: Mapping[str, object]) -> None:
        self.target_modules: tuple[str, ...] | None = args.get("target_modules")  # type: ignore[assignment]
        self.use_rslora = bool(args.get("use_rslora"))
        self.use_dora = bool(args.get("use_dora"))

    @staticmethod
    def from_weights(args: Mapping[str, object], weights_sd: Mapping[str, torch.Tensor]
                     ) -> tuple[Variant, dict[str, torch.Tensor]]:
        """The variant of a saved file and its plain LoRA tensors: ``.magnitude`` keys mean DoRA.

        Stored alphas already hold any rsLoRA scaling, so nothing is rescaled here.
        """
        is_dora = any(k.endswith(".magnitude") for k in weights_sd)
        variant = Variant({**args, "use_dora": bool(args.get("use_dora")) or is_dora})
        return variant, {k: v for k, v in weights_sd.items() if not k.endswith(".magnitude")}

    @property
    def module_class(self) -> type[LoRAModule]:
        return DoRAModule if self.use_dora else LoRAModule

    def alpha(self, alpha: float | None, dim: int | None) -> float | None:
        """The alpha to store for a module of ``dim`` (rsLoRA folds its sqrt into it)."""
        return rslora_alpha(alpha, dim) if self.use_rslora and dim else alpha

    def spec(self, base: TargetSpec, model: object = None, from_weights: bool = False) -> TargetSpec:
        """The target spec of ``model`` (a causal LM gets all-linear), narrowed by target_modules."""
        if model is not None:
            return unet_spec_for(model, base, self.target_modules, from_weights)
        return dataclasses.replace(base, target_modules=self.target_modules) if self.target_modules else base

    def attach(self, network: nn.Module, model: nn.Module | None = None, from_weights: bool = False) -> nn.Module:
        """Record the options on the network (the PEFT export reads them) and check the targets.

        ``from_weights``: the network was sized by a file (create_network_from_weights), which decides the modules.
        """
        network.use_rslora, network.use_dora = self.use_rslora, self.use_dora
        network.target_modules = self.target_modules
        if not self.target_modules:
            return network
        # the model's own Linear names, so a Phi-3 (qkv_proj) or GPT-NeoX (query_key_value) user sees theirs
        names = sorted({n.rsplit(".", 1)[-1] for n, m in (model.named_modules() if model is not None else [])
                        if is_linear_like(m)} - {"lm_head"})
        example = ",".join(names) if names else "q_proj,k_proj,v_proj,o_proj"
        rule = "(a name matches a module path that equals it or ends with '.name')"
        given = ",".join(self.target_modules)
        if not network.all_loras():
            raise UserError(f"--network_args target_modules={given} matched no Linear layer of the model; this "
                            f"model's Linear layers are named {example} {rule}.")
        if model is not None:  # one misspelt name among good ones would otherwise train silently without it
            adapted = {id(lora.org_module) for lora in getattr(network, "unet_loras", [])}
            paths = [path for path, m in model.named_modules() if id(m) in adapted]
            unmatched = [t for t in self.target_modules
                         if not any(path == t or path.endswith("." + t) for path in paths)]
            if unmatched and from_weights:
                raise UserError(f"--network_args target_modules={given}: the weights have no module for "
                                f"{', '.join(unmatched)} (with --dim_from_weights the file decides the modules); "
                                "leave those names out, or train a new LoRA without --dim_from_weights.")
            if unmatched:
                raise UserError(f"--network_args target_modules={given}: {', '.join(unmatched)} matched no Linear "
                                f"layer of the model; this model's Linear layers are named {example} {rule}.")
        return network
