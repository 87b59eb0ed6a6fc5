"""The network of a run: the --network_module imported and checked, built on the family's models, loaded.

Another package's module (LyCORIS, ...) that fails while building gets one clear error naming the package and
its version instead of a traceback; this project's own modules keep their tracebacks (a bug to report).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.step_controls import check_max_norm_support


def import_network_module(name: str):
    """Import a --network_module and check it provides kohya's contract (CONTRACTS.md §5)."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        shipped = ("networks.dylora", "networks.lora_fa", "networks.oft", "networks.lora_flux", "networks.lora_sd3")
        hint = ("; sd-scripts ships it, this toolkit does not: use networks.lora (or lycoris.kohya with LyCORIS "
                "installed)" if name in shipped else "")
        raise UserError(f"--network_module {name}: cannot import it ({e}){hint}.") from None
    for required in ("create_network", "create_network_from_weights"):
        if not hasattr(module, required):
            raise UserError(f"--network_module {name} has no {required}(); it must provide kohya's network API.")
    return module


def network_args_dict(items: list[str] | None) -> dict[str, str]:
    """``--network_args k=v ...`` as strings, which is how network modules receive them."""
    out: dict[str, str] = {}
    for item in items or []:
        if not item.strip():  # the kohya_ss GUI writes network_args = "" for none
            continue
        if "=" not in item:
            raise UserError(f"--network_args: '{item}' is not key=value.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def build_network(args: argparse.Namespace, family: Any, log: Any) -> tuple[torch.nn.Module, dict[str, str]]:
    """Create the network by --network_module, wrap the family's modules, load --network_weights."""
    module = import_network_module(args.network_module)
    net_kwargs = network_args_dict(args.network_args)
    if args.network_weights and Path(args.network_weights).is_dir() and not args.network_module.startswith(
            "networks."):
        raise UserError(f"--network_weights {args.network_weights} is a folder: a PEFT adapter folder is read by "
                        f"this toolkit's networks.lora, not by {args.network_module}; give a .safetensors file "
                        "(tools/convert.py --to kohya makes one from a PEFT folder).")
    vae, text_encoder, unet = family.network_inputs()
    if not args.network_module.startswith("networks."):  # another package names the modules itself
        text_encoder = with_text_model_names(text_encoder)
    with third_party_errors(args.network_module):
        if args.network_weights and args.dim_from_weights:
            network, _ = module.create_network_from_weights(1.0, args.network_weights, vae, text_encoder, unet,
                                                            neuron_dropout=args.network_dropout, **net_kwargs)
        else:
            network = module.create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoder, unet,
                                            neuron_dropout=args.network_dropout, **net_kwargs)
        network.apply_to(text_encoder, unet, not args.network_train_unet_only,
                         not args.network_train_text_encoder_only)
    plus = loraplus_ratios(net_kwargs, {key: getattr(args, key) for key in LORAPLUS_ARGS})
    if plus is not None:
        if not callable(getattr(network, "set_loraplus_lr_ratio", None)):
            raise UserError(f"--loraplus_*_ratio: the network of --network_module {args.network_module} has no "
                            "set_loraplus_lr_ratio(); LoRA+ is not supported by it.")
        network.set_loraplus_lr_ratio(*plus)
    check_max_norm_support(network, args.scale_weight_norms, args.network_module)
    if args.network_weights:  # continue training from a LoRA file (its shapes must match)
        network.load_weights(args.network_weights)
        log(f"loaded LoRA weights from {args.network_weights}")
    if args.full_bf16 or args.full_fp16:
        network.to(torch.bfloat16 if args.full_bf16 else torch.float16)
    network.prepare_grad_etc(text_encoder, unet)
    return network, net_kwargs


class _TextModelNames(torch.nn.Module):
    """A flattened ``CLIPTextModel`` under a ``text_model`` child, as it was before transformers 5.

    Another package's network (LyCORIS) names modules from ``named_modules()``: without this, encoder 1 would be
    saved as ``lora_te1_encoder_layers_...``, which ComfyUI and A1111 do not map (they take
    ``lora_te1_text_model_encoder_layers_...``; networks.lora renames its own). The encoder's modules are shared,
    so the network hooks the real ones."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = encoder


def with_text_model_names(text_encoder: Any) -> Any:
    """The text encoder(s) as another package's network should see them (see _TextModelNames)."""
    def named(encoder: Any) -> Any:
        flattened = type(encoder).__name__ == "CLIPTextModel" and not hasattr(encoder, "text_model")
        return _TextModelNames(encoder) if flattened else encoder

    if isinstance(text_encoder, (list, tuple)):
        return [named(te) for te in text_encoder]
    return named(text_encoder) if text_encoder is not None else None


@contextlib.contextmanager
def third_party_errors(module_name: str):
    """A failure inside another package's network module (LyCORIS, ...) as one clear error, not a traceback.

    Errors of this project's own modules are left as they are: a traceback there is a bug to report.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        # Out of memory, a CUDA error or this project's own module: not the package's arguments, so as they are.
        out_of_memory = isinstance(e, (torch.OutOfMemoryError, MemoryError))
        if module_name.split(".")[0] == "networks" or out_of_memory or "CUDA" in str(e):
            raise
        package = module_name.split(".")[0]
        # the distribution's name and version (lycoris is installed as lycoris-lora)
        dists = importlib.metadata.packages_distributions().get(package, [])
        version = f" ({dists[0]} {importlib.metadata.version(dists[0])})" if dists else ""
        hint = ""
        if "duplicated lora name" in str(e):
            hint = (" LyCORIS' preset=full targets the time embedding twice in a diffusers UNet; use "
                    "preset=attn-mlp (or another preset) in --network_args.")
        raise UserError(f"--network_module {module_name} failed while building the network, inside {package}"
                        f"{version}: {type(e).__name__}: {e}.{hint or ' Check its --network_args.'}") from e


LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def loraplus_ratios(net_kwargs: dict[str, str], cli: dict[str, float | None]) -> tuple[float | None, ...] | None:
    """The command line's LoRA+ ratios, each used where ``--network_args`` does not set the same key.

    None when the command line gives none. One key with two different values is an error.
    """
    if all(value is None for value in cli.values()):
        return None
    merged: list[float | None] = []
    for key, value in cli.items():
        given = net_kwargs.get(key, "").strip()
        if given.lower() in ("", "none"):
            merged.append(value)
            continue
        try:
            from_args = float(given)
        except ValueError:
            raise UserError(f"--network_args {key}={given!r}: expected a number") from None
        if value is not None and value != from_args:
            raise UserError(f"The LoRA+ ratio {key} is given twice with different values: --network_args "
                            f"{key}={given} and --{key} {value}; keep one.")
        merged.append(from_args)
    return tuple(merged)
