"""Sample images during training: kohya prompt files, samplers by kohya name, and the training hook.

Prompt files (``--sample_prompts``):

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped. Options
  follow the prompt as `` --name value``: ``--n`` negative prompt, ``--w`` / ``--h`` size,
  ``--s`` steps, ``--d`` seed, ``--l`` CFG scale, ``--ss`` sampler. A prompt cannot contain
  `` --`` (space, two dashes): that starts an option, as in sd-scripts.
- ``.toml``: ``[[prompt]]`` tables, or sd-scripts' ``[prompt]`` table of defaults with
  ``[[prompt.subset]]`` tables; keys ``prompt``, ``negative_prompt``, ``width``, ``height``,
  ``sample_steps``, ``seed``, ``scale``, ``sample_sampler``.
- ``.json``: a list of such objects (or of prompt lines as strings).

**improve** over sd-scripts: unknown options and keys, bad values and unknown samplers are
errors naming the file and line when the run starts, not silently ignored; a prompt without a
seed gets ``run seed + prompt index`` so the images of successive steps are comparable; a
failure while sampling is logged and training goes on.

A model family that can sample provides ``sample_pipeline()`` (a diffusers pipeline built from
its own modules, which the network patches, so the pipeline sees the trained LoRA) and may
provide ``sample_options()`` (keyword arguments of every pipeline call, e.g. ``clip_skip``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError, closest_name, did_you_mean
from library.fileio import atomic_write

# kohya sampler name → (diffusers scheduler class, settings over the model's scheduler config).
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    # sd-scripts keeps PNDM's Runge-Kutta warm-up, which fails below ~10 steps; SD's own config skips it.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # first-order DPM-Solver cannot end on sigma 0
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}
SAMPLER_NAMES: tuple[str, ...] = (*_SCHEDULERS, *_ALIASES)  # sd-scripts' --sample_sampler choices, in its order
_NEEDS_SCIPY = ("lms",)

# kohya's defaults for a prompt that does not set them
DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_SCALE = 512, 30, 7.5
MIN_SIDE = 64

# one-letter prompt-line options → prompt keys (.toml / .json use the keys)
LINE_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "s": "sample_steps", "d": "seed",
                "l": "scale", "ss": "sample_sampler"}
_KEY_TYPES: dict[str, type] = {"prompt": str, "negative_prompt": str, "width": int, "height": int,
                               "sample_steps": int, "seed": int, "scale": float, "sample_sampler": str}


def check_sampler(name: str, where: str = "--sample_sampler") -> str:
    """The canonical sampler name for a kohya name; a UserError for an unknown or unusable one."""
    key = name.strip().lower()
    canonical = _ALIASES.get(key, key)
    if canonical not in _SCHEDULERS:
        raise UserError(f"{where}: unknown sampler '{name}'{did_you_mean(key, SAMPLER_NAMES)}; "
                        f"choose one of {', '.join(SAMPLER_NAMES)}.")
    if canonical in _NEEDS_SCIPY and importlib.util.find_spec("scipy") is None:
        raise UserError(f"{where}: sampler '{name}' needs scipy (pip install scipy); or choose e.g. euler.")
    return canonical


def make_scheduler(name: str, model_config: Any) -> Any:
    """A fresh diffusers scheduler for the kohya sampler ``name``, from the model's scheduler config.

    The config carries the model's betas and prediction type, so v-prediction and zero-terminal-SNR
    models sample correctly (sd-scripts builds samplers from fixed SD 1.x betas instead).
    """
    import diffusers

    class_name, settings = _SCHEDULERS[check_sampler(name)]
    return getattr(diffusers, class_name).from_config(model_config, **settings)


# --- prompt files -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplePrompt:
    """One sample image request; ``seed`` None means run seed + ``index``."""

    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    sample_steps: int | None = None  # None: the family's default (DEFAULT_STEPS; text samples: 128 new tokens)
    seed: int | None = None
    scale: float = DEFAULT_SCALE
    sample_sampler: str | None = None  # None: --sample_sampler (load_prompts fills it in)
    index: int = 0
    where: str = ""  # "file, line N" for messages


def _checked_value(key: str, value: Any, where: str) -> Any:
    kind = _KEY_TYPES[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where}: {key} = {value!r} must be a whole number.")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {key} = {value!r} must be a number.")
        value = float(value)
    if kind is str and not isinstance(value, str):
        raise UserError(f"{where}: {key} = {value!r} must be a string.")
    limits = {"width": (8, 8192), "height": (8, 8192), "sample_steps": (1, 1000), "seed": (0, 2**63 - 1),
              "scale": (0.0, 100.0)}
    if key in limits and not limits[key][0] <= value <= limits[key][1]:
        low, high = limits[key]
        raise UserError(f"{where}: {key} = {value!r} is out of range; expected {low} to {high}.")
    if key == "sample_sampler":
        value = check_sampler(value, where)
    return value


def prompt_from_dict(values: dict[str, Any], where: str, index: int = 0) -> SamplePrompt:
    """A SamplePrompt from a .toml / .json entry, every key and value checked."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a table/object with a 'prompt' key or a prompt line, got {values!r}.")
    for key in values:
        if key not in _KEY_TYPES:
            raise UserError(f"{where}: unknown key '{key}'{did_you_mean(key, _KEY_TYPES)}; "
                            f"valid keys: {', '.join(_KEY_TYPES)}.")
    if "prompt" not in values:
        raise UserError(f"{where}: the entry has no 'prompt'.")
    checked = {key: _checked_value(key, value, where) for key, value in values.items()}
    return SamplePrompt(**checked, index=index, where=where)


def _option_value(key: str, text: str, where: str) -> Any:
    kind = _KEY_TYPES[key]
    try:
        return kind(text) if kind is not str else text
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        option = next(name for name, k in LINE_OPTIONS.items() if k == key)
        raise UserError(f"{where}: --{option} expects {expected}, got '{text}'.") from None


def parse_prompt_line(line: str, where: str = "prompt", index: int = 0) -> SamplePrompt:
    """A kohya prompt line: ``text --n negative --w 512 --h 768 --s 30 --d 42 --l 7 --ss euler_a``."""
    # A leading space lets a line that starts with an option have an empty prompt.
    parts = (" " + line.strip()).split(" --")
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        name, _, text = part.strip().partition(" ")
        if not name:
            raise UserError(f"{where}: '--' without an option name; options are "
                            f"{', '.join('--' + o for o in LINE_OPTIONS)}.")
        key = LINE_OPTIONS.get(name.lower())
        if key is None:
            best = closest_name(name.lower(), LINE_OPTIONS)
            raise UserError(f"{where}: unknown option '--{name}'" + (f" (did you mean '--{best}'?)" if best else "")
                            + f"; options are {', '.join('--' + o for o in LINE_OPTIONS)} (a prompt cannot contain "
                            "' --', which starts an option).")
        text = text.strip()
        if not text:
            raise UserError(f"{where}: --{name} needs a value.")
        values[key] = _option_value(key, text, where)
    return prompt_from_dict(values, where, index)


def _header_lines(text: str, header: str) -> list[int]:
    """1-based line numbers of each ``[[header]]`` in a TOML text."""
    pattern = re.compile(rf"^\s*\[\[\s*{re.escape(header)}\s*\]\]")
    return [n for n, line in enumerate(text.splitlines(), start=1) if pattern.match(line)]


def _toml_entries(path: Path, text: str) -> list[tuple[Any, str]]:
    import toml

    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as e:
        raise UserError(f"{path}: TOML syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    extra = [key for key in data if key != "prompt"]
    if extra or "prompt" not in data:
        raise UserError(f"{path}: expected [[prompt]] tables (or [prompt] with [[prompt.subset]] tables)"
                        + (f", found '{extra[0]}'{did_you_mean(extra[0], ['prompt'])}" if extra else "") + ".")

    def where(lines: list[int], i: int) -> str:
        return f"{path}, line {lines[i]}" if i < len(lines) else f"{path}, prompt {i + 1}"

    table = data["prompt"]
    if isinstance(table, list):  # [[prompt]] tables
        lines = _header_lines(text, "prompt")
        return [(entry, where(lines, i)) for i, entry in enumerate(table)]
    defaults = {k: v for k, v in table.items() if k != "subset"}
    if "subset" not in table:  # a single [prompt] table
        return [(defaults, where([], 0))]
    lines = _header_lines(text, "prompt.subset")
    subsets = table["subset"] if isinstance(table["subset"], list) else [table["subset"]]
    return [({**defaults, **entry} if isinstance(entry, dict) else entry, where(lines, i))
            for i, entry in enumerate(subsets)]


def _json_entries(path: Path, text: str) -> list[tuple[Any, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of prompt objects, got {type(data).__name__}.")
    return [(entry, f"{path}, entry {i + 1}") for i, entry in enumerate(data)]


def load_prompts(path: str | Path, default_sampler: str = "ddim") -> list[SamplePrompt]:
    """Every prompt of a .txt / .toml / .json prompt file, checked; the sampler filled in from the default."""
    path = Path(path)
    default = check_sampler(default_sampler)
    if not path.is_file():
        raise UserError(f"--sample_prompts: {path} not found.")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise UserError(f"--sample_prompts: {path} must be a .txt, .toml or .json file.")
    text = path.read_text(encoding="utf-8-sig")
    prompts: list[SamplePrompt] = []
    if suffix == ".txt":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                prompts.append(parse_prompt_line(line, f"{path}, line {number}", len(prompts)))
    else:
        entries = _toml_entries(path, text) if suffix == ".toml" else _json_entries(path, text)
        for i, (entry, where) in enumerate(entries):
            make = parse_prompt_line if isinstance(entry, str) else prompt_from_dict
            prompts.append(make(entry, where, i))
    if not prompts:
        raise UserError(f"--sample_prompts: {path} holds no prompts.")
    return [p if p.sample_sampler else replace(p, sample_sampler=default) for p in prompts]


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


def generate_image(pipe: Any, prompt: SamplePrompt, seed: int, scheduler_config: Any, **options: Any) -> Any:
    """One PIL image for ``prompt`` with a sampler made from ``scheduler_config`` (the pipeline's
    own at build time); the noise comes from a CPU generator, so a seed gives the same start on any device."""
    multiple = max(8, int(getattr(pipe, "vae_scale_factor", 8)))
    pipe.scheduler = make_scheduler(prompt.sample_sampler or "ddim", scheduler_config)
    result = pipe(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or None,
                  width=snap_side(prompt.width, multiple), height=snap_side(prompt.height, multiple),
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


class TrainingSamples:
    """The training loop's sampling hook: ``maybe_sample`` at every point where samples may be due."""

    def __init__(self, prompts: list[SamplePrompt], schedule: SampleSchedule, *, accelerator: Any, family: Any,
                 network: torch.nn.Module, folder: Path, output_name: str, seed: int,
                 log: Callable[[str], None] = print) -> None:
        for name, value in (("--sample_every_n_steps", schedule.every_n_steps),
                            ("--sample_every_n_epochs", schedule.every_n_epochs)):
            if value is not None and value < 1:
                raise UserError(f"{name} {value}: expected a positive number.")
        texts = hasattr(family, "generate_sample")  # a language model: sample texts (library/text_samples.py)
        if prompts and not (texts or hasattr(family, "sample_pipeline")):
            raise UserError(f"--sample_prompts: samples are not available for --model_type {family.name}; "
                            "remove --sample_prompts.")
        if texts:
            from library.text_samples import image_only_options

            for prompt in prompts:
                if flags := image_only_options(prompt, SamplePrompt(prompt.prompt)):
                    log(f"note: {prompt.where}: {', '.join(flags)} mean nothing for text samples (only --s, "
                        "the number of new tokens, applies)")
        if not prompts and (schedule.every_n_steps or schedule.every_n_epochs or schedule.at_first):
            log("note: --sample_every_n_steps / --sample_every_n_epochs / --sample_at_first do nothing "
                "without --sample_prompts")
        self.prompts, self.schedule = prompts, schedule
        self.accelerator, self.family, self.network = accelerator, family, network
        self.folder, self.output_name, self.seed, self.log = folder, output_name, seed, log
        self._last_step: int | None = None

    def maybe_sample(self, step: int, epoch: int | None = None, first: bool = False) -> None:
        """Sample if due at this step / epoch end / start; every process calls it at the same points."""
        if not self.prompts or not self.schedule.due(step, epoch, first) or step == self._last_step:
            return
        self._last_step = step
        # Only the main process generates; the others wait at the barrier, and all leave it together.
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
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
            options = self.family.sample_options() if hasattr(self.family, "sample_options") else {}
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
                    image = generate_image(pipe, prompt, seed, base_config, **options)
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
