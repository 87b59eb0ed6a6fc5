"""LoRA for SD1.x/2.x UNets and CLIP text encoders, behind kohya's network-module contract.

``--network_module networks.lora`` loads this file: :func:`create_network` and
:func:`create_network_from_weights` build a :class:`LoRANetwork`, whose ``state_dict`` is exactly
the kohya file format (``<lora_name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).
Each adapted layer computes ``y = W x + multiplier · (alpha / r) · up(down(x))``; the weight
math lives in :mod:`networks.functional`, the naming rules in :mod:`networks.targets`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from library.errors import UserError
from library.fileio import atomic_save_safetensors, atomic_torch_save
from library.metadata import add_hashes
from networks.block_lr import BLOCK_KEYS, LR_KEYS, block_plan, reject_for_weights
from networks.conv1d import is_linear_like, linear_features, linear_weight
from networks.fast_lora import fast_kind, install_compute_copies, lora_forward, plain_delta
from networks.functional import delta_norm, max_norm_ratios, merged_weight
from networks.lora_args import NETWORK_ARGS, parse_network_args  # noqa: F401  (re-exported)
from networks.lora_fit import check_all_found, fit_to_network
from networks.targets import (
    CLIP_TEXT,
    SD_UNET,
    Target,
    TargetSpec,
    find_targets,
    input_embedding_weight,
    ranks_from_weights,
    text_encoder_specs,
)

logger = logging.getLogger(__name__)

DEFAULT_DIM = 4
DEFAULT_ALPHA = 1.0
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


class LoRAModule(nn.Module):
    """A low-rank adapter hooked onto one ``nn.Linear``, transformers ``Conv1D`` or ``nn.Conv2d``.

    ``y = org(x) + multiplier · (alpha / dim) · up(down(x))``; ``down`` is Kaiming-uniform and
    ``up`` zero at creation, so a new adapter changes nothing. ``apply_to`` replaces the original
    module's ``forward`` rather than the module itself, so the base model's own ``state_dict``
    keys stay the same; the original module is deliberately not a registered submodule, so it
    never appears in this module's ``state_dict`` or ``parameters()``.

    In training mode only: ``dropout`` drops elements of ``down(x)``, ``rank_dropout`` drops whole
    ranks per sample (the rest rescaled by 1/(1-p)), ``module_dropout`` skips the adapter.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = DEFAULT_DIM,
        alpha: float | None = DEFAULT_ALPHA,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if lora_dim < 1:
            raise ValueError(f"{lora_name}: LoRA dim must be at least 1, got {lora_dim}")
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        if isinstance(org_module, nn.Conv2d):
            self.is_conv = True
            self.lora_down = nn.Conv2d(
                org_module.in_channels, lora_dim, org_module.kernel_size, org_module.stride,
                org_module.padding, org_module.dilation, bias=False,
            )  # fmt: skip
            self.lora_up = nn.Conv2d(lora_dim, org_module.out_channels, 1, bias=False)
        elif is_linear_like(org_module):  # a Conv1D too: its factors keep Linear's orientation (conv1d.py)
            self.is_conv = False
            n_in, n_out = linear_features(org_module)
            self.lora_down = nn.Linear(n_in, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, n_out, bias=False)
        else:
            raise TypeError(f"{lora_name}: LoRA supports Linear, Conv1D and Conv2d, not {type(org_module).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        # kohya: alpha None or 0 means "no scaling" (alpha = dim).
        alpha = float(lora_dim) if alpha is None or float(alpha) == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim
        # A loaded state dict may carry another alpha; keep the cached float scale in sync.
        self.register_load_state_dict_post_hook(_refresh_scale_after_load)

        self.multiplier = multiplier
        self.dropout = dropout or 0.0
        self.rank_dropout = rank_dropout or 0.0
        self.module_dropout = module_dropout or 0.0
        self._org = (org_module,)  # a tuple is not registered as a submodule
        self.org_forward: Callable[..., torch.Tensor] | None = None
        self._fast: str | None = None  # set by apply_to
        self._copies = None  # (ComputeCopies, index), set by the network's apply_to

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha) / self.lora_dim

    def apply_to(self) -> None:
        if self.org_forward is not None:
            raise RuntimeError(f"{self.lora_name} is already applied")
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward
        # The fused op (networks/fast_lora.py) where it reproduces this forward exactly; subclasses (DoRA) opt out.
        self._fast = fast_kind(self.org_module, self.org_forward) if type(self).forward is LoRAModule.forward else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return lora_forward(self, x, *args, **kwargs)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``multiplier · scale · up(down(x))`` with the training-time dropouts: the plain formulation."""
        return plain_delta(self, x)

    @torch.no_grad()
    def merge_weights(self, down: torch.Tensor, up: torch.Tensor, alpha: float, device: object = None) -> None:
        """Add ``multiplier · alpha/dim · up ⊗ down`` into the original module's weight, in place."""
        weight = linear_weight(self.org_module)  # a Conv1D's is a transposed view: copy_ writes the parameter
        device = device if device is not None else weight.device
        # merged_weight works in float32, so fp16/bf16 base weights lose nothing to the delta.
        merged = merged_weight(
            weight.to(device), down.to(device), up.to(device), alpha / down.shape[0], self.multiplier
        )
        weight.copy_(merged)


def _refresh_scale_after_load(module: LoRAModule, _incompatible_keys: object) -> None:
    module.refresh_scale()


def _check_probability(name: str, value: float | None) -> float | None:
    if value is not None and not 0.0 <= value < 1.0:
        raise UserError(f"{name} must be in [0, 1), got {value}")
    return value


class LoRANetwork(nn.Module):
    """All LoRA modules of one UNet (or LLM) and its text encoders.

    Modules are registered under their kohya names, so ``state_dict()`` is the file format.
    ``modules_dim`` / ``modules_alpha`` (lora_name → value) select and size the modules exactly,
    as when loading a file with mixed ranks; otherwise every target of the specs gets
    ``lora_dim`` / ``alpha`` (kxk convs ``conv_lora_dim`` / ``conv_alpha`` when given).
    """

    def __init__(
        self,
        text_encoders: Sequence[nn.Module],
        unet: nn.Module | None,
        multiplier: float = 1.0,
        lora_dim: int = DEFAULT_DIM,
        alpha: float = DEFAULT_ALPHA,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float] | None = None,
        unet_spec: TargetSpec = SD_UNET,
        text_encoder_spec: TargetSpec = CLIP_TEXT,
        module_class: type[LoRAModule] = LoRAModule,
        block_ranks: Callable[[Target], tuple[int, float | None] | None] | None = None,
    ) -> None:
        super().__init__()
        self._block_ranks = block_ranks  # block_dims, block lr weights (networks/block_dims.py, block_lr.py)
        self.module_class, self.multiplier = module_class, multiplier  # module_class: e.g. DoRA (lora_variants.py)
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout = _check_probability("dropout", dropout)
        self.rank_dropout = _check_probability("rank_dropout", rank_dropout)
        self.module_dropout = _check_probability("module_dropout", module_dropout)
        self._modules_dim = dict(modules_dim) if modules_dim is not None else None
        self._modules_alpha = dict(modules_alpha or {})
        self._frozen: set[str] = set()  # lora names frozen by a learning rate of 0
        self.loraplus_ratios: dict[str, float | None] = {}  # "unet" / "textencoder" -> LoRA+ ratio
        self._dropped: set[str] = set()  # lora names left out by apply_to(apply_*=False)
        self._applied = False

        te_specs = text_encoder_specs(len(text_encoders), text_encoder_spec)
        self._te_prefixes = [spec.prefix + "_" for spec in te_specs]
        self.text_encoder_loras = [
            lora for te, spec in zip(text_encoders, te_specs, strict=True) for lora in self._create_modules(te, spec)
        ]
        self.unet_loras = self._create_modules(unet, unet_spec) if unet is not None else []
        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in self._modules:
                raise ValueError(f"duplicate LoRA name {lora.lora_name}")
            self.add_module(lora.lora_name, lora)
        logger.info(
            "LoRA: %d text encoder modules, %d UNet modules", len(self.text_encoder_loras), len(self.unet_loras)
        )

        if self._modules_dim is not None:
            self._check_all_found(list(zip(text_encoders, te_specs, strict=True))
                                  + ([(unet, unet_spec)] if unet is not None else []))

    def _rank_for(self, target: Target) -> tuple[int, float | None] | None:
        """(dim, alpha) of a target, or None to leave it out. Block-wise ranks plug in here."""
        if self._modules_dim is not None:
            if target.lora_name not in self._modules_dim:
                return None
            dim = self._modules_dim[target.lora_name]
            return dim, self._modules_alpha.get(target.lora_name, dim)
        if self._block_ranks is not None and target.lora_name.startswith("lora_unet_"):
            return self._block_ranks(target)
        if target.is_kxk_conv:
            return (self.conv_lora_dim, self.conv_alpha) if self.conv_lora_dim else None
        return self.lora_dim, self.alpha

    def _create_modules(self, root: nn.Module, spec: TargetSpec) -> list[LoRAModule]:
        # Loaded files decide for themselves whether they contain conv LoRAs.
        include_conv = self._modules_dim is not None or bool(self.conv_lora_dim) or \
            getattr(self._block_ranks, "include_conv", self._block_ranks is not None)
        loras = []
        shared = input_embedding_weight(root)
        for target in find_targets(root, spec, include_conv):
            rank = self._rank_for(target)
            if rank is None:
                continue
            if shared is not None and getattr(target.module, "weight", None) is shared:
                logger.warning(
                    "%s shares its weight with the input embeddings (tie_word_embeddings): its LoRA changes the "
                    "output projection only (as in PEFT); tools/merge.py gives it a weight of its own when it "
                    "bakes the LoRA in", target.path)
            dim, alpha = rank
            dropouts = (self.dropout, self.rank_dropout, self.module_dropout)
            loras.append(self.module_class(target.lora_name, target.module, self.multiplier, dim, alpha, *dropouts))
        return loras

    def _check_all_found(self, roots: Sequence[tuple[nn.Module, TargetSpec]]) -> None:
        check_all_found(self._modules_dim, self._modules, roots)

    def all_loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    # --- kohya's network-module contract -------------------------------------------------------

    def apply_to(
        self, text_encoder: object, unet: object, apply_text_encoder: bool = True, apply_unet: bool = True
    ) -> None:
        """Hook the LoRAs into the models given at construction; a False flag drops those modules."""
        if self._applied:
            raise RuntimeError("LoRA network is already applied")
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.all_loras():
            lora.apply_to()
        roots = [*_as_list(text_encoder), unet]
        self._copy_hooks = install_compute_copies(self.all_loras(), [r for r in roots if isinstance(r, nn.Module)])
        self._applied = True

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            delattr(self, lora.lora_name)
            self._dropped.add(lora.lora_name)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.all_loras():
            lora.multiplier = multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: checkpointing the base model covers the adapters too."""

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None = None,
    ) -> tuple[list[dict], list[str]]:
        """Parameter groups ``{"params", "lr"}`` and their descriptions ("textencoder", "unet").

        A None rate falls back to ``default_lr``; a rate of 0 freezes that part and leaves its
        group out. ``text_encoder_lr`` may be a sequence (one rate per encoder, SDXL).
        """
        from networks.param_groups import param_groups

        return param_groups(self, text_encoder_lr, unet_lr, default_lr)

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio: float | None, loraplus_unet_lr_ratio: float | None = None,
                              loraplus_text_encoder_lr_ratio: float | None = None) -> None:
        """LoRA+ ratios (kohya's method): a part's own ratio, else the common one; None leaves LoRA+ off."""
        self.loraplus_ratios = {"unet": loraplus_unet_lr_ratio or loraplus_lr_ratio,
                                "textencoder": loraplus_text_encoder_lr_ratio or loraplus_lr_ratio}

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: object = None) -> tuple[int, float, float]:
        """``--scale_weight_norms`` as sd-scripts: a module whose delta ``scale · up ⊗ down`` has a norm above
        ``max_norm_value`` gets up and down scaled by ``sqrt(max_norm_value / norm)``. Returns (modules scaled,
        mean and largest delta norm after it); ``device`` is for kohya compatibility (one sync, where the weights are).
        """
        loras = self.all_loras()
        if not loras:
            return 0, 0.0, 0.0
        norms = torch.stack([delta_norm(lo.lora_down.weight, lo.lora_up.weight, lo.scale) for lo in loras])
        ratios = max_norm_ratios(norms, max_norm_value)
        scaled_norms, ratios = (norms * ratios).cpu(), ratios.cpu()
        for lora, ratio in zip(loras, ratios.tolist(), strict=True):
            if ratio != 1.0:
                lora.lora_up.weight.mul_(ratio**0.5)
                lora.lora_down.weight.mul_(ratio**0.5)
        return int((ratios != 1.0).sum()), scaled_norms.mean().item(), scaled_norms.max().item()

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def prepare_grad_etc(self, text_encoder: object, unet: object) -> None:
        for lora in self.all_loras():
            lora.requires_grad_(lora.lora_name not in self._frozen)

    def on_epoch_start(self, text_encoder: object, unet: object) -> None:
        self.train()

    def load_weights(self, file: str | os.PathLike) -> object:
        """Load a kohya LoRA file or a PEFT adapter folder; mismatched keys or shapes raise a UserError naming it."""
        from networks.peft_export import load_network_weights

        weights_sd = fit_to_network(file, load_network_weights(file), self.state_dict(), self._dropped,
                                    getattr(self._block_ranks, "lr_blocks", None) is not None)
        try:
            return self.load_state_dict(weights_sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"{file} does not match this network: {e}") from None

    def save_weights(
        self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str] | None
    ) -> None:
        """Write the kohya file atomically; with metadata, the sshs hashes are added to it."""
        state_dict = {}
        for key, value in self.state_dict().items():
            value = value.detach().to("cpu")
            state_dict[key] = (value if dtype is None else value.to(dtype)).contiguous()
        if os.fspath(file).endswith(".safetensors"):
            meta = add_hashes(state_dict, dict(metadata)) if metadata is not None else None
            atomic_save_safetensors(state_dict, file, meta)
        else:
            atomic_torch_save(state_dict, file)

    @torch.no_grad()
    def merge_to(
        self,
        text_encoder: object,
        unet: object,
        weights_sd: Mapping[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Add every module's delta from ``weights_sd`` into the original weights, in place.

        The delta is computed in float32 on ``device`` (default: the weight's) and stored in the weight's
        own dtype; ``dtype`` is accepted for kohya compatibility. Modules absent from ``weights_sd`` are skipped.
        """
        merged = 0
        for lora in self.all_loras():
            down = weights_sd.get(f"{lora.lora_name}.lora_down.weight")
            if down is None:
                continue
            up = weights_sd[f"{lora.lora_name}.lora_up.weight"]
            # A missing or zero alpha means alpha = dim (scale 1), as at creation.
            alpha = float(weights_sd.get(f"{lora.lora_name}.alpha", 0.0)) or float(down.shape[0])
            lora.merge_weights(down, up, alpha, device)
            merged += 1
        logger.info("merged %d LoRA modules into the model weights", merged)


def _as_list(text_encoder: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [text_encoder]
    return [te for te in text_encoder if te is not None]


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **network_args: object,
) -> LoRANetwork:
    """A new LoRA network, the identity until trained.

    ``network_args`` (strings from ``--network_args key=value``): conv_dim, conv_alpha, rank_dropout, module_dropout,
    target_modules, use_rslora, use_dora (networks/lora_variants.py; a causal LM as ``unet``: all Linear but lm_head).
    """
    from networks.lora_variants import Variant  # it builds on LoRAModule, so it is imported late

    variant = Variant(args := parse_network_args(network_args))
    conv_dim, conv_alpha = args.get("conv_dim"), args.get("conv_alpha")
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = DEFAULT_ALPHA
    dim = network_dim if network_dim is not None else DEFAULT_DIM
    network = LoRANetwork(
        _as_list(text_encoder),
        unet,
        multiplier=multiplier,
        lora_dim=dim,
        alpha=variant.alpha(network_alpha if network_alpha is not None else DEFAULT_ALPHA, dim),
        dropout=neuron_dropout,
        rank_dropout=args.get("rank_dropout"),
        module_dropout=args.get("module_dropout"),
        conv_lora_dim=conv_dim,
        conv_alpha=variant.alpha(conv_alpha, conv_dim),
        unet_spec=variant.spec(SD_UNET, unet),
        text_encoder_spec=variant.spec(CLIP_TEXT),
        module_class=variant.module_class,
        block_ranks=block_plan(unet, variant.alpha, dim, network_alpha, conv_dim, conv_alpha,
                               *map(args.get, BLOCK_KEYS)),
    )
    network.set_loraplus_lr_ratio(*(args.get(k) for k in LORAPLUS_KEYS))
    return variant.attach(network, unet)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like a saved file: every module's dim and alpha (conv ones too) from the weights.

    The weights are returned, not loaded: call ``load_weights``/``load_state_dict`` or ``merge_to``.
    ``for_inference`` is accepted for kohya compatibility; the same module serves both uses.
    ``kwargs`` may carry ``neuron_dropout`` and the network_args (dims there are ignored).
    """
    if weights_sd is None:
        if file is None:
            raise UserError("create_network_from_weights needs a file or weights_sd")
        from networks.peft_export import load_network_weights

        weights_sd = load_network_weights(file)
    from networks.lora_variants import Variant

    neuron_dropout = kwargs.pop("neuron_dropout", None)
    args = parse_network_args(kwargs)
    reject_for_weights(*map(args.get, LR_KEYS))  # the file decides the modules: refused, not ignored
    variant, lora_sd = Variant.from_weights(args, weights_sd)
    modules_dim, modules_alpha = ranks_from_weights(lora_sd)
    network = LoRANetwork(
        _as_list(text_encoder),
        unet,
        multiplier=multiplier,
        dropout=neuron_dropout,
        rank_dropout=args.get("rank_dropout"),
        module_dropout=args.get("module_dropout"),
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
        unet_spec=variant.spec(SD_UNET, unet, from_weights=True),
        module_class=variant.module_class,
    )
    network.set_loraplus_lr_ratio(*(args.get(k) for k in LORAPLUS_KEYS))
    return variant.attach(network, unet, from_weights=True), weights_sd
