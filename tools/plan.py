"""Estimate the memory a LoRA training run needs, from the model's configs alone, and what makes it fit.

    python tools/plan.py --pretrained_model_name_or_path sd15/ --train_batch_size 4 --resolution 768 \\
        --network_dim 32 --mixed_precision bf16 --vram 8

No weights are read: the models are built on PyTorch's "meta" device (shapes without memory)
from their config.json files, the LoRA is applied with networks.lora, and one forward pass is
traced at the requested batch size and resolution, recording every tensor autograd keeps for
the backward pass. The estimate is the sum of
- frozen weights (in the --mixed_precision dtype; the VAE stays float32 with --no_half_vae, and
  is left out with --cache_latents since latents are encoded before training),
- LoRA parameters and their gradients (float32 unless --full_bf16/--full_fp16),
- optimizer state (AdamW: 2 float32 tensors per parameter, 8-bit Adam: 2 bytes, Lion: 1 tensor ...),
- activations saved for backward (with --gradient_checkpointing: the inputs of every checkpointed
  block plus the largest block's activations, recomputed one block at a time).
CUDA adds its own context (~0.3-0.5 GiB) and allocator fragmentation; --vram is compared with
the estimate plus 10%. Process memory on the CPU side is dominated by libraries and is not estimated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from library.dataset_config import parse_resolution  # noqa: E402
from library.errors import UserError  # noqa: E402

GiB = 2**30
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Optimizer state per trainable parameter, in bytes per parameter byte of a float32 parameter.
OPTIMIZER_STATE = {"adamw": 2.0, "adam": 2.0, "adamw8bit": 0.5, "pagedadamw8bit": 0.5, "lion": 1.0,
                   "lion8bit": 0.25, "sgd": 0.0, "sgdnesterov": 1.0, "prodigy": 4.0, "adafactor": 0.1,
                   "dadaptadam": 3.0}  # fmt: skip
CHECKPOINT_UNITS = ("ResnetBlock2D", "Transformer2DModel")  # what diffusers' UNet checkpoints
SAFETY = 1.1


@dataclass(frozen=True)
class PlanInput:
    model: str
    batch_size: int = 1
    resolution: tuple[int, int] = (512, 512)
    seq_len: int = 512  # LLM tokens per sample
    network_dim: int = 4
    conv_dim: int | None = None
    mixed_precision: str = "no"
    full_half: bool = False
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    no_half_vae: bool = False
    train_text_encoder: bool = True
    optimizer: str = "AdamW"


@dataclass(frozen=True)
class Estimate:
    weights: int
    lora_params: int
    gradients: int
    optimizer_state: int
    activations: int
    lora_param_count: int

    @property
    def total(self) -> int:
        return self.weights + self.lora_params + self.gradients + self.optimizer_state + self.activations


def model_kind(folder: Path) -> str:
    if (folder / "unet" / "config.json").is_file():
        if (folder / "text_encoder_2").is_dir():
            raise UserError(f"{folder}: SDXL planning is not supported yet (SD 1.x/2.x and LLMs)")
        return "sd"
    if (folder / "config.json").is_file():
        return "llm"
    raise UserError(f"{folder}: expected a diffusers folder (unet/config.json) or a transformers folder (config.json)")


def _nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward, each storage once, parameters excluded.

    Storages are told apart by their C++ identity, which works on the meta device as on real ones.
    ``unit`` attributes each saved tensor to the innermost checkpoint unit running when it was saved.
    """

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.seen: set[int] = set()
        self.total = 0
        self.per_unit: dict[int, int] = {}
        self.unit_inputs: dict[int, int] = {}
        self.stack: list[int] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            size = t.untyped_storage().nbytes()
            self.total += size
            if self.stack:
                self.per_unit[self.stack[-1]] = self.per_unit.get(self.stack[-1], 0) + size
        return t

    def hook_units(self, root: torch.nn.Module, classes: tuple[str, ...]) -> list:
        handles = []
        for module in root.modules():
            if type(module).__name__ in classes or type(module).__name__.endswith("DecoderLayer"):
                handles.append(module.register_forward_pre_hook(self._enter))
                handles.append(module.register_forward_hook(self._leave))
        return handles

    def _enter(self, module: torch.nn.Module, inputs: tuple) -> None:
        if self.stack:  # nested units are checkpointed as part of the outer one
            self.stack.append(self.stack[-1])
            return
        self.stack.append(id(module))
        self.unit_inputs[id(module)] = sum(x.numel() * x.element_size() for x in inputs if torch.is_tensor(x))

    def _leave(self, module: torch.nn.Module, inputs: tuple, output: object) -> None:
        self.stack.pop()

    def checkpointed(self) -> int:
        """Saved bytes when every unit is recomputed in backward: outside + unit inputs + the largest unit."""
        inside = sum(self.per_unit.values())
        return self.total - inside + sum(self.unit_inputs.values()) + max(self.per_unit.values(), default=0)


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on the meta device.

    Meta tensors take the unfused path, which saves the full attention matrix; the fused kernels
    that run on GPUs (flash / memory-efficient) and CPUs save q, k, v, the output and one float32
    log-sum-exp per query row. This function saves exactly that.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # never run: the trace has no backward
        raise NotImplementedError


def _fused_sdpa(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def fused_attention():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _build_sd(folder: Path, plan: PlanInput, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder), subfolder="unet"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder), subfolder="vae"))
    return unet.to(dtype), te.to(dtype), vae


def trace_sd(folder: Path, plan: PlanInput) -> tuple[Estimate, SavedTensorCounter]:
    from networks import lora

    dtype = DTYPES[plan.mixed_precision]
    with torch.device("meta"):
        unet, te, vae = _build_sd(folder, plan, dtype)
        args = {"conv_dim": str(plan.conv_dim), "conv_alpha": "1"} if plan.conv_dim else {}
        network = lora.create_network(1.0, plan.network_dim, 1.0, None, te, unet, **args)
    network.apply_to(te, unet, plan.train_text_encoder, True)
    for m in (unet, te, vae):
        m.requires_grad_(False)
    vae_params = sum(p.numel() for p in vae.parameters())
    vae_bytes = 0 if plan.cache_latents else vae_params * (4 if plan.no_half_vae else dtype.itemsize)
    weights = _nbytes(unet) + _nbytes(te) + vae_bytes
    # The forward runs in the compute dtype (autocast); meta kernels need one dtype, so cast a copy.
    lora_count = sum(p.numel() for p in network.parameters())
    param_dtype = dtype if plan.full_half else torch.float32
    network.to(dtype)
    latent_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    w, h = plan.resolution
    b = plan.batch_size
    latents = torch.empty(b, unet.config.in_channels, h // latent_scale, w // latent_scale, device="meta", dtype=dtype)
    ids = torch.zeros(b, te.config.max_position_embeddings, dtype=torch.long, device="meta")
    counter = SavedTensorCounter([*unet.parameters(), *te.parameters(), *network.parameters()])
    handles = counter.hook_units(unet, CHECKPOINT_UNITS)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), fused_attention():
        context = te(ids).last_hidden_state
        unet(latents, torch.zeros(b, dtype=torch.long, device="meta"), encoder_hidden_states=context)
    for handle in handles:
        handle.remove()
    return _estimate(weights, lora_count, param_dtype, plan, counter), counter


def llm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The training loss as train_network.py computes it: the chunked cross-entropy where the model allows it
    (no logits kept for backward), every token a label; else transformers' loss, which keeps the fp32 logits."""
    from library.chunked_ce import linear_cross_entropy, why_not_chunked

    if why_not_chunked(model) is not None:
        return model(ids, labels=ids).loss
    # (the default KV cache keeps transformers from inspecting position ids, which meta tensors cannot hold)
    hidden = model.model(input_ids=ids).last_hidden_state
    head = model.get_output_embeddings()
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # the last token has no next one to predict
    return linear_cross_entropy(rows, head.weight, head.bias, ids[:, 1:].reshape(-1))


def trace_llm(folder: Path, plan: PlanInput) -> tuple[Estimate, SavedTensorCounter]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from networks.lora import LoRAModule

    dtype = DTYPES[plan.mixed_precision]
    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        loras = [LoRAModule(n, m, 1.0, plan.network_dim, plan.network_dim) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]  # fmt: skip
    model.requires_grad_(False)
    for module in loras:
        module.to(dtype).apply_to()
    weights = _nbytes(model)
    lora_count = sum(p.numel() for m in loras for p in m.parameters())
    ids = torch.zeros(plan.batch_size, plan.seq_len, dtype=torch.long, device="meta")
    counter = SavedTensorCounter([*model.parameters(), *(p for m in loras for p in m.parameters())])
    handles = counter.hook_units(model, ())
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), fused_attention():
        llm_loss(model, ids)
    for handle in handles:
        handle.remove()
    param_dtype = dtype if plan.full_half else torch.float32
    return _estimate(weights, lora_count, param_dtype, plan, counter), counter


def _estimate(weights: int, lora_count: int, param_dtype: torch.dtype, plan: PlanInput,
              counter: SavedTensorCounter) -> Estimate:  # fmt: skip
    key = plan.optimizer.lower().replace("_", "").split(".")[-1] or "adamw"
    if key not in OPTIMIZER_STATE:
        raise UserError(f"--optimizer_type {plan.optimizer}: unknown; known: {', '.join(sorted(OPTIMIZER_STATE))}")
    lora_bytes = lora_count * param_dtype.itemsize
    activations = counter.checkpointed() if plan.gradient_checkpointing else counter.total
    return Estimate(weights, lora_bytes, lora_bytes, int(lora_count * 4 * OPTIMIZER_STATE[key]), activations,
                    lora_count)  # fmt: skip


def estimate(plan: PlanInput) -> Estimate:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting meta models to half warns about nothing useful
    folder = Path(plan.model)
    if not folder.is_dir():
        raise UserError(f"--pretrained_model_name_or_path {plan.model}: not a folder")
    with torch.enable_grad():  # autograd saves tensors only when gradients are wanted
        return (trace_sd if model_kind(folder) == "sd" else trace_llm)(folder, plan)[0]


def suggestions(plan: PlanInput, vram_gib: float) -> list[tuple[str, Estimate]]:
    """Switches added one at a time (cheapest in quality first) until the estimate fits."""
    steps = [
        ("--gradient_checkpointing", lambda p: replace(p, gradient_checkpointing=True)),
        ("--mixed_precision bf16", lambda p: replace(p, mixed_precision="bf16") if p.mixed_precision == "no" else p),
        ("--cache_latents", lambda p: replace(p, cache_latents=True)),
        ("--optimizer_type AdamW8bit", lambda p: replace(p, optimizer="AdamW8bit")
         if p.optimizer.lower() in ("adamw", "adam", "") else p),
        ("--network_train_unet_only", lambda p: replace(p, train_text_encoder=False)),
        ("--train_batch_size 1 (raise --gradient_accumulation_steps to keep the global batch)",
         lambda p: replace(p, batch_size=1)),
    ]  # fmt: skip
    out: list[tuple[str, Estimate]] = []
    current = plan
    for label, change in steps:
        changed = change(current)
        if changed == current:
            continue
        current = changed
        est = estimate(current)
        out.append((label, est))
        if est.total * SAFETY <= vram_gib * GiB:
            break
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers or transformers folder")
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--resolution", default="512", help='"512" or "768,512" (diffusion)')
    p.add_argument("--max_seq_length", type=int, default=512, help="tokens per sample (LLM)")
    p.add_argument("--network_dim", type=int, default=4)
    p.add_argument("--conv_dim", type=int, default=None, help="conv LoRA rank (network_args conv_dim)")
    p.add_argument("--mixed_precision", choices=sorted(DTYPES), default="no")
    p.add_argument("--full_bf16", action="store_true")
    p.add_argument("--full_fp16", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--cache_latents", action="store_true")
    p.add_argument("--no_half_vae", action="store_true")
    p.add_argument("--network_train_unet_only", action="store_true")
    p.add_argument("--optimizer_type", default="AdamW")
    p.add_argument("--vram", type=float, default=None, help="GPU memory in GiB: suggest switches to fit it")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def plan_from_args(args: argparse.Namespace) -> PlanInput:
    if args.train_batch_size < 1 or args.network_dim < 1:
        raise UserError("--train_batch_size and --network_dim must be at least 1")
    return PlanInput(
        model=args.pretrained_model_name_or_path, batch_size=args.train_batch_size,
        resolution=parse_resolution(args.resolution), seq_len=args.max_seq_length, network_dim=args.network_dim,
        conv_dim=args.conv_dim, mixed_precision=args.mixed_precision, full_half=args.full_bf16 or args.full_fp16,
        gradient_checkpointing=args.gradient_checkpointing, cache_latents=args.cache_latents,
        no_half_vae=args.no_half_vae, train_text_encoder=not args.network_train_unet_only,
        optimizer=args.optimizer_type or "AdamW",
    )  # fmt: skip


def describe(est: Estimate) -> list[str]:
    rows = [
        ("frozen weights", est.weights),
        ("LoRA parameters", est.lora_params),
        ("LoRA gradients", est.gradients),
        ("optimizer state", est.optimizer_state),
        ("activations", est.activations),
        ("total", est.total),
    ]
    return [f"  {name:<18} {value / GiB:8.3f} GiB" for name, value in rows]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
        est = estimate(plan)
        fits = None if args.vram is None else est.total * SAFETY <= args.vram * GiB
        tips = suggestions(plan, args.vram) if fits is False else []
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"input": asdict(plan), "estimate": {**asdict(est), "total": est.total}, "fits": fits,
                          "suggestions": [{"add": s, "total": e.total} for s, e in tips]}, indent=2))  # fmt: skip
        return 0
    print(f"estimate for {plan.model} ({est.lora_param_count:,} LoRA parameters):")
    print("\n".join(describe(est)))
    if fits is not None:
        print(f"fits in {args.vram:g} GiB (with 10% margin): {'yes' if fits else 'no'}")
    for label, e in tips:
        ok = "fits" if e.total * SAFETY <= args.vram * GiB else "still too large"
        print(f"  + {label}: {e.total / GiB:.3f} GiB ({ok})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
