"""Command-line arguments of train_network.py, with kohya's names and defaults.

argparse is the single source of names, types and defaults: the ``--config_file`` TOML is
checked against these actions and becomes parser defaults, so the command line wins.
The checks of values and combinations live in library/arg_checks.py.
"""

from __future__ import annotations

import argparse

from library.dataset_config import RESIZE_INTERPOLATIONS
from library.foreign_args import add_arguments as add_foreign_arguments
from library.sample_prompts import SAMPLER_NAMES
from library.sd_scripts_args import add_arguments as add_sd_scripts_arguments

# Arguments accelerate may also set (launch flags, its config YAML or ACCELERATE_* variables): the
# script's default never overrides those (library/accelerator.py resolves them).
ACCELERATE_SETTINGS = ("mixed_precision", "gradient_accumulation_steps", "dynamo_backend", "dynamo_mode",
                       "dynamo_fullgraph", "dynamo_dynamic")

# kohya arguments this version parses but does not implement yet. Passing one is an error
# that says so, rather than a silently ignored setting.
NOT_IMPLEMENTED_YET: dict[str, str] = {
    "full_fp16": "fp16 LoRA weights need a loss-scaling scheme that is planned; use --full_bf16",
}


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="diffusers model folder (or transformers folder for LLMs)",
    )
    g.add_argument(
        "--model_type",
        type=str,
        default="auto",
        choices=["auto", "sd", "sdxl", "llm"],
        help="model family; auto detects it from the model's files",
    )
    g.add_argument("--v2", action="store_true", help="SD 2.x model (detected from the model when not given)")
    g.add_argument(
        "--v_parameterization",
        action="store_true",
        help="v-prediction target (defaults from the scheduler config's prediction_type)",
    )
    g.add_argument("--vae", type=str, default=None, help="a separate diffusers VAE folder")
    g.add_argument("--clip_skip", type=int, default=None, help="use the output of the n-th last text encoder layer")
    g.add_argument(
        "--model_config_dir",
        type=str,
        default=None,
        help="diffusers configs (unet/, vae/, text_encoder/, scheduler/) for a single-file checkpoint of an "
        "unusual shape; default: the shipped SD1/SD2/SDXL configs",
    )
    g.add_argument("--tokenizer_cache_dir", type=str, default=None, help="local folder holding the tokenizer")
    g.add_argument(
        "--allow_pickle",
        action="store_true",
        help="read .ckpt/.pt/.pth/.bin pickle checkpoints (model or --vae), with torch.load(weights_only=True): "
        "tensors only; without it pickles are refused",
    )
    g.add_argument(
        "--load_in_4bit",
        action="store_true",
        help="LLMs: QLoRA, base Linear layers in 4-bit NF4 (double quantization, bf16 compute)",
    )
    g.add_argument("--load_in_8bit", action="store_true", help="LLMs: base Linear layers in 8-bit (LLM.int8)")
    g.add_argument(
        "--attn_implementation",
        choices=("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"),
        default=None,
        help="LLMs: transformers' attention (default: transformers' choice, SDPA); flash_attention_2 needs the "
        "flash-attn package and trains packed rows with its variable-length kernel",
    )


def _add_network(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--network_module", type=str, default="networks.lora", help="module providing create_network")
    g.add_argument("--network_dim", type=int, default=None, help="LoRA rank (networks.lora: 4)")
    g.add_argument("--network_alpha", type=float, default=1.0, help="LoRA alpha; scale = alpha / dim")
    g.add_argument("--network_dropout", type=float, default=None, help="neuron dropout on the LoRA down output")
    g.add_argument(
        "--network_args",
        type=str,
        default=None,
        nargs="*",
        help="key=value options for the network module (conv_dim, conv_alpha, rank_dropout, ...)",
    )
    g.add_argument("--network_weights", type=str, default=None,
                   help="start from these LoRA weights (.safetensors or a PEFT folder)")
    g.add_argument("--dim_from_weights", action="store_true", help="take dims from --network_weights")
    g.add_argument("--base_weights", type=str, default=None, nargs="*",
                   help="LoRA files merged into the frozen model before training (as tools/merge.py --sd_model / "
                   "--llm_model bakes them); the new LoRA learns on top of them")
    g.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                   help="multiplier of each --base_weights file (default 1.0 each; one value: for every file)")
    g.add_argument("--network_train_unet_only", action="store_true", help="train only the UNet LoRA")
    g.add_argument("--network_train_text_encoder_only", action="store_true", help="train only the text encoder LoRA")
    g.add_argument("--training_comment", type=str, default=None, help="stored as ss_training_comment")
    for key, what in MODEL_CARD.items():
        g.add_argument(f"--metadata_{key}", type=str, default=None, help=f"modelspec.{key}: {what}")
    g.add_argument(
        "--scale_weight_norms",
        type=float,
        default=None,
        help="max-norm regularisation: after each step, scale every module whose delta up @ down * alpha/dim has "
        "a larger norm down to this value (1 is a good start); logs max_norm/*",
    )
    g.add_argument(
        "--stop_text_encoder_training",
        type=int,
        default=None,
        help="the text encoder LoRA stops training after this many optimizer steps (0 or less: never trains)",
    )
    g.add_argument("--no_metadata", action="store_true", help="store only the minimum metadata")


# sd-scripts' ModelSpec arguments (--metadata_title, ...): what each one records; empty means not set.
MODEL_CARD = {
    "title": "the model's title (default: the output name)",
    "author": "the author's name",
    "description": "a description",
    "license": "the license",
    "tags": "tags, separated by commas",
}


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset_config", type=str, default=None, help="dataset TOML (kohya schema)")
    g.add_argument("--train_data_dir", type=str, default=None, help="folder of N_name subfolders")
    g.add_argument("--reg_data_dir", type=str, default=None, help="regularisation images, N_name subfolders")
    g.add_argument("--in_json", type=str, default=None,
                   help="with --train_data_dir: sd-scripts' fine-tuning metadata JSON (image -> caption / tags)")
    g.add_argument("--dataset_repeats", type=int, default=1, help="repeats of the --in_json dataset")
    g.add_argument("--resolution", type=str, default=None, help='"512" or "768,512" (width,height)')
    g.add_argument("--train_batch_size", type=int, default=1, help="batch size per process")
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (px)")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (px)")
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    g.add_argument("--bucket_no_upscale", action="store_true", help="never upscale an image to fit a bucket")
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="hold out this fraction of each subset's images (LLMs: rows) for the validation loss; "
                   "a dataset TOML's validation_split wins over it")
    g.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the validation split (default: --seed); a dataset TOML's validation_seed wins")
    g.add_argument("--alpha_mask", action="store_true",
                   help="with --masked_loss: each image's transparency is its loss mask (the folder layout)")
    g.add_argument("--caption_extension", type=str, default=".caption", help="caption side-file extension")
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle comma-separated tags each epoch")
    g.add_argument("--keep_tokens", type=int, default=0, help="keep the first N tags in place when shuffling")
    g.add_argument("--keep_tokens_separator", type=str, default="",
                   help="tags before it stay in place (a tail after a second one too); removed from the caption")
    g.add_argument("--caption_separator", type=str, default=",", help="separator of the tags in a caption")
    g.add_argument("--secondary_separator", type=str, default="",
                   help="joins tags that shuffle and drop as one; replaced by the separator afterwards")
    g.add_argument("--weighted_captions", action="store_true",
                   help="captions may weight words as A1111 prompts do: (word:1.2), (word), [word]")
    g.add_argument("--enable_wildcard", action="store_true",
                   help="captions: {a|b} picks one option and a multi-line caption one line, per sample and epoch")
    g.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    g.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="probability of an empty caption")
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0, help="probability of dropping each tag")
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0, help="drop all captions every N epochs")
    g.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    g.add_argument("--color_aug", action="store_true", help="random hue shifts")
    g.add_argument("--random_crop", action="store_true", help="random instead of centre crops")
    g.add_argument("--resize_interpolation", type=str, default=None, choices=[None, *RESIZE_INTERPOLATIONS],
                   help="filter that scales images to their bucket (unset: lanczos); area is PIL's HAMMING, as in "
                   "sd-scripts; a dataset TOML's resize_interpolation wins over it")
    g.add_argument("--cache_latents", action="store_true", help="encode every image once, keep latents in memory")
    g.add_argument(
        "--cache_text_encoder_outputs",
        action="store_true",
        help="SDXL with --network_train_unet_only: encode each caption once, keep the outputs in memory "
        "(captions must not be shuffled or dropped)",
    )
    g.add_argument("--cache_latents_to_disk", action="store_true", help="per-image latent files next to the images")
    g.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE call when caching latents")
    g.add_argument("--max_data_loader_n_workers", type=int, default=8, help="DataLoader processes (0 on a CPU device)")
    g.add_argument(
        "--persistent_data_loader_workers", action="store_true", help="keep DataLoader processes between epochs"
    )
    g.add_argument(
        "--on_bad_image",
        type=str,
        default="error",
        choices=["error", "skip"],
        help="unreadable images stop the run (error) or are listed and left out (skip)",
    )
    g.add_argument(
        "--max_token_length", type=int, default=None, choices=[None, 75, 150, 225], help="prompt length in tokens"
    )


def _add_optimisation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--learning_rate",
        type=float,
        default=1e-4,
        help="default learning rate (1e-4 suits LoRA; sd-scripts' 2e-6 is for full fine-tuning)",
    )
    g.add_argument(
        "--unet_lr", type=float, default=None, help="learning rate of the UNet LoRA (default: --learning_rate)"
    )
    g.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        nargs="*",
        help="learning rate of the text-encoder LoRA (default: --learning_rate; 0 freezes it); SDXL: one value "
        "for both encoders or two, encoder 1 then 2",
    )
    g.add_argument("--optimizer_type", type=str, default="",
                   help='"" = AdamW; AdamW8bit, PagedAdamW(8bit/32bit), Lion(8bit), PagedLion8bit, AdEMAMix8bit, '
                        "PagedAdEMAMix8bit, SGD, SGDNesterov(8bit), Prodigy, DAdaptation / DAdaptAdam / "
                        "DAdaptAdaGrad / DAdaptAdan / DAdaptAdanIP / DAdaptLion / DAdaptSGD (pip install "
                        "dadaptation), Adafactor, or a dotted path")
    g.add_argument("--optimizer_args", type=str, default=None, nargs="*", help="key=value optimizer options")
    g.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, piecewise_constant, "
        "inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, adafactor",
    )
    g.add_argument(
        "--lr_scheduler_type",
        type=str,
        default="",
        help="a custom scheduler class instead of --lr_scheduler: a dotted path (e.g. torch.optim.lr_scheduler."
        "StepLR) or a torch.optim.lr_scheduler name; stepped once per optimizer step",
    )
    g.add_argument(
        "--lr_scheduler_args",
        type=str,
        default=None,
        nargs="*",
        help='key=value keywords of the --lr_scheduler schedule or of --lr_scheduler_type (e.g. "min_lr_rate=0.1", '
        '"step_size=100")',
    )
    g.add_argument("--lr_warmup_steps", type=float, default=0, help="steps, or a ratio of total steps when < 1")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="restarts for cosine_with_restarts")
    g.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power for polynomial")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--gradient_accumulation_steps", type=int, default=None, help="default 1 unless accelerate sets it")
    g.add_argument("--max_train_steps", type=int, default=1600, help="optimizer steps in total")
    g.add_argument("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    g.add_argument("--seed", type=int, default=None, help="seed of every random draw (random when unset)")
    g.add_argument(
        "--loraplus_lr_ratio",
        type=float,
        default=None,
        help="LoRA+: lora_up learns this many times faster; as --network_args loraplus_lr_ratio (used when "
        "network_args does not set it; two different values are an error)",
    )
    g.add_argument("--loraplus_unet_lr_ratio", type=float, default=None,
                   help="LoRA+ ratio of the UNet only (as network_args loraplus_unet_lr_ratio)")
    g.add_argument("--loraplus_text_encoder_lr_ratio", type=float, default=None,
                   help="LoRA+ ratio of the text encoders only (as network_args loraplus_text_encoder_lr_ratio)")


def _add_precision(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision and speed")
    g.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="unset by default: accelerate's setting applies, else no",
    )
    g.add_argument("--full_bf16", action="store_true", help="keep the LoRA weights in bf16")
    g.add_argument("--full_fp16", action="store_true", help="keep the LoRA weights in fp16")
    g.add_argument("--fp8_base", action="store_true", help="store the frozen base weights in float8")
    g.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    g.add_argument(
        "--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory"
    )
    g.add_argument("--sdpa", action="store_true", help="accepted for compatibility; SDPA is always used")
    g.add_argument("--xformers", action="store_true",
                   help="accepted for compatibility: PyTorch SDPA (flash / memory-efficient kernels) is always used")
    g.add_argument("--mem_eff_attn", action="store_true",
                   help="accepted for compatibility: PyTorch SDPA (flash / memory-efficient kernels) is always used")
    g.add_argument("--lowram", action="store_true",
                   help="accepted for compatibility: models are always loaded with low RAM use (memory-mapped)")
    g.add_argument("--highvram", action="store_true",
                   help="accepted for compatibility: there is no low-VRAM behaviour to switch off")
    g.add_argument("--torch_compile", action="store_true", help="same as --dynamo_backend inductor")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32")


def _add_loss(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusion loss")
    g.add_argument("--noise_offset", type=float, default=None, help="offset noise strength (e.g. 0.05)")
    g.add_argument(
        "--noise_offset_random_strength", action="store_true", help="draw the offset strength in [0, noise_offset)"
    )
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="adds this times each latent channel's absolute mean to --noise_offset (needs it)")
    g.add_argument("--multires_noise_iterations", type=int, default=None, help="multires noise iterations")
    g.add_argument("--multires_noise_discount", type=float, default=0.3, help="multires noise discount")
    g.add_argument("--min_snr_gamma", type=float, default=None, help="min-SNR-gamma loss weighting (e.g. 5)")
    g.add_argument(
        "--scale_v_pred_loss_like_noise_pred", action="store_true", help="scale v-prediction loss like noise prediction"
    )
    g.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss")
    g.add_argument("--v_pred_like_loss", type=float, default=None,
                   help="adds this times the loss scaled like a v-prediction loss (e.g. 0.1)")
    g.add_argument("--zero_terminal_snr", action="store_true", help="rescale the noise schedule to zero terminal SNR")
    g.add_argument("--min_timestep", type=int, default=None, help="lowest training timestep (default 0)")
    g.add_argument("--max_timestep", type=int, default=None, help="highest training timestep, exclusive (default 1000)")
    g.add_argument(
        "--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"], help="element loss"
    )
    g.add_argument(
        "--ip_noise_gamma",
        type=float,
        default=None,
        help="input perturbation noise: the model input is noised with noise + gamma * randn, the target stays "
        "the noise (e.g. 0.1)",
    )
    g.add_argument(
        "--ip_noise_gamma_random_strength",
        action="store_true",
        help="draw the perturbation strength per sample in [0, ip_noise_gamma)",
    )
    g.add_argument("--huber_c", type=float, default=0.1,
                   help="huber / smooth_l1 parameter (over timesteps: --huber_schedule)")
    g.add_argument(
        "--huber_schedule",
        type=str,
        default="snr",
        choices=["constant", "exponential", "snr"],
        help="huber_c over timesteps (huber / smooth_l1): constant; exponential from 1 at t=0 to huber_c at the "
        "last step; snr: (1 - huber_c) / (1 + sigma_t)^2 + huber_c",
    )
    g.add_argument("--huber_scale", type=float, default=1.0,
                   help="multiplies the constant and exponential huber schedules (as sd-scripts; not snr)")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    g.add_argument("--masked_loss", action="store_true",
                   help="weigh the loss by each image's mask: alpha_mask / conditioning_data_dir in the dataset")


def _add_saving(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("saving")
    g.add_argument("--output_dir", type=str, default=None, help="folder for LoRA files, states and the loss curve")
    g.add_argument("--output_name", type=str, default=None, help='file name stem ("last" when not given)')
    g.add_argument(
        "--save_model_as",
        type=str,
        default="safetensors",
        choices=["safetensors", "ckpt", "pt"],
        help="file format of the LoRA",
    )
    g.add_argument("--save_every_n_epochs", type=int, default=None,
                   help="write {name}-{epoch:06d} every N epochs (not after the last: the final {name} file is it)")
    g.add_argument("--save_every_n_steps", type=int, default=None,
                   help="write {name}-step{step:08d} every N steps (not at the last: the final {name} file is it)")
    g.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch files")
    g.add_argument("--save_last_n_steps", type=int, default=None,
                   help="keep only the step files saved in the last N steps (at the current step - N or later, as "
                        "sd-scripts)")
    g.add_argument(
        "--save_last_n_epochs_state",
        type=int,
        default=None,
        help="keep only the last N epoch state folders (default: as --save_last_n_epochs)",
    )
    g.add_argument(
        "--save_last_n_steps_state",
        type=int,
        default=None,
        help="keep only the step state folders of the last N steps (default: as --save_last_n_steps)",
    )
    g.add_argument("--save_state", action="store_true", help="also write resumable state folders at the same cadence")
    g.add_argument("--save_state_on_train_end", action="store_true", help="write a resumable state folder at the end")
    g.add_argument("--resume", type=str, default=None, help="a state folder, or 'latest' (this --output_name's newest)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run with the same --output_dir and --output_name: its files (LoRAs, "
                        "states, loss curve) move to {output_name}.replaced/ first, kept until the next "
                        "--overwrite (without it such a run is refused, unless it is resumed)")
    g.add_argument(
        "--resume_allow_changes",
        action="store_true",
        help="resume even when settings that change training differ from the saved state",
    )


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--sample_prompts", type=str, default=None,
                   help="prompt file (.txt with --n --w --h --s --d --l --ss per line, .toml, .json)")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="sample every N optimizer steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None, help="sample at the end of every N epochs")
    g.add_argument("--sample_at_first", action="store_true", help="also sample before the first step")
    g.add_argument(
        "--validate_every_n_steps",
        type=int,
        default=None,
        help="validation loss every N steps (needs a validation_split)",
    )
    g.add_argument(
        "--validate_every_n_epochs",
        type=int,
        default=None,
        help="validation loss every N epochs (default 1 when the dataset has a validation_split)",
    )
    g.add_argument("--max_validation_steps", type=int, default=None, help="batches per validation (default all)")
    g.add_argument("--sample_sampler", type=str, default="ddim", choices=SAMPLER_NAMES,
                   help="sampler of prompts without --ss")


def _add_logging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log_with",
        type=str,
        default=None,
        choices=[None, "tensorboard", "wandb", "all"],
        help="tracker (tensorboard when --logging_dir is given; all = tensorboard and wandb, both installed)",
    )
    g.add_argument(
        "--logging_dir", type=str, default=None, help="tracker logs go to {logging_dir}/{log_prefix}{timestamp}"
    )
    g.add_argument("--log_prefix", type=str, default=None,
                   help="prefix of the run folder name under --logging_dir (ignored without it)")
    g.add_argument("--log_tracker_name", type=str, default=None, help="tracker project name (default network_train)")
    g.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    g.add_argument("--log_tracker_config", type=str, default=None,
                   help="TOML with one table per tracker ([wandb] name, tags, ...; [tensorboard] ...): passed to "
                   "each tracker's run as accelerate's init_kwargs, as in sd-scripts")
    g.add_argument("--wandb_api_key", type=str, default=None, help="never written to logs or configs")
    g.add_argument("--log_config", action="store_true", help="log the training arguments to the trackers")


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed and compile")
    g.add_argument("--ddp_timeout", type=int, default=None, help="process-group timeout in minutes")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view")
    g.add_argument("--ddp_static_graph", action="store_true", help="DDP static_graph")
    g.add_argument("--dynamo_backend", type=str, default=None,
                   help="no, inductor, eager, ... (any accelerate DynamoBackend, any case; unset: accelerate's)")
    g.add_argument(
        "--dynamo_mode",
        type=str,
        default=None,
        choices=[None, "default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode (unset: accelerate's --dynamo_mode, else default)",
    )
    g.add_argument("--dynamo_fullgraph", action="store_true",
                   help="torch.compile fullgraph (also accelerate's --dynamo_use_fullgraph)")
    g.add_argument("--dynamo_dynamic", action="store_true",
                   help="torch.compile dynamic shapes (also accelerate's --dynamo_use_dynamic)")


def build_parser() -> argparse.ArgumentParser:
    """The full train_network.py parser."""
    p = argparse.ArgumentParser(
        prog="train_network.py",
        description="Train a LoRA network (kohya-compatible arguments).",
    )
    cfg = p.add_argument_group("config")
    cfg.add_argument("--config_file", type=str, default=None, help="TOML of arguments (CLI wins over it)")
    cfg.add_argument(
        "--output_config",
        action="store_true",
        help="write the effective non-default arguments to --config_file and exit",
    )
    for add in (
        _add_model,
        _add_network,
        _add_data,
        _add_optimisation,
        _add_precision,
        _add_loss,
        _add_saving,
        _add_sampling,
        _add_logging,
        _add_distributed,
        add_sd_scripts_arguments,  # sd-scripts names without a counterpart here (library/sd_scripts_args.py)
        # last: diffusers' and TRL's names (library/foreign_args.py); as real arguments their exact names can no
        # longer be taken by argparse for an abbreviation of one of ours (--max_steps, --optim)
        add_foreign_arguments,
    ):
        add(p)
    return p
