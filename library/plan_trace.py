"""The tracing half of tools/plan.py: models built from configs on the meta device, one forward pass.

No weights are read. The models are built on PyTorch's "meta" device (shapes without memory) from
their config files, the LoRA is applied as train_network.py applies it (networks.lora.create_network
for the diffusion models, which picks SD's or SDXL's targets and names from networks/targets.py),
and one forward pass runs at the requested batch size and resolution while ``SavedTensorCounter``
records every tensor autograd keeps for the backward pass.

What each family runs per step mirrors library/families/: SD 1.x/2.x encodes the caption with its
text encoder and denoises; SDXL encodes with both encoders (penultimate hidden layers concatenated,
the pooled projection of encoder 2 as ``text_embeds``) and passes the six size ids as ``time_ids``;
with ``--cache_text_encoder_outputs`` the encoders do not run and sit on the CPU (sdxl.py moves them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What gradient checkpointing recomputes: diffusers' UNet blocks, and the CLIP layers that
# place_modules checkpoints when the text encoders train (LLM decoder layers are matched by suffix).
CHECKPOINT_UNITS = ("ResnetBlock2D", "Transformer2DModel", "CLIPEncoderLayer")
SDXL_SIDE_MULTIPLE = 32  # library/families/sdxl.py: the VAE's 8 times the UNet's two downsamplings


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
    cache_text_encoder_outputs: bool = False  # SDXL, frozen encoders: encoded once, kept off the GPU
    model_config_dir: str | None = None  # a single file's architecture (default: configs/architectures/)
    tokenizer_cache_dir: str | None = None  # as train_network.py: a folder with unet/config.json counts too
    allow_pickle: bool = False  # read .ckpt/.pt single files (torch.load, weights_only)


@dataclass
class Traced:
    """What a trace found: frozen weight bytes on the GPU, LoRA parameter counts, saved tensors.

    ``trained_count``: the LoRA parameters the loss reaches, the ones that get gradients and optimizer
    state (SDXL conditions on the penultimate layer of encoder 1, so the LoRA of its last layer gets none).
    """

    weights: int
    lora_count: int
    trained_count: int
    counter: SavedTensorCounter
    param_counts: dict[str, int] = field(default_factory=dict)  # per model part, for single-file checks


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward, each storage once, parameters excluded.

    Storages are told apart by their C++ identity, which works on the meta device as on real ones;
    each counted tensor is kept alive for the counter's life, so a storage freed during the forward
    (a graph branch the output does not use) cannot hand its identity to a new one that would then
    go uncounted. ``unit`` attributes each saved tensor to the innermost checkpoint unit running when it was saved.
    """

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.seen: set[int] = set()
        self.kept: list[torch.Tensor] = []  # meta tensors: no memory
        self.total = 0
        self.per_unit: dict[int, int] = {}
        self.unit_inputs: dict[int, int] = {}
        self.stack: list[int] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.kept.append(t)
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


def reached(output: torch.Tensor, params: list[torch.nn.Parameter]) -> int:
    """How many elements of ``params`` the backward of ``output`` would give a gradient."""
    wanted = {id(p): p.numel() for p in params}
    seen, found, stack = set(), 0, [output.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf tensor
        if variable is not None:
            found += wanted.pop(id(variable), 0)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


@contextlib.contextmanager
def counting(counter: SavedTensorCounter, roots: list[torch.nn.Module], classes: tuple[str, ...]):
    handles = [h for root in roots for h in counter.hook_units(root, classes)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), fused_attention():
            yield
    finally:
        for handle in handles:
            handle.remove()


# --- diffusion: SD 1.x / 2.x and SDXL -----------------------------------------------------------


def _build_diffusion(configs: Path, family: str):
    """(unet, text encoders, vae) on the current (meta) device from a diffusers-style config folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = ["unet", "vae", "text_encoder", *(["text_encoder_2"] if family == "sdxl" else [])]
    missing = [f"{part}/config.json" for part in parts if not (configs / part / "config.json").is_file()]
    if missing:
        raise UserError(f"{configs}: no {', '.join(missing)}; planning reads the configs of every part of the model.")
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(configs), subfolder="unet"))
    if family == "sdxl" and unet.config.addition_embed_type != "text_time":
        raise UserError(f"{configs}: the UNet has no SDXL size/pooled-text conditioning (addition_embed_type "
                        "'text_time'); is this an SD 1.x/2.x model?")
    encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder")))]
    if family == "sdxl":  # sdxl.py loads encoder 2 with its projection: the pooled text_embeds
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(configs / "text_encoder_2"))))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(configs), subfolder="vae"))
    return unet, encoders, vae


def check_diffusion_plan(family: str, plan: PlanInput) -> None:
    """The refusals of the trainer that decide the memory (library/families/sd.py, sdxl.py)."""
    if plan.cache_text_encoder_outputs and family != "sdxl":
        raise UserError("--cache_text_encoder_outputs is for SDXL (as in sd-scripts); SD 1.x/2.x encodes the "
                        "captions every step.")
    if plan.cache_text_encoder_outputs and plan.train_text_encoder:
        raise UserError("--cache_text_encoder_outputs needs frozen text encoders: add --network_train_unet_only "
                        "(the text encoder LoRA cannot train on cached outputs).")
    if family == "sdxl" and any(side % SDXL_SIDE_MULTIPLE for side in plan.resolution):
        w, h = plan.resolution
        raise UserError(f"--resolution {w},{h}: SDXL needs image sides that are multiples of {SDXL_SIDE_MULTIPLE}.")


def trace_diffusion(configs: Path, family: str, plan: PlanInput) -> Traced:
    """SD 1.x/2.x (``family`` "sd") or SDXL ("sdxl") from the configs in ``configs``."""
    from networks import lora

    check_diffusion_plan(family, plan)
    dtype = DTYPES[plan.mixed_precision]
    with torch.device("meta"):
        unet, encoders, vae = _build_diffusion(configs, family)
        unet.to(dtype)
        for te in encoders:
            te.to(dtype)
        args = {"conv_dim": str(plan.conv_dim), "conv_alpha": "1"} if plan.conv_dim else {}
        te_arg = encoders[0] if family == "sd" else encoders  # two encoders: lora_te1_ / lora_te2_
        network = lora.create_network(1.0, plan.network_dim, 1.0, None, te_arg, unet, **args)
    network.apply_to(te_arg, unet, plan.train_text_encoder, True)
    for m in (unet, *encoders, vae):
        m.requires_grad_(False)
    counts = {"unet": numel(unet), "vae": numel(vae), **{f"text_encoder_{i + 1}": numel(te)
                                                          for i, te in enumerate(encoders)}}  # fmt: skip
    vae_bytes = 0 if plan.cache_latents else counts["vae"] * (4 if plan.no_half_vae else dtype.itemsize)
    # With cached outputs sdxl.py moves the encoders to the CPU: they hold no GPU memory and never run.
    te_bytes = 0 if plan.cache_text_encoder_outputs else sum(nbytes(te) for te in encoders)
    weights = nbytes(unet) + te_bytes + vae_bytes
    lora_count = sum(p.numel() for p in network.parameters())
    # The forward runs in the compute dtype (autocast); meta kernels need one dtype, so cast a copy.
    network.to(dtype)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    w, h = plan.resolution
    b = plan.batch_size
    meta = {"device": "meta", "dtype": dtype}
    latents = torch.empty(b, unet.config.in_channels, h // scale, w // scale, **meta)
    timesteps = torch.zeros(b, dtype=torch.long, device="meta")
    counter = SavedTensorCounter([*unet.parameters(), *(p for te in encoders for p in te.parameters()),
                                  *network.parameters()])  # fmt: skip
    # place_modules checkpoints the encoders only when they train (frozen, they save nothing anyway)
    with counting(counter, [unet, *(encoders if plan.train_text_encoder else [])], CHECKPOINT_UNITS):
        if family == "sd":
            ids = torch.zeros(b, encoders[0].config.max_position_embeddings, dtype=torch.long, device="meta")
            pred = unet(latents, timesteps, encoder_hidden_states=encoders[0](ids).last_hidden_state).sample
        else:
            context, pooled = _sdxl_text(encoders, b, plan.cache_text_encoder_outputs, meta)
            conditioning = {"text_embeds": pooled, "time_ids": torch.empty(b, 6, **meta)}
            pred = unet(latents, timesteps, encoder_hidden_states=context, added_cond_kwargs=conditioning).sample
    return Traced(weights, lora_count, reached(pred, list(network.parameters())), counter, counts)


def _sdxl_text(encoders: list[torch.nn.Module], b: int, cached: bool, meta: dict) -> tuple[torch.Tensor, ...]:
    """SDXLFamily.encode_text: penultimate layers of both encoders concatenated, encoder 2's pooled projection."""
    te1, te2 = encoders
    length = te1.config.max_position_embeddings
    if cached:  # the cached outputs come from the CPU each step; nothing runs, nothing is saved
        width = te1.config.hidden_size + te2.config.hidden_size
        return torch.empty(b, length, width, **meta), torch.empty(b, te2.config.projection_dim, **meta)
    hidden = []
    for te in encoders:
        out = te(torch.zeros(b, te.config.max_position_embeddings, dtype=torch.long, device="meta"),
                 output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds


# --- causal LMs ---------------------------------------------------------------------------------


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


def trace_llm(folder: Path, plan: PlanInput) -> Traced:
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
    lora_count = sum(p.numel() for m in loras for p in m.parameters())
    ids = torch.zeros(plan.batch_size, plan.seq_len, dtype=torch.long, device="meta")
    counter = SavedTensorCounter([*model.parameters(), *(p for m in loras for p in m.parameters())])
    with counting(counter, [model], ()):
        loss = llm_loss(model, ids)
    trained = reached(loss, [p for m in loras for p in m.parameters()])
    return Traced(nbytes(model), lora_count, trained, counter, {"model": numel(model)})
