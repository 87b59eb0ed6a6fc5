"""Sample images during training: samplers by kohya name, generation, and the training hook.

Prompt files are read by library/sample_prompts.py. **improve** over sd-scripts: a prompt without a seed gets
``run seed + prompt index`` so the images of successive steps are comparable; prompts are encoded as training
encodes captions (``--max_token_length`` chunks, ``--clip_skip``), so long prompts are not cut at 77 tokens, with
A1111 weighting such as ``(word:1.2)`` and ``BREAK`` (library/prompt_weighting.py, as sd-scripts' sampling);
samplers are built from the model's own noise schedule (v-prediction, zero terminal SNR); a failure while
sampling is logged and training goes on. Like sd-scripts, the prompt file is read again at each sampling point,
so it can be edited during a run (an edit with an error keeps the previous prompts).

A model family that can sample provides ``sample_pipeline()`` (a diffusers pipeline built from its own
modules, which the network patches, so the pipeline sees the trained LoRA) and ``sample_embeds(prompt,
negative)`` (the pipeline's ``prompt_embeds`` keyword arguments, encoded as in training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.fileio import atomic_write
from library.sample_prompts import DEFAULT_STEPS, MIN_SIDE, SCHEDULERS, SamplePrompt, check_sampler, load_prompts


def make_scheduler(name: str, model_config: Any) -> Any:
    """A fresh diffusers scheduler for the kohya sampler ``name``, from the model's scheduler config.

    The config carries the model's betas and prediction type, so v-prediction and zero-terminal-SNR
    models sample correctly (sd-scripts builds samplers from fixed SD 1.x betas instead). A zero-terminal-SNR
    schedule starts at the last timestep ("trailing" spacing, as the paper that introduced it says), where
    pure noise is what the model learnt; library/sample_prompts.py refuses the samplers that ignore it.
    """
    import diffusers

    class_name, settings = SCHEDULERS[check_sampler(name)]
    if model_config.get("rescale_betas_zero_snr"):
        settings = {**settings, "timestep_spacing": "trailing"}
    return getattr(diffusers, class_name).from_config(model_config, **settings)


# --- generation ---------------------------------------------------------------------------------

def build_pipeline(pipeline_class: Any, prediction_type: str, scheduler: Any, **components: Any) -> Any:
    """A diffusers pipeline over a family's own (already placed, LoRA-patched) modules.

    ``scheduler`` is the family's training scheduler: its config (betas, zero-SNR rescaling) is
    the base of every sampler; ``prediction_type`` ("epsilon" | "v") is the one the run trains.
    """
    from diffusers import DDPMScheduler

    base = DDPMScheduler.from_config(scheduler.config,
                                     prediction_type="v_prediction" if prediction_type == "v" else "epsilon")
    pipe = pipeline_class(scheduler=base, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snap_side(side: int, multiple: int) -> int:
    """Round a requested side down to a multiple the VAE and pipeline accept (at least 64, as kohya)."""
    return max(MIN_SIDE, side - side % multiple)


def generate_image(pipe: Any, prompt: SamplePrompt, seed: int, scheduler_config: Any,
                   embeds: dict[str, torch.Tensor] | None = None, **options: Any) -> Any:
    """One PIL image for ``prompt`` with a sampler made from ``scheduler_config`` (the pipeline's own at build
    time); ``embeds``: the family's ``sample_embeds`` for it (else the pipeline encodes the text itself). The
    noise comes from a CPU generator, so a seed gives the same start on any device."""
    multiple = max(8, int(getattr(pipe, "vae_scale_factor", 8)))
    pipe.scheduler = make_scheduler(prompt.sample_sampler or "ddim", scheduler_config)
    text = embeds if embeds is not None else {"prompt": prompt.prompt,
                                              "negative_prompt": prompt.negative_prompt or None}
    result = pipe(**text, width=snap_side(prompt.width, multiple), height=snap_side(prompt.height, multiple),
                  num_inference_steps=prompt.sample_steps or DEFAULT_STEPS, guidance_scale=prompt.scale,
                  generator=torch.Generator().manual_seed(seed), output_type="pil", **options)
    return result.images[0]


def png_parameters(prompt: SamplePrompt, seed: int, size: tuple[int, int], step: int) -> str:
    """The A1111-style ``parameters`` text stored in each PNG (image viewers and web UIs show it)."""
    lines = [prompt.prompt]
    if prompt.negative_prompt:
        lines.append(f"Negative prompt: {prompt.negative_prompt}")
    lines.append(f"Steps: {prompt.sample_steps or DEFAULT_STEPS}, Sampler: {prompt.sample_sampler}, "
                 f"CFG scale: {prompt.scale:g}, Seed: {seed}, Size: {size[0]}x{size[1]}, Training step: {step}")
    return "\n".join(lines)


def save_png(image: Any, path: Path, parameters: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_write(path) as f:
        image.save(f, format="PNG", pnginfo=info)


@contextlib.contextmanager
def on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Modules parked off the accelerator during training (a VAE after --cache_latents, SDXL's text encoders
    after --cache_text_encoder_outputs) come to ``device`` for sampling and go back afterwards."""
    parked = []
    for module in modules:
        first = next(module.parameters(), None)
        if first is not None and first.device != device:
            parked.append((module, first.device))
    try:
        for module, _ in parked:
            module.to(device)
        yield
    finally:
        for module, home in parked:
            module.to(home)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no dropout), each restored to its own mode afterwards."""
    states = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in states:
            m.training = training


def log_images_to_trackers(trackers: list[Any], images: dict[str, Any], step: int) -> None:
    """Images to tensorboard and wandb trackers; other trackers are skipped."""
    import numpy as np

    for tracker in trackers:
        if tracker.name == "tensorboard":
            for tag, image in images.items():
                tracker.log_images({tag: np.asarray(image)[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": list(images.values())}, step=step)


@dataclass(frozen=True)
class SampleSchedule:
    """When to sample: before training, every N optimizer steps, at the end of every N epochs."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False

    def due(self, step: int, epoch: int | None = None, first: bool = False) -> bool:
        if first:
            return self.at_first
        if epoch is not None:
            return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0
        return bool(self.every_n_steps) and step % self.every_n_steps == 0


@dataclass(frozen=True)
class PromptSource:
    """Where the prompts come from, so that the hook can read the file again when it changes."""

    path: Path
    default_sampler: str = "ddim"
    zero_terminal_snr: bool = False

    def load(self) -> list[SamplePrompt]:
        return load_prompts(self.path, self.default_sampler, self.zero_terminal_snr)

    def stamp(self) -> tuple[int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size


class TrainingSamples:
    """The training loop's sampling hook: ``maybe_sample`` at every point where samples may be due."""

    def __init__(self, source: PromptSource | None, schedule: SampleSchedule, *, accelerator: Any, family: Any,
                 network: torch.nn.Module, folder: Path, output_name: str, seed: int,
                 log: Callable[[str], None] = print, prompts: list[SamplePrompt] | None = None) -> None:
        """``prompts``: ``source`` as already read (the run reads it before the model loads)."""
        for name, value in (("--sample_every_n_steps", schedule.every_n_steps),
                            ("--sample_every_n_epochs", schedule.every_n_epochs)):
            if value is not None and value < 1:
                raise UserError(f"{name} {value}: expected a positive number.")
        # Prompts read earlier (before the model loaded) may predate an edit: then the first sampling reads again.
        self.source, self._stamp = source, source.stamp() if source and prompts is None else None
        prompts = prompts if prompts is not None or source is None else source.load()
        prompts = prompts or []
        texts = hasattr(family, "generate_sample")  # a language model: sample texts (library/text_samples.py)
        if prompts and not (texts or hasattr(family, "sample_pipeline")):
            raise UserError(f"--sample_prompts: samples are not available for --model_type {family.name}; "
                            "remove --sample_prompts.")
        self.texts, self.log = texts, log
        self._note_image_only_options(prompts)
        cadence = schedule.every_n_steps or schedule.every_n_epochs or schedule.at_first
        if not prompts and cadence and source is not None:
            log(f"note: {source.path} holds no prompts: nothing is sampled until prompts are added to it")
        elif not prompts and cadence:
            log("note: --sample_every_n_steps / --sample_every_n_epochs / --sample_at_first do nothing "
                "without --sample_prompts")
        if prompts and not cadence:
            log("note: --sample_prompts samples nothing without --sample_every_n_steps, --sample_every_n_epochs "
                "or --sample_at_first")
        self.prompts, self.schedule = prompts, schedule
        self.accelerator, self.family, self.network = accelerator, family, network
        self.folder, self.output_name, self.seed = folder, output_name, seed
        self._last_step: int | None = None

    def _note_image_only_options(self, prompts: list[SamplePrompt]) -> None:
        if not self.texts:
            return
        from library.text_samples import image_only_options

        for prompt in prompts:
            if flags := image_only_options(prompt, SamplePrompt(prompt.prompt)):
                self.log(f"note: {prompt.where}: {', '.join(flags)} mean nothing for text samples (only --s, "
                         "the number of new tokens, applies)")

    def refresh_prompts(self) -> None:
        """Read the prompt file again if it changed since it was read (sd-scripts reads it at every sampling
        point, and users edit prompts during long runs); an edit with an error keeps the previous prompts."""
        if self.source is None or (stamp := self.source.stamp()) == self._stamp:
            return
        self._stamp = stamp
        try:
            prompts = self.source.load()
        except UserError as e:
            self.log(f"note: the edited prompt file has an error, so the previous {len(self.prompts)} prompts are "
                     f"used: {e}")
            return
        if prompts == self.prompts:  # touched, or read before the run started: nothing to say
            return
        self._note_image_only_options(prompts)
        self.log(f"{self.source.path} changed: {len(prompts)} prompts read again")
        self.prompts = prompts

    def maybe_sample(self, step: int, epoch: int | None = None, first: bool = False) -> None:
        """Sample if due at this step / epoch end / start; every process calls it at the same points."""
        if not self.prompts or not self.schedule.due(step, epoch, first) or step == self._last_step:
            return
        self._last_step = step
        # Only the main process generates; the others wait at the barrier, and all leave it together.
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.refresh_prompts()
            self.sample(step)
        self.accelerator.wait_for_everyone()

    def sample(self, step: int) -> list[Path]:
        """Write one PNG per prompt (or one text file for a language model); a failure is logged and the
        remaining prompts still run."""
        if hasattr(self.family, "generate_sample"):
            return self.sample_texts(step)
        self.log(f"sample images at step {step} ({len(self.prompts)} prompts)")
        try:
            pipe = self.family.sample_pipeline()
        except Exception as e:  # sampling must never end a run
            self.log(f"sampling failed at step {step}: {type(e).__name__}: {e}; training continues")
            return []
        device = self.accelerator.device
        base_config = pipe.scheduler.config  # each prompt's sampler starts from it, not from the previous one
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        written: list[Path] = []
        images: dict[str, Any] = {}
        # fork_rng: sampling draws no number from the training's random streams (dropout).
        with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
              eval_mode(self.network, *modules), torch.no_grad(), self.accelerator.autocast(),
              on_device(modules, device)):
            for prompt in self.prompts:
                seed = prompt.seed if prompt.seed is not None else self.seed + prompt.index
                try:
                    embeds = self.family.sample_embeds(prompt.prompt, prompt.negative_prompt)
                    image = generate_image(pipe, prompt, seed, base_config, embeds)
                    path = self.folder / f"{self.output_name}_{step:06d}_{prompt.index:02d}_{seed}.png"
                    self.folder.mkdir(parents=True, exist_ok=True)
                    save_png(image, path, png_parameters(prompt, seed, image.size, step))
                except Exception as e:  # one bad prompt (size, OOM, NaN) must not stop training
                    self.log(f"sample {prompt.index} failed at step {step} ({prompt.where}: {prompt.prompt!r}): "
                             f"{type(e).__name__}: {e}; training continues")
                    continue
                written.append(path)
                images[f"sample/{prompt.index:02d}"] = image
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            log_images_to_trackers(self.accelerator.trackers, images, step)
        except Exception as e:  # a tracker problem must not stop training either
            self.log(f"logging sample images to the trackers failed: {type(e).__name__}: {e}")
        if written:
            self.log(f"wrote {len(written)} sample images to {self.folder}")
        return written

    def sample_texts(self, step: int) -> list[Path]:
        """A language model's samples: one greedy answer per prompt, in one text file for this step."""
        from library.text_samples import write_text_samples

        self.log(f"sample texts at step {step} ({len(self.prompts)} prompts)")
        device = self.accelerator.device
        with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
              eval_mode(self.network, self.family.network_inputs()[2]), torch.no_grad(),
              self.accelerator.autocast()):
            path = write_text_samples(self.prompts, self.family.generate_sample, self.folder, self.output_name,
                                      step, lambda values: self.accelerator.log(values, step=step), self.log)
        if path is not None:
            self.log(f"wrote sample texts to {path}")
        return [path] if path is not None else []
