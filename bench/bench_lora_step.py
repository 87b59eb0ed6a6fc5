"""Time one LoRA training step: the frozen floor, PEFT and networks.lora on the same backbone, in one run.

    python bench/bench_lora_step.py --quick                 # CPU (1 thread, CPU time): tiny and small SD-UNet and Llama
    python bench/bench_lora_step.py --cases sd15,sdxl,llama-1b --compile --json out.json   # a CUDA machine
    python bench/bench_lora_step.py --e2e                   # the real train_network.py on a synthetic dataset

A step is forward + backward + AdamW on the trainable parameters (bf16 autocast with bf16 base weights and
fp32 adapters on CUDA; fp32 on CPU unless ``--dtype bf16``). Implementations, measured interleaved (one step
of each in turn, the order rotating) so that machine noise hits all of them alike:

- ``floor``: no adapter, every weight frozen, gradients flowing to the input only. No adapter can beat it.
- ``peft``: ``peft.inject_adapter_in_model`` with the SAME target modules as networks.lora (kohya targets:
  every Linear / 1x1 conv inside the UNet's transformer blocks; all linear layers of an LLM but lm_head).
- ``ours``: networks.lora as ``create_network`` + ``apply_to`` build it (the default, fast path).
- ``plain``: networks.lora with the fused path switched off (its fallback: scale folded into ``up``, then add).
- ``head``: networks.lora's forward before the fused path existed, ``org(x) + up(down(x)) * scale`` ("before").
- ``floor+compile`` / ``ours+compile`` (``--compile``): regional ``torch.compile`` of every transformer block.

Reported: median step time of ``--steps`` steps after warm-up (CUDA events on a GPU, perf_counter on CPU),
samples or tokens per second, memory (CUDA: peak allocated during a step plus what stays resident for that
implementation; everywhere: the bytes of activations saved for backward), FLOPs per step from
``FlopCounterMode`` and achieved TFLOP/s, and the ratios ours/floor and ours/PEFT. Random-init weights with
the real architecture configs: timing does not depend on weight values. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from measure import count_flops, saved_bytes, timed  # noqa: E402

RANK = 16


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "unet" | "sdxl" | "llm"
    config: dict
    batch: int
    size: int  # latent side (UNet) or sequence length (LLM)
    context: tuple[int, int] = (77, 768)  # UNet text context (tokens, width)
    cuda_only: bool = False


# attention_head_dim is diffusers' legacy name for the number of heads: (2, 4, 8) gives heads of 32 channels,
# near SD1.5's 40 (8 heads everywhere would give 8-channel heads, whose CPU attention swamps everything else).
SD_SMALL = dict(block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256,
                attention_head_dim=(2, 4, 8),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8)
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=384)
LLAMA_SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=8192)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)

CASES = {c.name: c for c in [
    Case("sd-tiny", "unet", SD_TINY, batch=2, size=16, context=(77, 32)),
    Case("sd-small", "unet", SD_SMALL, batch=2, size=32, context=(77, 256)),
    Case("llama-tiny", "llm", LLAMA_TINY, batch=2, size=128),
    Case("llama-small", "llm", LLAMA_SMALL, batch=2, size=256),
    Case("sd15", "unet", SD15, batch=8, size=64, context=(77, 768), cuda_only=True),
    Case("sdxl", "sdxl", SDXL, batch=4, size=128, context=(77, 2048), cuda_only=True),
    Case("llama-1b", "llm", LLAMA_1B, batch=4, size=2048, cuda_only=True),
]}
QUICK = ["sd-tiny", "sd-small", "llama-tiny", "llama-small", "sd15", "sdxl", "llama-1b"]
REGIONS = ("BasicTransformerBlock", "LlamaDecoderLayer")  # what regional compilation compiles, one by one


# --- models and inputs ---------------------------------------------------------------------------


def build_model(case: Case) -> nn.Module:
    torch.manual_seed(0)
    if case.kind == "llm":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**case.config, max_position_embeddings=max(case.size, 512), tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=case.size, **case.config)


def make_inputs(case: Case, model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    b, s = case.batch, case.size
    if case.kind == "llm":
        ids = torch.randint(0, case.config["vocab_size"], (b, s), generator=g).to(device)
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids).to(dtype)
        # flat indices of the positions whose next token is a label (all here), as library/data/text_data.py
        positions = (F.pad(ids, (0, 1), value=-100)[..., 1:] != -100).flatten().nonzero().squeeze(1)
        return {"inputs_embeds": embeds, "labels": ids, "loss_positions": positions}
    inputs = {
        "sample": torch.randn(b, 4, s, s, generator=g).to(device, dtype),
        "timestep": torch.randint(0, 1000, (b,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(b, *case.context, generator=g).to(device, dtype),
        "target": torch.randn(b, 4, s, s, generator=g).to(device, torch.float32),
    }
    if case.kind == "sdxl":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(b, 1280, generator=g).to(device, dtype),
                                       "time_ids": torch.randn(b, 6, generator=g).to(device, dtype)}
    return inputs


def input_key(case: Case) -> str:
    return "inputs_embeds" if case.kind == "llm" else "sample"


def loss_of(case: Case, model: nn.Module, inputs: dict, chunked_ce: bool = False) -> torch.Tensor:
    if case.kind == "llm" and chunked_ce:  # what train_network.py runs (library/chunked_ce.py)
        from library.chunked_ce import causal_lm_loss_from_hidden

        hidden = model.model(inputs_embeds=inputs["inputs_embeds"], use_cache=False).last_hidden_state
        # positions computed once with the inputs, as the trainer's collate does: a boolean mask would sync
        return causal_lm_loss_from_hidden(hidden, model.get_output_embeddings(), inputs["labels"],
                                          positions=inputs["loss_positions"])
    if case.kind == "llm":
        return model(inputs_embeds=inputs["inputs_embeds"], labels=inputs["labels"]).loss
    kwargs = {k: v for k, v in inputs.items() if k not in ("sample", "timestep", "target")}
    out = model(inputs["sample"], inputs["timestep"], **kwargs).sample
    return F.mse_loss(out.float(), inputs["target"])


# --- the implementations -------------------------------------------------------------------------


def _head_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """networks.lora's forward before the fused path (commit 0aa9c76), without dropouts: the "before" column."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = module.org_forward(x, *args, **kwargs)
        return out + module.lora_up(module.lora_down(x)) * (module.multiplier * module.scale)

    return forward


def our_network(model: nn.Module, mode: str = "ours"):
    """networks.lora on ``model``; mode "plain" switches the fused path off, "head" restores the old forward."""
    from networks import lora

    network = lora.create_network(1.0, RANK, RANK, None, None, model)
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    if mode != "ours":
        for handle in network._copy_hooks:
            handle.remove()
        for module in network.all_loras():
            module._fast, module._copies = None, None
            if mode == "head":
                module.org_module.forward = _head_forward(module)
    return network


def target_paths(model: nn.Module) -> list[str]:
    """The module paths networks.lora adapts: the same list goes to PEFT."""
    probe = copy.deepcopy(model)
    network = our_network(probe)
    names = {id(m): n for n, m in probe.named_modules()}
    return [names[id(lo.org_module)] for lo in network.all_loras()]


def add_peft(model: nn.Module, paths: list[str]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=paths, lora_dropout=0.0), model)


@dataclasses.dataclass
class Impl:
    name: str
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    input_grad: bool
    compile_s: float | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    text_encoders: list[nn.Module] = dataclasses.field(default_factory=list)  # "+te": run every step, frozen
    chunked_ce: bool = False  # "+ce": the LLM loss of library/chunked_ce.py instead of transformers'


# The text encoders a diffusion step runs when their outputs are not cached (CLIP-L; SDXL adds OpenCLIP bigG).
TEXT_ENCODERS = {"sd15": [(768, 12, 12, 3072)], "sdxl": [(768, 12, 12, 3072), (1280, 32, 20, 5120)]}
FEATURES = ("compile", "gc", "fp8", "8bit", "te", "ce")


def text_encoders(case: Case) -> list[nn.Module]:
    """Frozen random-init CLIP text encoders of the real sizes (for the CPU cases: narrow, 2-4 layers)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    width = case.context[1]
    specs = TEXT_ENCODERS.get(case.name, [(width, 2 if width < 128 else 4, 4, 4 * width)])
    torch.manual_seed(0)
    return [CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                                         intermediate_size=i, max_position_embeddings=77)).requires_grad_(False)
            for h, n, a, i in specs]


def build_impl(name: str, case: Case, base: nn.Module, paths: list[str], device: torch.device,
               base_dtype: torch.dtype) -> Impl:
    """One implementation: ``kind[+feature...]``, kind from floor/peft/ours/plain/head, features from FEATURES.

    Features (the memory features, measured against plain ``ours``): ``gc`` gradient checkpointing, ``fp8`` the
    frozen base stored in float8 (``--fp8_base``), ``8bit`` bitsandbytes AdamW8bit, ``te`` the text encoders
    run every step (what ``--cache_text_encoder_outputs`` saves), ``ce`` the chunked LLM cross-entropy that
    train_network.py uses (floor and PEFT keep transformers' loss), ``compile`` regional torch.compile.
    """
    kind, *features = name.split("+")
    # The frozen base (already on the device, in base_dtype) is shared: modules are copied, its tensors not, so
    # ten implementations of SDXL do not hold ten UNets. --fp8_base rebinds the weights: that one gets a copy.
    shared = {} if "fp8" in name.split("+") else {id(t): t for t in [*base.parameters(), *base.buffers()]}
    model = copy.deepcopy(base, memo=shared)
    model.requires_grad_(False)
    if unknown := set(features) - set(FEATURES):
        raise SystemExit(f"unknown feature(s) {sorted(unknown)} in --impls {name}; known: {', '.join(FEATURES)}")
    if "fp8" in features:  # before the adapters wrap the layers, as train_network.py does
        from library.fp8 import store_in_fp8

        store_in_fp8(model, base_dtype)
    if kind == "peft":
        add_peft(model, paths)
    elif kind in ("ours", "plain", "head"):
        network = our_network(model, kind)
        network.to(device, torch.float32)
        network.requires_grad_(True)
    for n, p in model.named_parameters():
        if "lora_" in n:  # PEFT: fp32 adapters, trainable
            p.data = p.data.to(device, torch.float32)
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if kind in ("ours", "plain", "head"):
        params = [p for p in network.parameters() if p.requires_grad]
    if "gc" in features:
        if case.kind == "llm":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.enable_gradient_checkpointing()
    if "compile" in features:
        from library.regional_compile import recompile_budget

        regions = [m for m in model.modules() if type(m).__name__ in REGIONS]
        limit = recompile_budget(regions)
        # static shapes: the bench's inputs never change, and a dynamic graph compiled for another
        # implementation's block (one code object per class) would otherwise carry over to this one
        kwargs: dict = {"dynamic": False}
        if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch >= 2.9, as training does
            kwargs["recompile_limit"] = limit
        for module in regions:
            module.compile(**kwargs)
    optimizer = None
    if params and "8bit" in features:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    elif params:
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    encoders = []
    if "te" in features:
        encoders = [te.to(device, base_dtype) for te in text_encoders(case)]
    model.train()
    return Impl(name, model, params, optimizer, input_grad=kind == "floor", text_encoders=encoders,
                chunked_ce="ce" in features)


def run_step(case: Case, impl: Impl, inputs: dict, amp: torch.dtype | None, device: torch.device) -> None:
    x = inputs[input_key(case)]
    if impl.input_grad:
        x.requires_grad_(True)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        if impl.text_encoders:
            ids = torch.randint(0, 49408, (case.batch, 77), device=device)
            with torch.no_grad():
                for te in impl.text_encoders:
                    te(ids, output_hidden_states=True)
        loss = loss_of(case, impl.model, inputs, chunked_ce=impl.chunked_ce)
    loss.backward()
    if impl.optimizer is not None:
        impl.optimizer.step()
        impl.optimizer.zero_grad(set_to_none=True)
    if impl.input_grad:
        x.grad = None
        x.requires_grad_(False)


def resident_bytes(impl: Impl) -> int:
    """Weights, adapters (networks.lora's live outside the model), text encoders and optimizer state, each once."""
    tensors = [*impl.model.parameters(), *impl.model.buffers(), *impl.params]
    tensors += [t for te in impl.text_encoders for t in te.parameters()]
    if impl.optimizer is not None:
        tensors += [v for state in impl.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def bench_case(case: Case, impl_names: list[str], steps: int, warmup: int, device: torch.device,
               dtype_arg: str, clock: str = "wall") -> dict:
    amp = torch.bfloat16 if (device.type == "cuda" or dtype_arg == "bf16") else None
    base_dtype = amp or torch.float32
    with torch.device(device):  # random init on the GPU: building SDXL on the CPU takes about a minute
        base = build_model(case)
    paths = target_paths(base)
    inputs = make_inputs(case, base, device, base_dtype)
    if base_dtype != torch.float32:  # diffusers warns on every .to(dtype), even a no-op one
        base.to(base_dtype)
    base.requires_grad_(False)
    impls = [build_impl(name, case, base, paths, device, base_dtype) for name in impl_names]
    del base
    per_step = case.batch * (case.size if case.kind == "llm" else 1)
    unit = "tokens/s" if case.kind == "llm" else "samples/s"
    stats = {impl.name: {} for impl in impls}
    for impl in impls:
        t0 = time.perf_counter()
        run_step(case, impl, inputs, amp, device)  # first step: compiles where asked
        if device.type == "cuda":
            torch.cuda.synchronize()
        if "compile" in impl.name.split("+"):
            impl.compile_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            run_step(case, impl, inputs, amp, device)
        stats[impl.name]["flops"] = count_flops(lambda impl=impl: run_step(case, impl, inputs, amp, device))
        stats[impl.name]["saved_MiB"] = saved_bytes(lambda impl=impl: run_step(case, impl, inputs, amp, device)) / 2**20
    for i in range(steps):
        order = impls[i % len(impls):] + impls[:i % len(impls)]
        for impl in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            impl.times.append(timed(lambda impl=impl: run_step(case, impl, inputs, amp, device), device, clock))
            if device.type == "cuda":
                extra = torch.cuda.max_memory_allocated() - before
                peak = resident_bytes(impl) + extra
                stats[impl.name]["peak_GiB"] = max(stats[impl.name].get("peak_GiB", 0.0), peak / 2**30)
    for impl in impls:
        s = stats[impl.name]
        s["step_s"] = statistics.median(impl.times)
        s["throughput"] = per_step / s["step_s"]
        s["unit"] = unit
        s["tflops"] = s["flops"] / s["step_s"] / 1e12
        s["trainable"] = sum(p.numel() for p in impl.params)
        s["resident_MiB"] = resident_bytes(impl) / 2**20
        if impl.compile_s is not None:
            s["compile_s"] = impl.compile_s
    return {"case": case.name, "targets": len(paths), "batch": case.batch, "size": case.size, "clock": clock,
            "dtype": "bf16 autocast" if amp else "fp32", "impls": stats, "ratios": report.ratios(stats)}


# --- end to end: the real train_network.py -------------------------------------------------------


def bench_e2e(steps: int, device: torch.device) -> dict:
    """train_network.main in-process twice (few and many steps); the difference is the per-step cost."""
    import tempfile

    import train_network
    from library.tiny_models import save_tiny_sd, write_synthetic_images

    batch = 4
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_sd(tmp / "model")
        images = write_synthetic_images(tmp / "images", count=16, size=64)
        data = tmp / "data.toml"
        data.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = {batch}\n'
                        f'  [[datasets.subsets]]\n  image_dir = "{images}"\n  num_repeats = 1\n')

        def run(n: int) -> float:
            argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data),
                    "--output_dir", str(tmp / f"out{n}"), "--output_name", "lora", "--network_dim", str(RANK),
                    "--network_alpha", str(RANK), "--learning_rate", "1e-4", "--seed", "0", "--cache_latents",
                    "--network_train_unet_only", "--max_train_steps", str(n), "--optimizer_type", "AdamW",
                    # the pure step below runs under bf16 autocast on CUDA: the e2e run must too
                    "--mixed_precision", "bf16" if device.type == "cuda" else "no"]
            t0 = time.perf_counter()
            if train_network.main(argv) != 0:
                raise SystemExit("train_network failed")
            return time.perf_counter() - t0

        run(2)  # warm caches (imports, first-call overheads)
        few, many = run(2), run(2 + steps)
    e2e_step = (many - few) / steps
    # The same UNet, batch and latent size as a pure step (tiny VAE: 64-px images give 32x32 latents).
    case = Case("sd-tiny-e2e", "unet", SD_TINY, batch=batch, size=32, context=(77, 32))
    pure = bench_case(case, ["ours"], steps=max(10, steps), warmup=3, device=device, dtype_arg="fp32")
    pure_step = pure["impls"]["ours"]["step_s"]
    return {"case": "e2e train_network.py (tiny SD, cached latents, batch 4, 64 px)", "steps": steps,
            "e2e_step_s": e2e_step, "e2e_samples_per_s": batch / e2e_step, "pure_step_s": pure_step,
            "e2e/pure": e2e_step / pure_step}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="tiny and small cases (full-size ones need CUDA)")
    p.add_argument("--impls", default="floor,peft,ours",
                   help="comma-separated: floor, peft, ours, plain, head, each with optional +features from "
                        f"{', '.join(FEATURES)} (e.g. ours+gc,ours+fp8,ours+8bit,ours+te,ours+ce)")
    p.add_argument("--compile", action="store_true", help="also floor+compile and ours+compile (regional)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="CPU only; CUDA always uses bf16")
    p.add_argument("--e2e", action="store_true", help="time the real train_network.py instead")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None,
                   help="cpu: process CPU time (CPU device only; use with --threads 1 on a busy machine)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is steadier on a busy machine; --quick on a CPU defaults to 1 with "
                        "--clock cpu, wall time elsewhere)")
    args = p.parse_args(argv)
    if args.quick and not torch.cuda.is_available():
        # CPU time of one thread: on a shared machine wall time swings by ±50%, CPU time by ±5%
        args.threads = args.threads or 1
        args.clock = args.clock or "cpu"
    args.clock = args.clock or "wall"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.compile:  # a block class past its graph limit would silently run eagerly: an error instead
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = report.environment(device)
    print(json.dumps(env))
    results: list[dict] = []
    if args.e2e:
        results.append(bench_e2e(args.steps, device))
        print(json.dumps(results[-1], indent=1))
    else:
        names = args.cases.split(",") if args.cases else (QUICK if args.quick else list(CASES))
        impls = args.impls.split(",") + (["floor+compile", "ours+compile"] if args.compile else [])
        for name in names:
            case = CASES[name]
            if case.cuda_only and device.type != "cuda":
                results.append({"case": name, "pending": "pending (needs CUDA)"})
            else:
                t0 = time.perf_counter()
                clock = args.clock if device.type == "cpu" else "wall"
                skip = "te" if case.kind == "llm" else "ce"  # an LLM has no text encoder, a UNet no vocabulary
                names_here = [n for n in impls if skip not in n.split("+")]
                try:
                    results.append(bench_case(case, names_here, args.steps, args.warmup, device, args.dtype, clock))
                except Exception as e:  # noqa: BLE001 - an OOM or a compile failure must not lose the other cases
                    results.append({"case": name, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                results[-1]["wall_s"] = time.perf_counter() - t0
            shown = results[-1].get("ratios", results[-1].get("pending", results[-1].get("error")))
            print(f"{name}: " + json.dumps(shown), flush=True)
            if args.json:  # after every case: a later crash or a time limit keeps what was measured
                Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=1))
        print(report.fmt_table([r for r in results if "error" not in r]))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
