"""Model families behind one small interface, chosen by ``--model_type`` (CONTRACTS.md §1).

A family loads its models, says which modules the network wraps, and turns a batch into a
loss. The training loop knows nothing else about the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from library.errors import UserError

MODEL_TYPES = ("sd", "sdxl", "llm")


@dataclass(frozen=True)
class DataRequest:
    """What a family needs to build the run's data (the dataset TOML is family-specific)."""

    dataset_config: str | None
    defaults: Any  # library.dataset_config.DatasetDefaults: the command line's dataset values
    seed: int
    on_bad_image: str
    num_processes: int
    rank: int
    num_workers: int
    persistent_workers: bool
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    barrier: Any = None  # accelerator.wait_for_everyone
    vae_batch_size: int = 1
    device: Any = None
    cache_text_encoder_outputs: bool = False  # encode each fixed caption once (frozen text encoders)
    accumulation: int = 1  # gradient_accumulation_steps: the sampler groups each optimizer step's batches
    masked_loss: bool = False  # image datasets: load the subsets' loss masks (alpha_mask, conditioning_data_dir)
    scanned: Any = None  # image runs: (config, ImageData) scanned before the model loaded (model_setup.scan_data)


class TrainData(Protocol):
    """The data object a family returns: what the loop, the summary and the metadata read."""

    sampler: Any  # EpochBatchSampler: set_epoch(epoch, skip_batches), len()
    loader: Any  # iterable of batch dicts
    batch_size: int  # per process
    resolution: tuple[int, int]
    num_train_images: int
    num_reg_images: int
    validation_loader: Any  # None, or batches of held-out samples for the validation loss

    def summary(self) -> str: ...
    def metadata(self) -> list[dict[str, Any]]: ...
    def tag_frequency(self) -> dict[str, dict[str, int]]: ...


class ModelFamily(Protocol):
    """What train_network.py needs from a model family."""

    name: str
    base_model_version: str  # ss_base_model_version, e.g. "sd_v1"
    modelspec_architecture: str  # e.g. "stable-diffusion-v1/lora"
    prediction_type: str | None  # "epsilon" | "v"; None for LLMs (no modelspec.prediction_type)

    def network_inputs(self) -> tuple[Any, Any, torch.nn.Module]:
        """(vae, text_encoder or list or None, unet) for create_network."""
        ...

    def prepare(self, device: torch.device, weight_dtype: torch.dtype, train_text_encoder: bool,
                gradient_checkpointing: bool) -> None:
        """Move and cast frozen weights, set train/eval modes and checkpointing."""
        ...

    def build_data(self, request: DataRequest) -> TrainData:
        """Read the dataset config and build the sampler and loader for this process."""
        ...

    def loss(self, batch: dict[str, Any], epoch: int) -> torch.Tensor:
        """The scalar training loss of one micro-batch."""
        ...

    def save_network(self, network: Any, path: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> Path:
        """Write the trained network (kohya file, and/or an adapter folder); returns the main path."""
        ...


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"Cannot read {path}: {e}") from None


def detect_model_type(model_path: str | Path, allow_pickle: bool = False) -> str:
    """sd, sdxl or llm from the model's own files (a single-file checkpoint: from its keys);
    a UserError when it is not a model. A pickle checkpoint is read only with ``allow_pickle``."""
    path = Path(model_path)
    if not path.exists():
        raise UserError(f"--pretrained_model_name_or_path: {path} does not exist (models are never downloaded; "
                        "give a local diffusers or transformers folder, or a single-file checkpoint).")
    if path.is_file():
        from library.single_file import CHECKPOINT_SUFFIXES, detect_checkpoint

        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            return detect_checkpoint(path, allow_pickle).family
        raise UserError(f"{path} is not a model: expected a diffusers folder (model_index.json) or a single-file "
                        f"checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}).")
    if (path / "text_encoder_2").is_dir():
        return "sdxl"
    unet_config = path / "unet" / "config.json"
    if unet_config.is_file():
        return "sdxl" if _read_json(unet_config).get("addition_embed_type") == "text_time" else "sd"
    if (path / "model_index.json").is_file():
        return "sd"
    config = path / "config.json"
    if config.is_file():
        architectures = _read_json(config).get("architectures") or []
        if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return "llm"
    raise UserError(f"{path} is not a model folder: expected model_index.json and unet/ (diffusers) "
                    "or config.json naming a causal LM (transformers).")


def some_parameters_may_go_unused(model_type: str, train_text_encoder: bool, clip_skip: int | None,
                                  network_args: list[str]) -> bool:
    """Whether a step can leave LoRA parameters without a gradient (several processes: DDP must look for them).

    module_dropout skips modules at random; a trained text encoder has layers past the one the model reads
    (SDXL's encoder 1 always, SD with --clip_skip 2 or more). Elsewhere DDP is left its cheaper default."""
    if any(a.replace(" ", "").startswith("module_dropout=") for a in network_args):
        return True
    return train_text_encoder and (model_type == "sdxl" or (model_type == "sd" and (clip_skip or 1) >= 2))


# Options only the LLM family reads; the diffusion families refuse a set value and never see them.
LLM_OPTIONS = ("load_in_4bit", "load_in_8bit", "attn_implementation")


def check_dataset_config(model_type: str, path: str | Path | None, defaults: Any) -> None:
    """Parse and check the dataset TOML (or, without one, the --train_data_dir folder layout) the way
    ``model_type``'s build_data will, before the model loads: a typo or a wrong folder then costs a second, not
    a model load (SDXL: a minute). The family reads it again later."""
    if path is None:
        if model_type != "llm" and getattr(defaults, "train_data_dir", None) is not None:
            import logging

            from library.dataset_config import config_from_train_data_dir

            logging.disable(logging.WARNING)  # its notes (skipped folders) are printed when the data is built
            try:
                config_from_train_data_dir(defaults)
            finally:
                logging.disable(logging.NOTSET)
        return
    if model_type == "llm":
        from library.data.text_config import load_text_dataset_config

        load_text_dataset_config(path, defaults.batch_size, validation_split=defaults.validation_split,
                                 validation_seed=defaults.validation_seed)
    else:
        from library.dataset_config import load_dataset_config

        load_dataset_config(Path(path), defaults)


def load_family(model_type: str, model_path: str, **options: Any) -> ModelFamily:
    """Build the family object for ``model_type`` (already resolved from auto)."""
    if model_type == "llm":
        from library.families.llm import LLMFamily

        for key in ("allow_pickle", "model_config_dir"):  # single-file diffusion checkpoints only
            options.pop(key, None)
        return LLMFamily.load(model_path, **options)
    for key in LLM_OPTIONS:
        if options.pop(key, None):
            raise UserError(f"--{key} is an option of causal LMs; it does not apply to --model_type {model_type}.")
    options.pop("weight_dtype", None)  # the diffusion families cast in prepare()
    from library.weights_check import check_model_folder, check_weight_file

    if Path(model_path).is_file():  # a single-file checkpoint: library/single_file.py
        check_weight_file(model_path)
    else:  # parts given on their own (--vae, --tokenizer_cache_dir) need not be in the folder
        skip = (("vae",) if options.get("vae_path") else ()) + \
            (("tokenizer", "tokenizer_2") if options.get("tokenizer_path") else ())
        check_model_folder(model_path, skip)
    if model_type == "sd":
        from library.families.sd import SDFamily

        return SDFamily.load(model_path, **options)
    if model_type == "sdxl":
        from library.families.sdxl import SDXLFamily

        return SDXLFamily.load(model_path, **options)
    raise UserError(f"--model_type {model_type}: expected one of {', '.join(MODEL_TYPES)} (or auto).")
