"""Train a LoRA network with kohya's arguments.

    accelerate launch train_network.py --config_file train.toml --dataset_config data.toml

parse → config → prepare_accelerator → model family + data + network → loop → save.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from math import inf
from pathlib import Path

import torch

from library import train_setup as setup
from library.accelerator import prepare_accelerator, settings_table
from library.args import build_parser, check_combinations
from library.checkpoint import (
    SavePlan,
    check_output_name,
    ensure_free_space,
    ensure_output_dir,
    find_resume_state,
    read_state,
    remove_quietly,
    write_state,
)
from library.config_file import SOURCE_DEFAULT, loggable_config, parse_args_with_sources, write_output_config
from library.data.image_data import move_batch
from library.errors import UserError
from library.families import DataRequest, detect_model_type, load_family
from library.loss_curve import write_loss_curve
from library.metadata import modelspec_metadata
from library.optim import create_optimizer, create_scheduler, warmup_steps
from library.resume_check import check_resume_compatible, training_fingerprint
from library.sampling import SampleSchedule, TrainingSamples, load_prompts
from library.signals import Interrupted, StopRequest, stop_when_launcher_dies
from library.train_metadata import RunInfo, minimal_training_metadata, training_metadata


def train(args: argparse.Namespace, sources: dict[str, str]) -> Path:
    """Run one training; returns the path of the final LoRA file."""
    with contextlib.ExitStack() as stack:
        return _train(args, sources, stack)


def _train(args: argparse.Namespace, sources: dict[str, str], stack: contextlib.ExitStack) -> Path:
    acc_settings, resolved = setup.accelerator_settings(args, sources)
    accelerator = prepare_accelerator(acc_settings)
    main = accelerator.is_main_process
    log = accelerator.print
    log("Effective accelerate settings:\n" + settings_table(
        {**resolved, "num_processes": setup.Setting(accelerator.num_processes, "accelerate launch"
                                                    if accelerator.num_processes > 1 else "single process")}))

    seed = args.seed if args.seed is not None else int(time.time()) % (2**31)
    torch.manual_seed(seed)
    output_dir = ensure_output_dir(args.output_dir)
    output_name = check_output_name(args.output_name or "last")
    # Read now, so that a bad prompt file stops the run before the model loads.
    prompts = load_prompts(args.sample_prompts, args.sample_sampler) if args.sample_prompts else []

    # --- model family ------------------------------------------------------------------------
    model_type = args.model_type if args.model_type != "auto" else detect_model_type(args.pretrained_model_name_or_path)
    weight_dtype = setup.weight_dtype_for(acc_settings.mixed_precision)
    family = load_family(model_type, args.pretrained_model_name_or_path, vae_path=args.vae,
                         tokenizer_path=args.tokenizer_cache_dir, v2=args.v2 or None,
                         v_parameterization=args.v_parameterization or None,
                         noise=setup.noise_settings(args), seed=seed, clip_skip=args.clip_skip,
                         weight_dtype=weight_dtype, load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit)
    # A family's own network defaults (LLMs: dim 16, alpha 16) replace argparse defaults, never a user's value.
    for key, value in getattr(family, "network_defaults", {}).items():
        if sources.get(key) == SOURCE_DEFAULT:
            setattr(args, key, value)
    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = not args.network_train_unet_only
    vae_dtype = torch.float32 if args.no_half_vae else weight_dtype
    family.prepare(accelerator.device, weight_dtype, train_text_encoder, args.gradient_checkpointing, vae_dtype)

    # --- data ---------------------------------------------------------------------------------
    data = family.build_data(DataRequest(
        dataset_config=args.dataset_config, defaults=setup.dataset_defaults(args), seed=seed,
        on_bad_image=args.on_bad_image, num_processes=accelerator.num_processes, rank=accelerator.process_index,
        # On a CPU device, loader processes would only take cores from the step.
        num_workers=args.max_data_loader_n_workers if accelerator.device.type != "cpu" else 0,
        persistent_workers=args.persistent_data_loader_workers, cache_latents=args.cache_latents,
        cache_latents_to_disk=args.cache_latents_to_disk, barrier=accelerator.wait_for_everyone,
        vae_batch_size=args.vae_batch_size, device=accelerator.device,
        cache_text_encoder_outputs=args.cache_text_encoder_outputs))
    plan = setup.plan_steps(len(data.sampler), acc_settings.gradient_accumulation_steps,
                            args.max_train_steps, args.max_train_epochs)

    # --- network and optimizer ----------------------------------------------------------------
    network_module = setup.import_network_module(args.network_module)
    net_kwargs = setup.network_args_dict(args.network_args)
    vae, text_encoder, unet = family.network_inputs()
    if args.network_weights and args.dim_from_weights:
        network, _ = network_module.create_network_from_weights(1.0, args.network_weights, vae, text_encoder,
                                                                unet, neuron_dropout=args.network_dropout,
                                                                **net_kwargs)
    else:
        network = network_module.create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoder,
                                                unet, neuron_dropout=args.network_dropout, **net_kwargs)
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    if args.network_weights:  # continue training from a LoRA file (its shapes must match)
        network.load_weights(args.network_weights)
        log(f"loaded LoRA weights from {args.network_weights}")
    if args.full_bf16 or args.full_fp16:
        network.to(torch.bfloat16 if args.full_bf16 else torch.float16)
    network.prepare_grad_etc(text_encoder, unet)
    samples = TrainingSamples(prompts, SampleSchedule(args.sample_every_n_steps, args.sample_every_n_epochs,
                                                      args.sample_at_first),
                              accelerator=accelerator, family=family, network=network, folder=output_dir / "sample",
                              output_name=output_name, seed=seed, log=log)
    params, _ = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    optimizer = create_optimizer(params, args.optimizer_type, args.learning_rate, args.optimizer_args)
    lr_scheduler = create_scheduler(optimizer, args.lr_scheduler, plan.max_train_steps, args.lr_warmup_steps,
                                    args.lr_scheduler_num_cycles, args.lr_scheduler_power)
    # The loss runs inside one module that owns only the network's parameters, so DDP (several
    # processes) sees the forward it wraps and syncs exactly the LoRA gradients.
    model, optimizer, lr_scheduler = accelerator.prepare(setup.TrainingModule(network, family), optimizer,
                                                         lr_scheduler)

    save_dtype = setup.save_dtype_for(args.save_precision, torch.float32)
    saves = SavePlan(output_dir, output_name, "." + args.save_model_as, args.save_every_n_epochs,
                     args.save_every_n_steps, args.save_last_n_epochs, args.save_last_n_steps,
                     args.save_state, args.save_state_on_train_end)
    info = RunInfo(
        network_module=args.network_module, network_dim=getattr(network, "lora_dim",
                                                                 args.network_dim or 4),
        network_alpha=args.network_alpha, network_args=net_kwargs, base_model_version=family.base_model_version,
        output_name=output_name, learning_rate=args.learning_rate, unet_lr=args.unet_lr,
        text_encoder_lr=args.text_encoder_lr, num_train_images=data.num_train_images,
        num_reg_images=data.num_reg_images, num_batches_per_epoch=plan.batches_per_epoch,
        num_epochs=plan.num_epochs, max_train_steps=plan.max_train_steps, lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=warmup_steps(args.lr_warmup_steps, plan.max_train_steps),
        optimizer=type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__,
        mixed_precision=acc_settings.mixed_precision, seed=seed,
        gradient_accumulation_steps=acc_settings.gradient_accumulation_steps,
        total_batch_size=data.batch_size * accelerator.num_processes * acc_settings.gradient_accumulation_steps,
        noise_offset=args.noise_offset, min_snr_gamma=args.min_snr_gamma, clip_skip=args.clip_skip,
        prior_loss_weight=args.prior_loss_weight, v2=family.v2,
        v_parameterization=family.prediction_type == "v", resolution=data.resolution,
        model_name=Path(args.pretrained_model_name_or_path).name, training_comment=args.training_comment,
        datasets=data.metadata(), tag_frequency=data.tag_frequency(),
    )

    def save_model(stem: str, epoch: int, step: int) -> Path:
        """Main process only, after every process has finished the step."""
        path = saves.model_path(stem)
        if main:
            meta = minimal_training_metadata(info) if args.no_metadata else training_metadata(info, epoch, step)
            if not args.no_metadata:
                meta.update(modelspec_metadata(family.modelspec_architecture, output_name, data.resolution,
                                               family.prediction_type))
            path = family.save_network(network, path, save_dtype, meta)
            log(f"saved {path}")
        return path

    # LoRA file bytes; a state folder also holds fp32 weights and two optimizer moments.
    model_bytes = sum(t.numel() * save_dtype.itemsize for t in network.state_dict().values())
    ensure_free_space(output_dir, model_bytes, "the LoRA files")

    # --- resume -------------------------------------------------------------------------------
    fingerprint = training_fingerprint(
        args, seed=seed, batch_size=data.batch_size, num_processes=accelerator.num_processes,
        accumulation=acc_settings.gradient_accumulation_steps, data=data.content_digest(), datasets=data.metadata())
    global_step, start_epoch, skip_batches = 0, 0, 0
    if args.resume:
        state_dir = find_resume_state(args.resume, output_dir)
        state = read_state(state_dir)
        for line in check_resume_compatible(state.get("fingerprint"), json.loads(json.dumps(fingerprint)),
                                            args.resume_allow_changes, str(state_dir)):
            log(f"resuming with a changed setting (--resume_allow_changes):{line}")
        accelerator.load_state(str(state_dir))
        global_step, start_epoch = state["global_step"], state["epoch"]
        skip_batches = state["batches_done_in_epoch"]
        log(f"resumed from {state_dir}: step {global_step}, epoch {start_epoch + 1}")

    def save_state(stem: str, epoch: int, batches_done: int) -> None:
        write_state(accelerator, saves.state_path(stem),
                    {"global_step": global_step, "epoch": epoch, "batches_done_in_epoch": batches_done,
                     "seed": seed, "max_train_steps": plan.max_train_steps, "fingerprint": fingerprint})

    if main:
        accelerator.init_trackers(args.log_tracker_name or "network_train",
                                  config=loggable_config(args) if args.log_config else {},
                                  init_kwargs={"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {})
    log(data.summary() + "\n" + setup.describe_run({
        "global batch": f"{info.total_batch_size} = {data.batch_size} per process x {accelerator.num_processes} "
                        f"processes x {acc_settings.gradient_accumulation_steps} accumulation",
        "steps per epoch": plan.steps_per_epoch, "epochs": plan.num_epochs,
        "total optimizer steps": plan.max_train_steps, "starting at step": global_step}))

    # --- the loop -----------------------------------------------------------------------------
    from tqdm.auto import tqdm

    def checkpoint(stem: str, name_epoch: int, resume_at: tuple[int, int], stale: str | None,
                   force_state: bool = False) -> None:
        """A model file (and state folder) named ``stem``; rotation removes ``stale`` afterwards."""
        with_state = saves.save_state or force_state
        ensure_free_space(output_dir, model_bytes * (4 if with_state else 1), f"{stem}")
        accelerator.wait_for_everyone()
        save_model(stem, name_epoch, global_step)
        if with_state:
            save_state(stem, *resume_at)
        if main and stale:
            remove_quietly(saves.model_path(stale))
            remove_quietly(saves.model_path(stale).with_suffix(""))  # an adapter folder (LLMs: PEFT format)
            remove_quietly(saves.state_path(stale))

    validate_epochs = args.validate_every_n_epochs or (1 if data.validation_loader and not
                                                        args.validate_every_n_steps else None)

    def validate() -> None:
        """Mean loss over the held-out samples with fixed draws (epoch-0 keys), so values compare over time."""
        network.eval()
        with torch.no_grad(), accelerator.autocast():
            losses = [family.loss(move_batch(b, accelerator.device), 0).item()
                      for b in itertools.islice(data.validation_loader, args.max_validation_steps)]
        network.train()
        value = sum(losses) / max(len(losses), 1)
        accelerator.log({"loss/validation": value}, step=global_step)
        log(f"validation loss at step {global_step}: {value:.6f}")

    resume_point = (start_epoch, skip_batches)
    progress = tqdm(total=plan.max_train_steps, initial=global_step, disable=not main, desc="steps")
    curve: list[tuple[int, float, float]] = []
    stop = stack.enter_context(StopRequest())
    stop_when_launcher_dies()
    samples.maybe_sample(global_step, first=True)
    for epoch in range(start_epoch, plan.num_epochs):
        network.on_epoch_start(text_encoder, unet)
        data.sampler.set_epoch(epoch, skip_batches)
        batches_done = skip_batches
        skip_batches = 0
        meter = setup.Throughput()
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
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # The norm of the synced gradients is the same on every process, so a NaN/inf
                    # stops all of them at the same step, before the optimizer applies it.
                    norm = accelerator.clip_grad_norm_(network.get_trainable_params(), args.max_grad_norm or inf)
                    if not torch.isfinite(norm):
                        raise UserError(f"The loss or its gradients became non-finite at step {global_step + 1} "
                                        f"(loss {loss.item():.4g}): training stopped before a bad file was written; "
                                        "the last saved files are intact. Lower the learning rate, or use "
                                        "--no_half_vae / bf16 instead of fp16.")
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            step_loss = loss.detach().item()  # a device sync, once per optimizer step
            lr = lr_scheduler.get_last_lr()[0]
            curve.append((global_step, step_loss, lr))
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss/current": step_loss, "lr/unet": lr, "epoch": epoch + 1,
                             **meter.rates(accelerator.num_processes)}, step=global_step)
            if saves.due_at_step(global_step) and global_step < plan.max_train_steps:
                old = saves.stale_step(global_step)
                checkpoint(saves.step_name(global_step), epoch + 1, (epoch, batches_done),
                           saves.step_name(old) if old else None)
            if data.validation_loader and args.validate_every_n_steps and \
                    global_step % args.validate_every_n_steps == 0:
                validate()
            samples.maybe_sample(global_step)
            if global_step >= plan.max_train_steps:
                break
            if stop.should_stop(accelerator.num_processes, accelerator.device):
                stem = saves.step_name(global_step)
                checkpoint(stem, epoch + 1, (epoch, batches_done), None, force_state=True)
                raise Interrupted(stop.exit_code, f"Stopped by signal {stop.signum} after step {global_step}; "
                                  f"saved {saves.state_path(stem)}. Continue with the same command plus "
                                  f"--resume {saves.state_path(stem)} (or --resume latest).")
        else:  # the epoch ran to its end
            resume_point = (epoch + 1, 0)
            if data.validation_loader and validate_epochs and (epoch + 1) % validate_epochs == 0:
                validate()
            if saves.due_at_epoch(epoch + 1, plan.num_epochs):
                old = saves.stale_epoch(epoch + 1)
                checkpoint(saves.epoch_name(epoch + 1), epoch + 1, resume_point,
                           saves.epoch_name(old) if old else None)
            samples.maybe_sample(global_step, epoch=epoch + 1)
            continue
        resume_point = (epoch, batches_done)
        break
    progress.close()
    samples.maybe_sample(global_step, epoch=plan.num_epochs)  # the last epoch also ends at max_train_steps

    # --- final outputs ------------------------------------------------------------------------
    ensure_free_space(output_dir, model_bytes, f"{output_name}{saves.extension}")
    accelerator.wait_for_everyone()
    final = save_model(output_name, plan.num_epochs, global_step)
    if saves.save_state or saves.save_state_on_train_end:
        save_state(output_name, *resume_point)
    if main and curve:
        csv_path, png_path = write_loss_curve(curve, output_dir / f"{output_name}_loss")
        log(f"loss curve: {png_path} (values in {csv_path})")
    accelerator.end_training()
    log(f"LoRA written to {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, sources = parse_args_with_sources(parser, argv)
        if args.output_config:
            path = write_output_config(parser, args)
            print(f"wrote the effective non-default arguments to {path}")
            return 0
        check_combinations(args, build_parser().parse_args([]))
        train(args, sources)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
