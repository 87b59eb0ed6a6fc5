"""Causal language models from transformers (Llama, Qwen, Mistral, Gemma, Phi, ...): LoRA and QLoRA.

The model is loaded with ``AutoModelForCausalLM`` from a local folder, in bf16/fp16 under that
mixed precision and fp32 otherwise; ``--load_in_4bit`` (NF4, double quantization, bf16 compute)
or ``--load_in_8bit`` quantizes its Linear layers with bitsandbytes, and the LoRA path stays in
its own dtype over the frozen base. It is passed to the network module as ``unet`` (CONTRACTS.md
§5), so ``networks.lora`` puts a LoRA on every Linear (and GPT-2-style Conv1D) but ``lm_head``. The loss is the mean
token cross-entropy over the label tokens, computed chunk by chunk without the full logits where
that is exact (library/chunked_ce.py). The adapter is saved as a PEFT folder and, for
``--save_model_as safetensors``, also as a kohya-style file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.chunked_ce import causal_lm_loss
from library.data.prompt_templates import CHAT
from library.errors import UserError
from library.families import DataRequest

DEFAULT_MAX_SEQ_LENGTH = 2048
# LoRA defaults for LLMs (CONTRACTS.md §6), applied where the user set neither value.
NETWORK_DEFAULTS = {"network_dim": 16, "network_alpha": 16.0}
# Without --max_train_steps or --max_train_epochs, kohya's image default (1600 steps) would be hundreds of
# epochs of a small SFT set; an LLM trains for 3 epochs then, as TRL's default.
DEFAULT_EPOCHS = 3
# Options of the diffusion families that mean nothing for a causal LM: a value there is a mistake.
_DIFFUSION_ONLY = {"vae_path": "--vae", "v2": "--v2", "v_parameterization": "--v_parameterization",
                   "clip_skip": "--clip_skip", "max_token_length": "--max_token_length"}
# Training arguments of the image trainers that do nothing for a causal LM (no latents, noise schedule,
# captions, buckets or text encoder): model_setup refuses them when set, rather than record them unused.
IMAGE_ONLY_ARGUMENTS = (
    "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
    "train_data_dir", "reg_data_dir", "in_json", "dataset_repeats", "caption_extension", "shuffle_caption",
    "keep_tokens", "keep_tokens_separator", "caption_separator", "secondary_separator", "enable_wildcard",
    "weighted_captions", "caption_prefix", "caption_suffix",
    "caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs",
    "flip_aug", "color_aug", "random_crop", "cache_latents", "cache_latents_to_disk", "vae_batch_size",
    "no_half_vae", "cache_text_encoder_outputs", "text_encoder_lr", "network_train_text_encoder_only",
    "stop_text_encoder_training", "loraplus_text_encoder_lr_ratio", "prior_loss_weight", "loss_type", "huber_c",
    "huber_schedule", "huber_scale", "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale",
    "multires_noise_iterations", "v_pred_like_loss",
    "multires_noise_discount", "ip_noise_gamma", "ip_noise_gamma_random_strength",
    "min_snr_gamma", "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "zero_terminal_snr",
    "min_timestep", "max_timestep", "sample_sampler", "masked_loss", "alpha_mask",
)  # fmt: skip


def training_format(subsets: list[Any]) -> tuple[str, str | None]:
    """How the run's data formats a prompt, for samples to match: ("chat", the TOML's chat_template text or None
    for the tokenizer's own) when a subset is chat data or instruction rows with ``prompt_template = "chat"``;
    ("prompt", the template) when every instruction subset has the same text prompt_template; else ("raw", None):
    rows train without a template, so a sample prompt is the bare text too."""
    chats = [subset for subset in subsets
             if subset.format == "chat" or getattr(subset, "prompt_template", None) == CHAT]
    if chats:
        templates = {subset.chat_template for subset in chats}
        template = next(iter(templates)) if len(templates) == 1 else None
        return ("chat", template.read_text(encoding="utf-8") if template is not None else None)
    prompt_templates = {getattr(subset, "prompt_template", None) for subset in subsets if subset.format == "instruct"}
    if len(prompt_templates) == 1 and (only := next(iter(prompt_templates))) is not None:
        return ("prompt", only)
    return ("raw", None)


def subset_formats(subsets: list[Any]) -> list[tuple[str, str | None]]:
    """Each distinct prompt format of the run's subsets, as :func:`training_format` names one (for the card)."""
    formats = [training_format([subset]) for subset in subsets if subset.format != "text"]
    return list(dict.fromkeys(formats)) or [("raw", None)]


def keep_4bit_trainable(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers off their CPU inference path; returns how many layers.

    On a CPU with AVX512-BF16, a ``Linear4bit`` repacks its weight for an inference-only kernel the first
    time it runs in eval mode on an input without grad: the packing check, a sample prompt, a validation
    batch. The repacking stays, and that kernel has no backward, so every later training step would get
    wrong LoRA gradients through the frozen layers (bitsandbytes only warns). Training never wants it.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype):
    """bitsandbytes settings for QLoRA: NF4 with double quantization, or LLM.int8(); None for neither."""
    if load_in_4bit and load_in_8bit:
        raise UserError("--load_in_4bit and --load_in_8bit exclude each other; choose one.")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--load_in_4bit / --load_in_8bit need bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def default_max_seq_length(positions: int | None) -> int:
    """max_seq_length where the dataset TOML sets none: 2048, or the model's max_position_embeddings if less."""
    return min(DEFAULT_MAX_SEQ_LENGTH, positions) if positions else DEFAULT_MAX_SEQ_LENGTH


def load_tokenizer(model_path: str, tokenizer_path: str | None = None) -> Any:
    """The model's tokenizer (or ``tokenizer_path``'s), as training and sampling use it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_path or model_path)
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot load the tokenizer of the causal LM {tokenizer_path or model_path}: {e}") from None


def scan_text(request: DataRequest, tokenizer: Any, positions: int | None):
    """(group, data): the dataset TOML read and every row tokenised and packed for this process.

    ``positions``: the model's max_position_embeddings (None when unknown), which bounds max_seq_length and
    gives its default (2048, or less for a shorter model)."""
    from library.data.text_config import load_text_dataset_config, replace_max_seq_length
    from library.data.text_data import build_text_data

    if not request.dataset_config:
        raise UserError("An LLM run needs --dataset_config: a TOML with jsonl_file or text_file subsets "
                        "(see configs/llm_example_data.toml).")
    defaults = request.defaults
    group = load_text_dataset_config(request.dataset_config, defaults.batch_size,
                                     validation_split=defaults.validation_split,
                                     validation_seed=defaults.validation_seed)
    group = replace_max_seq_length(group, default_max_seq_length(positions), positions)
    return group, build_text_data(group, tokenizer, seed=request.seed, num_processes=request.num_processes,
                                  rank=request.rank, accumulation=request.accumulation)


def scan_before_load(request: DataRequest, model_path: str, tokenizer_path: str | None):
    """What LLMFamily.build_data takes as ``request.scanned``, read before the model loads: (the context length
    it assumed, group, data). Only the model's config.json and tokenizer are read."""
    from transformers import AutoConfig

    try:
        positions = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    except (OSError, ValueError):
        return None  # the model's loading reports it; the data is then read after the model loads
    return (positions, *scan_text(request, load_tokenizer(model_path, tokenizer_path), positions))


@dataclass
class LLMFamily:
    """A causal LM and its tokenizer; the LoRA network is hooked into the model's Linear (or Conv1D) layers."""

    model: torch.nn.Module
    tokenizer: Any
    model_path: str
    seed: int = 0
    quantized: str | None = None  # "4bit" | "8bit"
    name: str = "llm"
    base_model_version: str = "llm"  # ss_base_model_version
    modelspec_architecture: str = "llm/lora"
    prediction_type: str | None = None  # no diffusion target: modelspec.prediction_type is left out
    v2: bool = False
    network_defaults: dict[str, Any] = field(default_factory=lambda: dict(NETWORK_DEFAULTS))
    default_epochs: int = DEFAULT_EPOCHS  # when neither --max_train_steps nor --max_train_epochs is given
    metadata_switches: dict[str, Any] = field(default_factory=lambda: {"loss_type": "cross_entropy"})
    # How training formats a prompt, which samples follow: "chat" with this template (None: the tokenizer's own),
    # or "raw" text when no subset is chat data (build_data sets it).
    sample_format: tuple[str, str | None] = ("chat", None)
    data_formats: list[tuple[str, str | None]] = field(default_factory=list)  # every subset's, for the model card

    @staticmethod
    def load(model_path: str, *, tokenizer_path: str | None = None, seed: int = 0, load_in_4bit: bool = False,
             load_in_8bit: bool = False, weight_dtype: torch.dtype | None = None, device: Any = None,
             noise: Any = None, attn_implementation: str | None = None, **diffusion_options: Any) -> LLMFamily:
        """Load the model (bf16/fp16/fp32 = ``weight_dtype``, optionally quantized, with transformers'
        ``attn_implementation`` when given, else its default) and its tokenizer.

        ``noise`` and unset diffusion options are accepted and ignored (train_network passes them to every
        family); a diffusion option the user set is an error.
        """
        from transformers import AutoModelForCausalLM

        for key, value in diffusion_options.items():
            if key not in _DIFFUSION_ONLY:
                raise TypeError(f"LLMFamily.load() got an unexpected option {key!r}")
            if value:
                raise UserError(f"{_DIFFUSION_ONLY[key]} applies to diffusion models, not to the causal LM "
                                f"{model_path}; remove it.")
        dtype = weight_dtype or torch.float32
        quant = quantization_config(load_in_4bit, load_in_8bit,
                                    torch.float16 if dtype == torch.float16 else torch.bfloat16)
        if device is None:
            from accelerate import PartialState

            device = PartialState().device
        try:
            tokenizer = load_tokenizer(model_path, tokenizer_path)
            # Quantization happens while loading, on the device that will train.
            attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, quantization_config=quant,
                                                         device_map={"": str(device)} if quant else None, **attention)
        except ImportError as e:  # flash-attn / kernels not installed for the chosen attention
            raise UserError(f"--attn_implementation {attn_implementation} cannot run here: {e}") from None
        except (OSError, ValueError) as e:
            why = f" with --attn_implementation {attn_implementation}" if attn_implementation else ""
            raise UserError(f"Cannot load the causal LM from {model_path}{why}: {e}") from None
        model.requires_grad_(False)
        model.config.use_cache = False  # a KV cache only costs memory in training (and hides packing)
        if load_in_4bit:
            keep_4bit_trainable(model)
        kind = "4bit" if load_in_4bit else "8bit" if load_in_8bit else None
        return LLMFamily(model, tokenizer, str(Path(model_path).resolve()), seed, kind)

    def network_inputs(self) -> tuple[Any, Any, torch.nn.Module]:
        return None, None, self.model

    def prepare(self, device: torch.device, weight_dtype: torch.dtype, train_text_encoder: bool,
                gradient_checkpointing: bool, vae_dtype: torch.dtype | None = None) -> None:
        if self.quantized is None:
            self.model.to(device)
            if self.model.dtype != weight_dtype:
                self.model.to(dtype=weight_dtype)
        # Frozen weights in eval mode: their dropout would only add noise to the LoRA's gradient.
        self.model.eval()
        if gradient_checkpointing:  # in eval mode still: checkpointing must not turn the model's dropout on
            from library.checkpointing import enable_checkpointing

            enable_checkpointing(self.model)

    def build_data(self, request: DataRequest):
        """Token sequences from the LLM dataset TOML (library/data/text_config.py), tokenised before the model
        loaded (model_setup.scan_data) or now."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        scanned = request.scanned
        if scanned is None or scanned[0] != positions:  # the model's own config decides the context length
            scanned = (positions, *scan_text(request, self.tokenizer, positions))
        _, group, data = scanned
        if any(d.packing for d in group.datasets) and not self.packing_is_isolated():
            raise UserError(f"{type(self.model).__name__} lets packed samples attend to each other (it ignores "
                            "position_ids for its attention mask); set packing = false in the dataset TOML.")
        subsets = [s for d in group.datasets for s in d.subsets]
        self.sample_format, self.data_formats = training_format(subsets), subset_formats(subsets)
        return data

    @torch.no_grad()
    def packing_is_isolated(self) -> bool:
        """Whether two samples packed in one row give the logits each gives alone (checked on 2 x 3 tokens)."""
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            ids = torch.tensor([[3, 4, 5, 6, 7, 8]], device=device) % self.model.config.vocab_size
            positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
            packed = self.model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 3:].float()
            alone = self.model(input_ids=ids[:, 3:], position_ids=positions[:, 3:], use_cache=False).logits[0].float()
        finally:
            self.model.train(was_training)
        return bool((packed - alone).abs().max() <= 0.02 * max(1.0, float(alone.abs().max())))

    def loss(self, batch: dict[str, Any], epoch: int) -> torch.Tensor:
        """Mean cross-entropy over the label tokens (transformers shifts the labels by one).

        For known model types the (tokens x vocab) logits are never materialised: only label tokens are
        projected, chunk by chunk (library/chunked_ce.py); other models use transformers' own loss.
        """
        # No attention mask: transformers derives the block-diagonal mask of packed samples from position_ids.
        return causal_lm_loss(self.model, batch["input_ids"], batch["position_ids"], batch["labels"],
                              positions=batch.get("loss_positions"))

    def generate_sample(self, text: str, max_new_tokens: int) -> str:
        """The greedy answer to one prompt with the LoRA as trained so far (--sample_prompts)."""
        from library.text_samples import generate_text

        return generate_text(self.model, self.tokenizer, text, max_new_tokens, *self.sample_format)

    def save_network(self, network: Any, path: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> Path:
        """The PEFT folder ``{output_dir}/{stem}/``; for a .safetensors path also the kohya-style file."""
        from library.model_card import adapter_card
        from networks.peft_export import write_peft_adapter

        path = Path(path)
        kind, template = self.sample_format

        def extra_files(config: dict[str, Any]) -> dict[str, str]:
            files = {"README.md": adapter_card(self.model_path, metadata, self.data_formats or [self.sample_format],
                                               config.get("target_modules"))}
            if kind == "chat" and template is not None:  # the dataset's own template goes with the adapter
                files["chat_template.jinja"] = template
            return files

        folder = write_peft_adapter(network, self.model, path.with_suffix(""), self.model_path, dtype, extra_files)
        if path.suffix == ".safetensors":
            meta = {k: v for k, v in metadata.items() if k != "modelspec.resolution"}
            if "modelspec.architecture" in meta:
                meta["modelspec.implementation"] = "transformers"
            network.save_weights(str(path), dtype, meta)
        return folder
