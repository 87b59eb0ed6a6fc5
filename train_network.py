"""Train a LoRA network with kohya's arguments.

    accelerate launch train_network.py --config_file train.toml --dataset_config data.toml

parse → config → prepare_accelerator → model family + data + network → loop → save.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import signal
import sys
from math import inf
from pathlib import Path

import torch
from tqdm.auto import tqdm

from library import model_setup as loading
from library import train_setup as setup
from library.accelerator import prepare_accelerator, settings_table
from library.arg_checks import check_combinations, no_op_notes
from library.args import build_parser
from library.checkpoint import (
    SAMPLE_FOLDER,
    SavePlan,
    check_output_name,
    continues_here,
    ensure_output_dir,
    find_resume_state,
    missing_folders,
    refuse_to_replace,
    remove_if_empty,
    saved_loss_curve,
    set_aside_earlier_run,
)
from library.config_file import loggable_config, parse_args_with_sources, write_output_config
from library.data.image_data import move_batch
from library.error_report import report_error, should_print
from library.errors import UserError
from library.fp8 import store_in_fp8
from library.loss_curve import read_loss_curve, write_loss_curve
from library.optim import create_optimizer, create_scheduler
from library.regional_compile import compile_blocks
from library.resume_check import dataset_settings, training_fingerprint
from library.run_saver import RunSaver
from library.sampling import PromptSource, SampleSchedule, TrainingSamples
from library.sd_scripts_args import epoch_cadence
from library.signals import Interrupted, StopRequest, Terminated, stop_when_launcher_dies, terminate_as_exception
from library.step_controls import TextEncoderStop, max_norm_logs

# From its default 2**16 the fp16 loss scaler reaches 2**-14 after 30 halvings: gradients that still overflow
# there are not a scaling problem.
MAX_SCALER_SKIPS = 30


def train(args: argparse.Namespace, sources: dict[str, str]) -> Path:
    """Run one training; returns the path of the final LoRA file."""
    created = missing_folders(args.output_dir) if args.output_dir else []
    with contextlib.ExitStack() as stack:
        try:
            return _train(args, sources, stack)
        except BaseException:
            remove_if_empty(created)  # a run that stopped before writing anything leaves no empty folder
            raise


def _train(args: argparse.Namespace, sources: dict[str, str], stack: contextlib.ExitStack) -> Path:
    acc_settings, resolved = setup.accelerator_settings(args, sources)
    accelerator = prepare_accelerator(acc_settings)
    main, log, processes = accelerator.is_main_process, accelerator.print, accelerator.num_processes
    accumulation = acc_settings.gradient_accumulation_steps
    log("Effective accelerate settings:\n" + settings_table({**resolved, "num_processes": setup.Setting(
        processes, "accelerate launch" if processes > 1 else "single process")}))
    for note in no_op_notes(vars(args)):
        log(note)
    output_dir = ensure_output_dir(args.output_dir)
    output_name = check_output_name(args.output_name or "last")
    continuing = continues_here(args.resume, output_dir, output_name)  # a state from elsewhere: another run's
    refuse_to_replace(output_dir, output_name, continuing, args.overwrite)
    seed = setup.run_seed(args.seed, args.resume, output_dir, output_name, accelerator)
    torch.manual_seed(seed)
    # Read now, so that a bad prompt file stops the run before the model loads; without a cadence nothing is
    # sampled, so the file is not read at all (as sd-scripts; the kohya_ss GUI always names one).
    sampling = args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first
    prompt_source = (PromptSource(Path(args.sample_prompts), args.sample_sampler, args.zero_terminal_snr)
                     if args.sample_prompts and sampling else None)
    if args.sample_prompts and not sampling:
        log("note: --sample_prompts samples nothing without --sample_every_n_steps, --sample_every_n_epochs "
            "or --sample_at_first; the prompt file is not read")
    prompts = prompt_source.load() if prompt_source else []

    # --- model, data, network, optimizer -------------------------------------------------------
    choice = loading.choose_model(args, sources)
    # the data is read now (images and captions, or tokenised rows), so that a bad file stops the run before the
    # model loads
    request = loading.scan_data(choice.model_type, loading.data_request(args, accelerator, seed, sources),
                                args.pretrained_model_name_or_path, args.tokenizer_cache_dir)
    family = loading.build_family(args, sources, acc_settings.mixed_precision, seed, choice)
    weight_dtype = setup.weight_dtype_for(acc_settings.mixed_precision)
    family.prepare(accelerator.device, weight_dtype, not args.network_train_unet_only, args.gradient_checkpointing,
                   torch.float32 if args.no_half_vae else weight_dtype)
    if args.fp8_base:  # before the network wraps the modules; the text encoders keep their dtype
        n = store_in_fp8(family.network_inputs()[2], weight_dtype)  # computes in the model's own dtype
        log(f"--fp8_base: {n} frozen base layers stored in float8")
    data = loading.build_data(args, family, request, seed, sources)
    plan = setup.plan_steps(len(data.sampler), accumulation, args.max_train_steps, args.max_train_epochs)
    if args.max_train_epochs and sources.get("max_train_steps", "default") != "default":  # given, and set aside
        log(f"--max_train_epochs {args.max_train_epochs} sets the length, {plan.max_train_steps} optimizer steps; "
            f"--max_train_steps {args.max_train_steps} is not used (as in sd-scripts)")
    if args.save_n_epoch_ratio and args.save_every_n_epochs is None:  # the epoch count is known only now
        args.save_every_n_epochs = epoch_cadence(args.save_n_epoch_ratio, plan.num_epochs)
    network, net_kwargs = setup.build_network(args, family, log)
    params, lr_names = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    optimizer = create_optimizer(params, args.optimizer_type, args.learning_rate, args.optimizer_args)
    lr_scheduler = create_scheduler(optimizer, args.lr_scheduler, plan.max_train_steps, args.lr_warmup_steps,
                                    args.lr_scheduler_num_cycles, args.lr_scheduler_power, args.lr_scheduler_type,
                                    args.lr_scheduler_args, min_lr_ratio=args.lr_scheduler_min_lr_ratio,
                                    decay_steps=args.lr_decay_steps or 0, timescale=args.lr_scheduler_timescale)
    compiled, recompile_limit = compile_blocks(family.network_inputs()[2], accelerator)
    if compiled:
        log(f"torch.compile: {compiled} repeated blocks compiled one by one (regional compilation), "
            f"up to {recompile_limit} graphs per block class")
    # The loss runs inside one module that owns only the network's parameters, so DDP (several
    # processes) sees the forward it wraps and syncs exactly the LoRA gradients.
    model, optimizer = accelerator.prepare(setup.TrainingModule(network, family), optimizer)
    # Not prepared: accelerate would step it once per process at each optimizer step (2 GPUs: the warmup
    # and decay twice as fast). The loop steps it once per optimizer step; the state still saves it.
    accelerator.register_for_checkpointing(lr_scheduler)
    samples = TrainingSamples(prompt_source, SampleSchedule(args.sample_every_n_steps, args.sample_every_n_epochs,
                                                            args.sample_at_first),
                              accelerator=accelerator, family=family, network=network, prompts=prompts,
                              folder=output_dir / SAMPLE_FOLDER, output_name=output_name, seed=seed, log=log)

    # --- saving and resuming ------------------------------------------------------------------
    saves = SavePlan(output_dir, output_name, "." + args.save_model_as, args.save_every_n_epochs,
                     args.save_every_n_steps, args.save_last_n_epochs, args.save_last_n_steps,
                     args.save_state, args.save_state_on_train_end, args.save_last_n_epochs_state,
                     args.save_last_n_steps_state)
    info = setup.run_info(args, network=network, family=family, data=data, plan=plan, optimizer=optimizer,
                          mixed_precision=acc_settings.mixed_precision, accumulation=accumulation,
                          num_processes=processes, seed=seed, output_name=output_name, net_kwargs=net_kwargs)
    fingerprint = training_fingerprint(args, seed=seed, batch_size=data.batch_size, num_processes=processes,
                                       accumulation=accumulation, data=data.content_digest(),
                                       datasets=data.metadata(),
                                       settings=dataset_settings(d.config for d in data.datasets))
    saver = RunSaver(accelerator, saves, family, network, info, setup.save_dtype_for(args.save_precision,
                     torch.float32), args.no_metadata, data.resolution, fingerprint, seed, log)
    saver.check_space("the LoRA files")
    global_step, start_epoch, skip_batches = 0, 0, 0
    if processes > 1:  # LoRA's own dropouts draw from the global generator: one stream per process, not one mask
        torch.manual_seed(seed + accelerator.process_index)  # for all (a resume restores each process's state)
    if args.resume:
        global_step, start_epoch, skip_batches = saver.restore(args.resume, args.resume_allow_changes,
                                                               plan.max_train_steps)
        plan = plan.resumed(start_epoch, skip_batches // accumulation, global_step)
    te_stop = TextEncoderStop(args.stop_text_encoder_training, network, family, processes, log)
    te_stop.update(global_step)  # before the first step: 0 means never, a resumed run may be past it
    if args.overwrite and not continuing:  # only now: a run that fails while loading leaves the earlier one be
        aside = set_aside_earlier_run(output_dir, output_name) if main else None
        if aside:
            deleted = " (the run set aside there by an earlier --overwrite was deleted)" if aside[2] else ""
            log(f"--overwrite: the earlier run's {aside[1]} files and folders moved to {aside[0]}{deleted}")
        accelerator.wait_for_everyone()

    if main:
        accelerator.init_trackers(args.log_tracker_name or "network_train",
                                  config=loggable_config(args, resolved) if args.log_config else {},
                                  init_kwargs=acc_settings.tracker_init_kwargs)
    log(data.summary() + "\n" + setup.describe_run({
        "global batch": f"{info.total_batch_size} = {data.batch_size} per process x {processes} processes x "
                        f"{accumulation} accumulation",
        "steps per epoch": plan.steps_per_epoch, "epochs": plan.num_epochs,
        "total optimizer steps": plan.max_train_steps, "starting at step": global_step}))
    validate_epochs = args.validate_every_n_epochs or (1 if not args.validate_every_n_steps else None)

    def validate() -> None:
        value = setup.validation_loss(family, network, data.validation_loader, accelerator, args.max_validation_steps)
        accelerator.log({"loss/validation": value}, step=global_step)
        log(f"validation loss at step {global_step}: {value:.6f}")

    def checkpoint(stem: str, name_epoch: int, resume_at: tuple[int, int],
                   stale: tuple[str | None, str | None] = (None, None), force_state: bool = False) -> None:
        saver.checkpoint(stem, name_epoch, global_step, resume_at, plan.max_train_steps, stale, force_state)
        if main and curve:  # the curve so far, so a killed run keeps it too
            write_loss_curve(curve, output_dir / f"{output_name}_loss")

    # --- the loop -----------------------------------------------------------------------------
    progress = tqdm(total=plan.max_train_steps, initial=global_step, disable=not main, desc="steps")
    # the loss curve continues the saved one on resume, so no earlier step disappears from it
    # (the saved run's own CSV, which may lie in another --output_dir or carry another --output_name)
    curve = read_loss_curve(saved_loss_curve(find_resume_state(args.resume, output_dir, output_name)),
                            up_to=global_step) if args.resume else []
    stop = stack.enter_context(StopRequest())
    stop_when_launcher_dies()
    resume_point = (start_epoch, skip_batches)
    overflows = 0  # optimizer steps the fp16 loss scaler skipped in a row

    def log_epoch_loss(losses: list[float], step: int) -> None:
        # sd-scripts logs it at step epoch + 1, behind the steps already logged, which wandb drops
        if losses:
            accelerator.log({"loss/epoch": sum(losses) / len(losses)}, step=step)

    samples.maybe_sample(global_step, first=True)
    epochs = range(start_epoch, plan.num_epochs)
    if global_step >= plan.max_train_steps:  # a resumed state at (or past) the total: not one step more
        log(f"The resumed state is at step {global_step}, which reaches this run's {plan.max_train_steps} optimizer "
            "steps: nothing left to train; the final files are written.")
        epochs = range(0)
    for epoch in epochs:
        network.on_epoch_start(*family.network_inputs()[1:])
        data.sampler.set_epoch(epoch, skip_batches)
        batches_done, skip_batches = skip_batches, 0
        # text: resolution is (max_seq_length, 1), so the unit is the most label tokens of a micro-batch
        meter, tokens = setup.Throughput(), setup.TokenWeighting(data.batch_size * data.resolution[0])
        step_losses: list[torch.Tensor] = []  # (loss x weight, weight) of each micro-batch of this optimizer step
        # each optimizer step's loss in this epoch; a run resumed inside it has the earlier ones in its curve
        epoch_losses = [row[1] for row in curve if row[0] > epoch * plan.steps_per_epoch] if epoch == start_epoch \
            else []
        for batch in data.loader:
            batches_done += 1
            batch = move_batch(batch, accelerator.device)
            meter.add(batch)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    try:
                        loss = model(batch, epoch)
                    except UserError as e:  # e.g. NaN latents: name the images of this batch
                        raise e.with_paths(batch["image_paths"]) if hasattr(e, "with_paths") else e from None
                # Text batches: weight by their loss tokens, so the step's gradient is the mean over every
                # token of all micro-batches and processes (not a mean of means; see TokenWeighting).
                accelerator.backward(tokens.weigh(loss, batch))
                if accelerator.sync_gradients:
                    te_stop.drop_gradients()  # (several processes) after --stop_text_encoder_training
                    tokens.normalise(network.get_trainable_params(), accelerator, accumulation)
                    # The norm of the synced gradients is the same on every process, so a NaN/inf
                    # stops all of them at the same step, before the optimizer applies it.
                    norm = accelerator.clip_grad_norm_(network.get_trainable_params(), args.max_grad_norm or inf)
                    # fp16: the loss scaler starts high on purpose; an overflow skips the step and lowers the
                    # scale. Only a non-finite loss, or a scaler that keeps overflowing, is a real failure.
                    scaler_skips = accelerator.scaler is not None and torch.isfinite(loss).item() and \
                        overflows < MAX_SCALER_SKIPS
                    if not torch.isfinite(norm) and not scaler_skips:
                        raise UserError(f"The loss or its gradients became non-finite at step {global_step + 1} "
                                        f"(loss {loss.item():.4g}): training stopped before a bad file was written; "
                                        "the last saved files are intact. Lower the learning rate, or use "
                                        "--no_half_vae / bf16 instead of fp16.")
                optimizer.step()
                if accelerator.sync_gradients:
                    overflows = overflows + 1 if optimizer.step_was_skipped else 0
                if accelerator.sync_gradients and not optimizer.step_was_skipped:
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            # text: weighted by label tokens, as the gradient is; images: each micro-batch alike
            count = batch.get("num_label_tokens")
            weight = loss.new_tensor(1.0 if count is None else float(count), dtype=torch.float)
            step_losses.append(torch.stack([loss.detach().float() * weight, weight]))
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            te_stop.update(global_step)
            norm_logs = max_norm_logs(network, args.scale_weight_norms, accelerator.device)
            step_sum, step_losses = torch.stack(step_losses).sum(0), []  # the whole step, not its last part
            if processes > 1:  # over all processes, not rank 0's share alone
                step_sum = accelerator.reduce(step_sum, reduction="sum")
            step_loss = (step_sum[0] / step_sum[1].clamp_min(1e-12)).item()  # a device sync, once per optimizer step
            lr, lr_logs = setup.learning_rates(lr_scheduler.get_last_lr(), lr_names)
            curve.append((global_step, step_loss, lr))
            epoch_losses.append(step_loss)
            # sd-scripts' loss/average: the mean over the last epoch's worth of steps
            average = sum(row[1] for row in curve[-plan.steps_per_epoch:]) / min(len(curve), plan.steps_per_epoch)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", avr_loss=f"{average:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss/current": step_loss, "loss/average": average, **lr_logs, "epoch": epoch + 1,
                             **meter.rates(processes), **norm_logs}, step=global_step)
            if saves.due_at_step(global_step) and global_step < plan.max_train_steps:
                checkpoint(saves.step_name(global_step), epoch + 1, (epoch, batches_done),
                           saves.stale_at_step(global_step))
            if data.validation_loader and args.validate_every_n_steps and \
                    global_step % args.validate_every_n_steps == 0:
                validate()
            samples.maybe_sample(global_step)
            if global_step >= plan.max_train_steps:
                break
            if stop.should_stop(processes, accelerator.device):
                stem = saves.step_name(global_step)
                checkpoint(stem, epoch + 1, (epoch, batches_done), force_state=True)
                state = shlex.quote(str(saves.state_path(stem)))  # pasted into a shell as it is printed
                raise Interrupted(stop.exit_code, f"Stopped by signal {stop.signum} after step {global_step}; "
                                  f"saved {state}. Continue with the same command plus --resume {state} (or "
                                  "--resume latest).")
        else:  # the epoch ran to its end
            log_epoch_loss(epoch_losses, global_step)
            resume_point = (epoch + 1, 0)
            if data.validation_loader and validate_epochs and (epoch + 1) % validate_epochs == 0:
                validate()
            if saves.due_at_epoch(epoch + 1, plan.num_epochs):
                checkpoint(saves.epoch_name(epoch + 1), epoch + 1, resume_point, saves.stale_at_epoch(epoch + 1))
            samples.maybe_sample(global_step, epoch=epoch + 1)
            continue
        log_epoch_loss(epoch_losses, global_step)  # the steps it had when max_train_steps ended it
        resume_point = (epoch, batches_done)
        break
    progress.close()
    samples.maybe_sample(global_step, epoch=plan.num_epochs)  # the last epoch also ends at max_train_steps

    # --- final outputs ------------------------------------------------------------------------
    saver.check_space(f"{output_name}{saves.extension}")
    accelerator.wait_for_everyone()
    final = saver.model(output_name, plan.num_epochs, global_step)
    if saves.save_state or saves.save_state_on_train_end:
        saver.state(output_name, global_step, *resume_point, plan.max_train_steps)
    if main and curve:
        csv_path, png_path = write_loss_curve(curve, output_dir / f"{output_name}_loss")
        log(f"loss curve: {png_path} (values in {csv_path})")
    accelerator.end_training()
    log(f"LoRA written to {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    # --console_log_level sets the root logger for this run only (several runs may share a process: tests, notebooks)
    root = logging.getLogger()
    saved_logging = (root.level, list(root.handlers))
    try:
        return _main(argv)
    finally:
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, sources = parse_args_with_sources(parser, argv)
        if args.output_config:
            path = write_output_config(parser, args)
            print(f"wrote the effective non-default arguments to {path}")
            return 0
        check_combinations(args, build_parser().parse_args([]), sources)
        with terminate_as_exception():
            train(args, sources)
    except UserError as e:
        report_error(e)  # once per machine when every process of a launch hits the same error
        return 2
    except Interrupted as e:
        if should_print(str(e)):  # every process of a launch stops with the same line: once per machine
            print(str(e), file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, Terminated) as e:  # outside the loop's step-and-save handling (loading, saving)
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"Stopped by {signal.Signals(signum).name} before a step could finish and save; files written "
              "before it are complete (every write is atomic).", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
