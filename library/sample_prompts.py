"""Sample prompt files (``--sample_prompts``) and kohya sampler names, checked before the model loads.

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped. Options
  follow the prompt as `` --name value``: ``--n`` negative prompt, ``--w`` / ``--h`` size,
  ``--s`` steps, ``--d`` seed, ``--l`` CFG scale, ``--ss`` sampler. A prompt cannot contain
  `` --`` (whitespace, two dashes): that starts an option, as in sd-scripts.
- ``.toml``: ``[[prompt]]`` tables, or sd-scripts' ``[prompt]`` table of defaults with
  ``[[prompt.subset]]`` tables; keys ``prompt``, ``negative_prompt``, ``width``, ``height``,
  ``sample_steps``, ``seed``, ``scale``, ``sample_sampler``.
- ``.json``: a list of such objects (or of prompt lines as strings).

**improve** over sd-scripts: unknown options and keys, bad values and unknown samplers are
errors naming the file and line when the run starts, not silently ignored.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from library.errors import UserError, closest_name, did_you_mean

# kohya sampler name → (diffusers scheduler class, settings over the model's scheduler config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
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
SAMPLER_NAMES: tuple[str, ...] = (*SCHEDULERS, *_ALIASES)  # sd-scripts' --sample_sampler choices, in its order
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
    if canonical not in SCHEDULERS:
        raise UserError(f"{where}: unknown sampler '{name}'{did_you_mean(key, SAMPLER_NAMES)}; "
                        f"choose one of {', '.join(SAMPLER_NAMES)}.")
    if canonical in _NEEDS_SCIPY and importlib.util.find_spec("scipy") is None:
        raise UserError(f"{where}: sampler '{name}' needs scipy (pip install scipy); or choose e.g. euler.")
    return canonical


@functools.cache
def honours_zero_snr(canonical: str) -> bool:
    """Whether diffusers' scheduler for a sampler applies ``rescale_betas_zero_snr`` (some accept the setting
    and sample with the original schedule: PNDM, Heun, KDPM2, single-step DPM-Solver in diffusers 0.42)."""
    import diffusers

    class_name, settings = SCHEDULERS[canonical]
    config = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     rescale_betas_zero_snr=True).config
    scheduler = getattr(diffusers, class_name).from_config(config, **settings)
    return float(scheduler.alphas_cumprod[-1]) < 1e-4


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
    if key == "seed" and value == -1:  # A1111's "random seed": here the default, run seed + prompt index
        return None
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
    if values.get("prompt") is None:
        raise UserError(f"{where}: the entry has no 'prompt'.")
    # JSON null means "not set" (the default), as in sd-scripts
    checked = {key: _checked_value(key, value, where) for key, value in values.items() if value is not None}
    return SamplePrompt(**checked, index=index, where=where)


def _option_value(key: str, text: str, where: str) -> Any:
    kind = _KEY_TYPES[key]
    try:
        if kind is not str and "_" in text:  # Python's int() / float() read "5_12" as 512
            raise ValueError(text)
        return kind(text) if kind is not str else text
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        option = next(name for name, k in LINE_OPTIONS.items() if k == key)
        raise UserError(f"{where}: --{option} expects {expected}, got '{text}'.") from None


def parse_prompt_line(line: str, where: str = "prompt", index: int = 0) -> SamplePrompt:
    """A kohya prompt line: ``text --n negative --w 512 --h 768 --s 30 --d 42 --l 7 --ss euler_a``."""
    # A leading space lets a line that starts with an option have an empty prompt; a tab before "--" starts
    # an option too (sd-scripts splits on spaces only and keeps "\t--w 64" in the prompt text).
    parts = re.split(r"\s--", " " + line.strip())
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        name, text = (re.split(r"\s+", part.strip(), maxsplit=1) + [""])[:2]
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
        if key in values:
            raise UserError(f"{where}: --{name} is given twice; keep one.")
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


def load_prompts(path: str | Path, default_sampler: str = "ddim",
                 zero_terminal_snr: bool = False) -> list[SamplePrompt]:
    """Every prompt of a .txt / .toml / .json prompt file, checked; the sampler filled in from the default.

    ``zero_terminal_snr``: the run trains on a zero-terminal-SNR schedule, so samplers that ignore it are refused.
    """
    path = Path(path)
    default = check_sampler(default_sampler)
    if path.is_dir():
        raise UserError(f"--sample_prompts: {path} is a folder; give the prompt file (.txt, .toml or .json).")
    if not path.is_file():
        raise UserError(f"--sample_prompts: {path} not found.")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise UserError(f"--sample_prompts: {path} must be a .txt, .toml or .json file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"--sample_prompts: {path} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    except OSError as e:
        raise UserError(f"--sample_prompts: cannot read {path}: {e.strerror or e}") from None
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
    # An empty file is no error: the kohya_ss GUI writes one when no prompts were entered, and a run re-reads it
    # when it changes, so prompts can be added later (the caller says that nothing is sampled meanwhile).
    if zero_terminal_snr:
        uses_default = any(not p.sample_sampler for p in prompts)
        for where, sampler in [(p.where, p.sample_sampler) for p in prompts if p.sample_sampler] + (
                [("--sample_sampler", default)] if uses_default else []):
            if not honours_zero_snr(sampler):
                good = ", ".join(name for name in SCHEDULERS if name not in _NEEDS_SCIPY and honours_zero_snr(name))
                raise UserError(f"{where}: sampler '{sampler}' ignores the --zero_terminal_snr noise schedule in "
                                f"diffusers (its images would come from the original schedule); choose one of {good}.")
    return [p if p.sample_sampler else replace(p, sample_sampler=default) for p in prompts]
