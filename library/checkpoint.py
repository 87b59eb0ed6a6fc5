"""Output names, save cadence, rotation and training state folders (CONTRACTS.md §4).

Model files are written atomically by the network's save_weights; state folders are
written under a temporary name and renamed once complete, and carry a completion marker so
``--resume latest`` never picks a half-written one. Rotation deletes old files only after
the new one exists.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import UserError

logger = logging.getLogger(__name__)

STATE_MARKER = "train_state.json"
SAMPLE_FOLDER = "sample"  # under --output_dir: the images / texts sampled during training


@dataclass(frozen=True)
class SavePlan:
    """When and under which names to save."""

    output_dir: Path
    output_name: str
    extension: str = ".safetensors"
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    last_n_epochs: int | None = None
    last_n_steps: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    last_n_epochs_state: int | None = None  # state folders' own rotation; default: as the model files
    last_n_steps_state: int | None = None

    def epoch_name(self, epoch: int) -> str:
        return f"{self.output_name}-{epoch:06d}"

    def step_name(self, step: int) -> str:
        return f"{self.output_name}-step{step:08d}"

    def model_path(self, stem: str) -> Path:
        return self.output_dir / f"{stem}{self.extension}"

    def state_path(self, stem: str) -> Path:
        return self.output_dir / f"{stem}-state"

    def due_at_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def due_at_epoch(self, epoch: int, last_epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0 and epoch < last_epoch

    def stale_epoch(self, epoch: int, last_n: int | None = None) -> int | None:
        """The epoch whose files rotation removes after saving ``epoch`` (keeping ``last_n``, default
        ``last_n_epochs``), if any."""
        last_n = last_n or self.last_n_epochs
        if not last_n or not self.every_n_epochs:
            return None
        old = epoch - self.every_n_epochs * last_n
        return old if old > 0 else None

    def stale_step(self, step: int, last_n: int | None = None) -> int | None:
        """The step whose files rotation removes after saving ``step``: the files of the last ``last_n`` steps
        (saved at ``step - last_n`` or later) stay, as in sd-scripts (its get_remove_step_no)."""
        last_n = last_n or self.last_n_steps
        if not last_n or not self.every_n_steps:
            return None
        old = step - last_n - 1
        old -= old % self.every_n_steps
        return old if old > 0 else None

    def stale_at_epoch(self, epoch: int) -> tuple[str | None, str | None]:
        """(model stem, state stem) that rotation removes after saving ``epoch``: the state folders keep
        ``last_n_epochs_state`` when given (sd-scripts' --save_last_n_epochs_state), else as many as the files."""
        model, state = self.stale_epoch(epoch), self.stale_epoch(epoch, self.last_n_epochs_state)
        return (self.epoch_name(model) if model else None), (self.epoch_name(state) if state else None)

    def older_step_saves(self, stem: str, states: bool) -> list[Path]:
        """When ``stem`` is a step save: this run's step saves at that step or before, on the cadence or off it (a
        stop saves at the step it stopped at), model files and adapter folders or, with ``states``, state folders.
        Rotation removes them with the stale step; [] for an epoch stem."""
        name = re.escape(self.output_name)
        own = re.fullmatch(rf"{name}-step(\d{{8}})", stem)
        if own is None or not self.output_dir.is_dir():
            return []
        suffix = "-state" if states else f"({re.escape(self.extension)})?"
        pattern = re.compile(rf"{name}-step(\d{{8}}){suffix}")
        return sorted(p for p in self.output_dir.iterdir()
                      if (m := pattern.fullmatch(p.name)) and int(m.group(1)) <= int(own.group(1)))

    def stale_at_step(self, step: int) -> tuple[str | None, str | None]:
        """As :meth:`stale_at_epoch`, for step saves (``last_n_steps_state``)."""
        model, state = self.stale_step(step), self.stale_step(step, self.last_n_steps_state)
        return (self.step_name(model) if model else None), (self.step_name(state) if state else None)


def ensure_output_dir(path: str | Path) -> Path:
    """Create the output folder, with a message a user can act on when that is impossible."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--output_dir {out}: cannot create it, a file is in the way "
                        f"({next(p for p in [out, *out.parents] if p.is_file())}).") from None
    except OSError as e:
        raise UserError(f"--output_dir {out}: cannot create it ({e.strerror}).") from None
    return out


def missing_folders(path: str | Path) -> list[Path]:
    """The folders of ``path`` (itself first, then its parents) that do not exist yet."""
    missing = []
    for folder in [Path(path), *Path(path).parents]:
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created, deepest first, where they are still empty.

    A run that stops on bad input must not leave an empty output folder behind; anything with a file in it
    is kept (``rmdir`` refuses a folder that is not empty, so nothing can be lost here).
    """
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def remove_quietly(path: Path) -> None:
    """Delete an old checkpoint file or state folder; rotation must never fail a run."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def write_state(accelerator: Any, folder: Path, train_state: dict[str, Any]) -> None:
    """accelerate's save_state into a temporary folder, plus our marker, then an atomic rename.

    Every process writes its own files into the folder (its random states), so the main process alone
    clears a leftover before anyone writes, and renames only after everyone has written.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        remove_quietly(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_MARKER, "w", encoding="utf-8") as f:
            json.dump(train_state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        remove_quietly(old)
    accelerator.wait_for_everyone()


def find_resume_state(resume: str, output_dir: Path, output_name: str) -> Path:
    """The state folder to resume: a path, or ``latest`` = the newest complete one of run ``output_name`` in
    output_dir."""
    if resume != "latest":
        path = Path(resume)
        if not path.exists():
            raise UserError(f"--resume {path} does not exist; give a state folder ({{name}}-state, "
                            "{name}-stepNNNNNNNN-state, ...) or --resume latest.")
        if path.is_file():
            raise UserError(f"--resume {path} is a file; give the run's state folder (written with --save_state, "
                            "e.g. lora-state) or --resume latest. A LoRA file continues with --network_weights.")
        if not (path / STATE_MARKER).is_file():
            adapter = ""
            if (path / "adapter_config.json").is_file():  # TRL's --resume_from_checkpoint habit, or our own output
                adapter = (f" {path} is a PEFT adapter folder (adapter_config.json): a LoRA / adapter continues "
                           f"with --network_weights {path} (and --dim_from_weights for its rank and targets); "
                           "--resume takes the state folder a run writes with --save_state.")
            raise UserError(f"--resume {path}: not a complete training state folder ({STATE_MARKER} missing)."
                            + adapter)
        return path
    complete = [p for p in output_dir.glob("*-state") if (p / STATE_MARKER).is_file()]
    # this run's states only: another --output_name in the same folder is another run
    candidates = [p for p in complete if state_output_name(p, output_name) == output_name]
    if not candidates and not complete:
        raise UserError(f"--resume latest: no complete state folder in {output_dir}; "
                        "train with --save_state first, or drop --resume.")
    if not candidates:  # a renamed run (CONTRACTS.md §4: the output name may change): the folder's newest state
        chosen = max(complete, key=lambda p: read_state(p)["global_step"])
        logger.warning("--resume latest: %s holds no state of a run named '%s'; continuing run '%s' from %s, the "
                       "newest state there (give a state folder to --resume to choose another).", output_dir,
                       output_name, state_output_name(chosen), chosen.name)
        return chosen
    return max(candidates, key=lambda p: read_state(p)["global_step"])


def state_output_name(state_dir: Path, expected: str | None = None) -> str:
    """The --output_name of the run that wrote ``state_dir``: recorded in its marker; for a state written before
    it was recorded, read from the folder name (``expected`` first, since a name may end in -NNNNNN itself)."""
    recorded = read_state_quietly(state_dir).get("output_name")
    if isinstance(recorded, str):
        return recorded
    if expected is not None and re.fullmatch(rf"{re.escape(expected)}(-step\d{{8}}|-\d{{6}})?-state", state_dir.name):
        return expected
    return re.sub(r"(-step\d{8}|-\d{6})?-state$", "", state_dir.name)


def saved_loss_curve(state_dir: Path) -> Path:
    """The loss CSV of the run that wrote ``state_dir``: beside it, named after its output name."""
    return state_dir.parent / f"{state_output_name(state_dir)}_loss.csv"


STATE_KEYS = ("global_step", "epoch", "batches_done_in_epoch")


def read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--resume {folder}: unreadable {STATE_MARKER} ({e}).") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing and isinstance(state, dict) and "current_step" in state:  # sd-scripts writes a file of this name
        raise UserError(f"--resume {folder}: a state folder written by sd-scripts ({STATE_MARKER} holds only "
                        "current_epoch / current_step); its model and optimizer are saved in sd-scripts' own layout, "
                        "so the run cannot continue here. Continue the LoRA it trained with --network_weights "
                        "<its last .safetensors> (steps and optimizer start anew).")
    if missing:
        raise UserError(f"--resume {folder}: {STATE_MARKER} lacks {', '.join(missing)}; not a state folder of this "
                        "toolkit (written with --save_state).")
    return state


_NAME_OK = re.compile(r"^[^/\\\0]+$")


def check_output_name(name: str) -> str:
    if not _NAME_OK.match(name) or name in (".", ".."):
        raise UserError(f"--output_name {name!r} must be a plain file name without folders.")
    return name


def earlier_outputs(output_dir: Path, output_name: str) -> list[Path]:
    """What an earlier run named ``output_name`` left in ``output_dir``: its LoRA files (final, epoch and step,
    any format), PEFT adapter folders, state folders, loss curve and the images / texts it sampled (in
    ``sample/``, listed as ``sample/<file>``)."""
    name = re.escape(output_name)
    pattern = re.compile(rf"^{name}(-\d{{6}}|-step\d{{8}})?(-state|\.safetensors|\.ckpt|\.pt)?$"
                         rf"|^{name}_loss\.(csv|png)$")
    sample = re.compile(rf"^{name}_\d{{6}}(_\d{{2}}_\d+\.png|\.txt)$")  # library/sampling.py, text_samples.py
    if not output_dir.is_dir():
        return []
    # "mylora-240115.safetensors" may be run mylora's epoch file or the final file of a run named "mylora-240115":
    # what the file or folder records decides
    found = sorted(p for p in output_dir.iterdir() if pattern.match(p.name)
                   and recorded_output_name(p) in (None, output_name))
    samples = output_dir / SAMPLE_FOLDER
    if samples.is_dir():
        found += sorted(p for p in samples.iterdir() if sample.match(p.name) and p.is_file())
    return found


def recorded_output_name(path: Path) -> str | None:
    """The --output_name a saved file or folder records (state marker, ss_output_name), None when it says none."""
    if (path / STATE_MARKER).is_file():
        recorded = read_state_quietly(path).get("output_name")
        return recorded if isinstance(recorded, str) else None
    weights = path / "adapter_model.safetensors" if path.is_dir() else path
    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            name = (f.metadata() or {}).get("ss_output_name")
    except Exception:  # noqa: BLE001 - an unreadable file records nothing; it is listed as before
        return None
    return name if name else None


def read_state_quietly(folder: Path) -> dict[str, Any]:
    """The marker's contents as they are (any keys), {} when unreadable: for the name it records."""
    try:
        state = json.loads((folder / STATE_MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def continues_here(resume: str | None, output_dir: Path, output_name: str) -> bool:
    """Whether --resume continues the run whose files lie in ``output_dir`` (its state folder is there).

    A state from another folder continues that run, not a run of the same name that ``output_dir`` may hold."""
    if not resume:
        return False
    return find_resume_state(resume, output_dir, output_name).parent.resolve() == output_dir.resolve()


def refuse_to_replace(output_dir: Path, output_name: str, continuing: bool, overwrite: bool) -> None:
    """Stop before a run writes over an earlier run's files (a LoRA can take hours to make).

    ``continuing``: a resumed run continues the files of this folder's run (continues_here); ``--overwrite``
    says replacing them is intended.
    """
    found = [] if continuing or overwrite else earlier_outputs(output_dir, output_name)
    if found:
        listed = ", ".join(str(p.relative_to(output_dir)) for p in found[:4])
        listed += f" and {len(found) - 4} more" if len(found) > 4 else ""
        raise UserError(f"{output_dir} already holds a run named '{output_name}' ({listed}). To continue it: "
                        "--resume latest (or a state folder of it); to keep it and train another: a new "
                        "--output_name or --output_dir; to replace it: --overwrite.")


def set_aside_earlier_run(output_dir: Path, output_name: str) -> tuple[Path, int, bool] | None:
    """``--overwrite``: move the earlier run's files into ``{output_name}.replaced/`` before training.

    Left in place, its epoch/step files and states would mix with the new run's and ``--resume latest``
    could pick its state. Moved, not deleted: the replaced run is kept until the next ``--overwrite``.
    Returns the folder, how many entries moved and whether a run set aside before was deleted to make room, or
    None when there was nothing.
    """
    found = earlier_outputs(output_dir, output_name)
    if not found:
        return None
    aside = output_dir / f"{output_name}.replaced"
    deleted = aside.exists()
    if deleted:
        shutil.rmtree(aside)
    aside.mkdir()
    for path in found:
        target = aside / path.relative_to(output_dir)
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
    return aside, len(found), deleted


def free_bytes(folder: Path) -> int:
    """Free space on the file system holding ``folder`` (a function, so tests can patch it)."""
    return shutil.disk_usage(folder).free


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse a save that cannot fit, before a byte is written (a full disk mid-save corrupts)."""
    margin = 16 * 2**20
    free = free_bytes(folder)
    if free < needed + margin:
        raise UserError(f"Not enough disk space in {folder} for {what}: {needed / 2**20:.1f} MiB needed "
                        f"(plus a margin), {free / 2**20:.1f} MiB free. Free some space or choose another "
                        "--output_dir; files already written are intact.")
