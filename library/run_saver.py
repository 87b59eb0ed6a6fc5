"""Everything the loop writes: model files, state folders, rotation, resume (CONTRACTS.md §4).

One object so the loop reads ``saver.checkpoint(...)`` instead of a page of bookkeeping.
Model files go through the family (kohya file, PEFT folder); state folders through
accelerate's save_state, written atomically with a completion marker (library/checkpoint.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from library.checkpoint import (
    SavePlan,
    ensure_free_space,
    find_resume_state,
    read_state,
    remove_quietly,
    write_state,
)
from library.errors import UserError
from library.metadata import modelspec_metadata, rehash_file
from library.resume_check import check_resume_compatible
from library.train_metadata import RunInfo, minimal_training_metadata, training_metadata


class RunSaver:
    """Writes the run's outputs on the main process, after every process finished the step."""

    def __init__(self, accelerator: Any, plan: SavePlan, family: Any, network: torch.nn.Module, info: RunInfo,
                 save_dtype: torch.dtype, no_metadata: bool, resolution: tuple[int, int],
                 fingerprint: dict[str, Any], seed: int, log: Callable[[str], None]) -> None:
        self.accelerator, self.plan, self.family, self.network = accelerator, plan, family, network
        self.info, self.save_dtype, self.no_metadata, self.resolution = info, save_dtype, no_metadata, resolution
        self.fingerprint, self.seed, self.log = fingerprint, seed, log
        # LoRA file bytes; a state folder also holds fp32 weights and two optimizer moments.
        self.model_bytes = sum(t.numel() * save_dtype.itemsize for t in network.state_dict().values())

    def check_space(self, what: str, with_state: bool = False) -> None:
        """Refuse before writing when the disk cannot hold it (run on every process, before barriers)."""
        ensure_free_space(self.plan.output_dir, self.model_bytes * (4 if with_state else 1), what)

    def model(self, stem: str, epoch: int, step: int) -> Path:
        path = self.plan.model_path(stem)
        if self.accelerator.is_main_process:
            info = self.info
            meta = minimal_training_metadata(info) if self.no_metadata else training_metadata(info, epoch, step)
            # The ModelSpec keys even with --no_metadata (as sd-scripts): they say what the file is
            # (architecture, prediction type), which loaders need, and record nothing of the training.
            card = dict(info.model_card)
            meta.update(modelspec_metadata(self.family.modelspec_architecture, card.pop("title", info.output_name),
                                           self.resolution, self.family.prediction_type, **card))
            path = self.family.save_network(self.network, path, self.save_dtype, meta)
            if Path(path).suffix == ".safetensors" and not type(self.network).__module__.startswith("networks."):
                rehash_file(path)  # another package's network (LyCORIS) writes hashes of its own definition
            self.log(f"saved {path}")
        return path

    def state(self, stem: str, global_step: int, epoch: int, batches_done: int, max_train_steps: int) -> None:
        accumulation = self.accelerator.gradient_accumulation_steps
        write_state(self.accelerator, self.plan.state_path(stem),
                    {"global_step": global_step, "epoch": epoch, "batches_done_in_epoch": batches_done,
                     "gradient_accumulation_steps": accumulation, "seed": self.seed,
                     "max_train_steps": max_train_steps, "fingerprint": self.fingerprint,
                     "output_name": self.plan.output_name})

    def checkpoint(self, stem: str, name_epoch: int, global_step: int, resume_at: tuple[int, int],
                   max_train_steps: int, stale: tuple[str | None, str | None] = (None, None),
                   force_state: bool = False) -> None:
        """A model file (and state folder) named ``stem``; rotation removes the model files of ``stale[0]``
        and the state folder of ``stale[1]`` (SavePlan.stale_at_*) only afterwards."""
        with_state = self.plan.save_state or force_state
        self.check_space(stem, with_state)
        self.accelerator.wait_for_everyone()
        self.model(stem, name_epoch, global_step)
        if with_state:
            self.state(stem, global_step, *resume_at, max_train_steps)
        stale_model, stale_state = stale
        if self.accelerator.is_main_process and stale_model:
            remove_quietly(self.plan.model_path(stale_model))
            remove_quietly(self.plan.output_dir / stale_model)  # an adapter folder (LLMs: PEFT)
            for path in self.plan.older_step_saves(stale_model, states=False):  # a stop's, off the cadence
                remove_quietly(path)
        if self.accelerator.is_main_process and stale_state:
            remove_quietly(self.plan.state_path(stale_state))
            for path in self.plan.older_step_saves(stale_state, states=True):
                remove_quietly(path)

    def restore(self, resume: str, allow_changes: bool, max_train_steps: int) -> tuple[int, int, int]:
        """Load a state folder; returns (global step, epoch, batches already done in that epoch).

        ``max_train_steps``: this run's total, which may differ from the saved run's (a note says what that
        does to the learning-rate schedule)."""
        state_dir = find_resume_state(resume, self.plan.output_dir, self.plan.output_name)
        state = read_state(state_dir)
        current = json.loads(json.dumps(self.fingerprint))  # compare as stored: tuples become lists
        for line in check_resume_compatible(state.get("fingerprint"), current, allow_changes, str(state_dir)):
            self.log(f"resuming with a changed setting (--resume_allow_changes):{line}")
        try:
            self.accelerator.load_state(str(state_dir))
        except FileNotFoundError as e:
            raise UserError(f"--resume {state_dir}: the state folder is incomplete, {Path(e.filename or '?').name} "
                            "is missing; resume from another state (or train without --resume).") from None
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. tensors of another shape
            raise UserError(f"--resume {state_dir}: the state does not fit this run ({str(e).splitlines()[0]}); "
                            "network_dim, network_args and the optimizer must match the saved run.") from None
        # States are saved after whole optimizer steps, and an optimizer step's samples depend only on
        # batch x processes x accumulation (library/data/sampler.py), so the split between processes and
        # accumulation may change: skip the same steps in this run's micro-batches, and start accelerate's
        # micro-step counter (restored in the old units) at a group boundary. When the step itself holds
        # another number of samples (--resume_allow_changes), skip the samples the epoch has already seen.
        now = self.accelerator.gradient_accumulation_steps
        then = int(state.get("gradient_accumulation_steps", now))
        steps_done = state["batches_done_in_epoch"] // then
        saved = state.get("fingerprint") or {}
        step_then, step_now = (fp.get("batch_size", 1) * fp.get("processes x accumulation", 1)
                               for fp in (saved, self.fingerprint))
        if saved and step_then != step_now:
            steps_done = steps_done * step_then // step_now
        skip = steps_done * now
        self.accelerator.step = 0
        self.log(f"resumed from {state_dir}: step {state['global_step']}, epoch {state['epoch'] + 1}")
        total_then = state.get("max_train_steps")
        if isinstance(total_then, int) and total_then != max_train_steps:
            self.log(f"the saved run's total was {total_then} optimizer steps, this run's is {max_train_steps}: "
                     f"the learning-rate schedule continues at step {state['global_step']} of the new length, so "
                     "its rate may jump (a decay to the end now ends earlier or later)")
        return state["global_step"], state["epoch"], skip
