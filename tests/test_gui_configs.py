"""kohya_ss GUI exports and sd-scripts tutorial configs: the keys and flags they hold that are not this toolkit's own
(library/sd_scripts_args.py), and --dataset_config next to the folder options."""

from __future__ import annotations

import argparse
import logging

import pytest
import toml

from library.arg_checks import check_combinations, check_data_sources, no_op_notes
from library.args import build_parser
from library.config_file import loggable_config, parse_args_with_sources
from library.errors import UserError
from library.sd_scripts_args import GUI_ONLY_KEYS, SD_SCRIPTS_ARGS

BASE = ["--output_dir", "o", "--pretrained_model_name_or_path", "m"]

# As kohya_ss GUI v25.0 (lora_gui.py train_model) writes it: every export holds epoch and noise_offset_type.
GUI_V25 = {
    "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "caption_extension": ".txt",
    "clip_skip": 1, "dynamo_backend": "no", "enable_bucket": True, "epoch": 10, "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True, "huber_c": 0.1, "huber_schedule": "snr", "keep_tokens": 1,
    "learning_rate": 0.0001, "logging_dir": "log", "loss_type": "l2", "lr_scheduler": "cosine",
    "lr_scheduler_args": [], "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "lr_warmup_steps": 1,
    "max_bucket_reso": 2048, "max_data_loader_n_workers": 0, "max_grad_norm": 1, "max_timestep": 1000,
    "max_token_length": 75, "max_train_steps": 400, "min_bucket_reso": 256, "mixed_precision": "no",
    "network_alpha": 1, "network_args": [], "network_dim": 8, "network_module": "networks.lora",
    "noise_offset_type": "Original", "optimizer_type": "AdamW8bit", "output_dir": "model", "output_name": "lora",
    "persistent_data_loader_workers": 1, "pretrained_model_name_or_path": "m", "prior_loss_weight": 1,
    "resolution": "512,512", "sample_prompts": "model/sample/prompt.txt", "sample_sampler": "euler_a",
    "save_every_n_epochs": 1, "save_model_as": "safetensors", "save_precision": "fp16", "sdpa": True,
    "seed": 1234, "shuffle_caption": True, "text_encoder_lr": [5e-5, 5e-5], "train_batch_size": 1,
    "train_data_dir": "img", "unet_lr": 0.0001, "wandb_run_name": "lora", "lowvram": True,
}


def _parse(argv):
    return parse_args_with_sources(build_parser(), argv)


def _checked(argv):
    args, sources = _parse(argv)
    check_combinations(args, build_parser().parse_args([]), sources)
    return args


def _config(tmp_path, values, name="gui.toml"):
    path = tmp_path / name
    path.write_text(toml.dumps(values))
    return ["--config_file", str(path)]


def test_a_gui_export_is_accepted_and_its_own_keys_are_named_once(tmp_path):
    args = _checked(_config(tmp_path, GUI_V25))
    assert args.persistent_data_loader_workers is True and args.max_train_steps == 400
    assert not hasattr(args, "epoch") and not hasattr(args, "noise_offset_type")
    notes = [n for n in no_op_notes(vars(args)) if "GUI" in n]
    assert len(notes) == 1 and notes[0].startswith("gui.toml: kohya_ss GUI keys ignored")
    assert "epoch = 10" in notes[0] and "max_train_epochs" in notes[0] and "noise_offset_type = 'Original'" in notes[0]
    assert "lowvram = True" in notes[0]
    assert "_config_file_ignored" not in loggable_config(args)


def test_gui_keys_are_config_file_only_and_typos_stay_errors(tmp_path):
    with pytest.raises(SystemExit):  # the GUI never passes them as flags
        _parse(["--epoch", "1"])
    with pytest.raises(UserError, match="unknown argument 'noise_offset_typ'.*did you mean 'noise_offset_type'"):
        _parse(_config(tmp_path, {"noise_offset_typ": "Original"}))
    with pytest.raises(UserError, match="unknown argument 'token_warmup_steps'.*did you mean 'token_warmup_step'"):
        _parse(_config(tmp_path, {"token_warmup_steps": 0}))
    assert set(GUI_ONLY_KEYS).isdisjoint(a.dest for a in build_parser()._actions)


def test_every_sd_scripts_name_is_an_argument_with_its_reason_in_the_help():
    actions = {a.dest: a for a in build_parser()._actions}
    for name, arg in SD_SCRIPTS_ARGS.items():
        assert name in actions and arg.why in actions[name].help


# (argument, a value that asks for something): refused on the command line and in a config file alike
REFUSED = [("debug_dataset", True), ("token_warmup_min", 3), ("token_warmup_step", 0.5),
           ("face_crop_aug_range", "2.0,4.0"), ("initial_epoch", 3), ("initial_step", 100),
           ("skip_until_initial_step", True), ("huggingface_repo_id", "me/lora"),
           ("deepspeed", True), ("zero_stage", 3), ("fp8_base_unet", True), ("conditioning_data_dir", "masks")]


def _flag(name, value):
    if value is True:
        return [f"--{name}"]
    return [f"--{name}", *map(str, value if isinstance(value, list) else [value])]


@pytest.mark.parametrize("name, value", REFUSED)
def test_a_meaningful_unsupported_sd_scripts_value_is_refused_with_what_to_do(tmp_path, name, value):
    for argv in (_flag(name, value), _config(tmp_path, {name: value})):
        with pytest.raises(UserError, match=f"(?s)sd-scripts argument is not supported by this toolkit.*--{name}"):
            _checked([*BASE, *argv])


@pytest.mark.parametrize("name, value", [("token_warmup_min", 1), ("token_warmup_step", 0), ("initial_epoch", 1),
                                         ("zero_stage", 2), ("huggingface_repo_id", ""), ("debug_dataset", False),
                                         ("skip_cache_check", True), ("disable_mmap_load_safetensors", True),
                                         ("huggingface_token", "hf_SECRET")])
def test_a_no_op_sd_scripts_value_is_accepted_and_named(tmp_path, name, value):
    args = _checked([*BASE, *_config(tmp_path, {name: value})])
    notes = [n for n in no_op_notes(vars(args)) if n.startswith(f"--{name}")]
    assert len(notes) == (0 if value is False or value == "" else 1)  # "" means unset; off asks for nothing
    assert "hf_SECRET" not in str(notes) and "hf_SECRET" not in str(loggable_config(args))


def test_sd_scripts_aliases_set_this_toolkits_arguments(tmp_path):
    args = _checked([*BASE, *_config(tmp_path, {"caption_extention": ".txt", "use_8bit_adam": True})])
    assert args.caption_extension == ".txt" and args.optimizer_type == "AdamW8bit"
    assert _checked([*BASE, "--use_lion_optimizer"]).optimizer_type == "Lion"
    with pytest.raises(UserError, match="--use_8bit_adam means --optimizer_type AdamW8bit, but .* is Lion"):
        _checked([*BASE, "--use_8bit_adam", "--optimizer_type", "Lion"])
    with pytest.raises(UserError, match="disagree"):
        _checked([*BASE, "--caption_extention", ".txt", "--caption_extension", ".tags"])
    args = _checked([*BASE, "--cache_text_encoder_outputs_to_disk"])
    assert args.cache_text_encoder_outputs and any("in memory" in n for n in no_op_notes(vars(args)))


def test_the_command_line_beats_a_config_files_alias_and_the_other_way_round(tmp_path, caplog):
    # a GUI config has caption_extention / use_8bit_adam; the user overrides on the command line, as for any key
    config = _config(tmp_path, {"caption_extention": ".txt", "use_8bit_adam": True})
    args = _checked([*BASE, *config, "--caption_extension", ".tags", "--optimizer_type", "Lion"])
    assert args.caption_extension == ".tags" and args.optimizer_type == "Lion"
    assert "--caption_extention from config file gui.toml is set aside" in caplog.text
    config = _config(tmp_path, {"caption_extension": ".tags", "optimizer_type": "Lion"}, "plain.toml")
    args = _checked([*BASE, *config, "--caption_extention", ".txt", "--use_8bit_adam"])
    assert args.caption_extension == ".txt" and args.optimizer_type == "AdamW8bit"
    # an explicit default typed on the command line still counts as given
    args = _checked([*BASE, *_config(tmp_path, {"caption_extention": ".txt"}, "alias.toml"),
                     "--caption_extension", ".caption"])
    assert args.caption_extension == ".caption"
    # a file that writes every key (the GUI) with the default next to the alias: the alias is meant
    gui = _config(tmp_path, {"caption_extention": ".txt", "caption_extension": ".caption", "optimizer_type": "",
                             "use_8bit_adam": True}, "gui_all.toml")
    args = _checked([*BASE, *gui])
    assert args.caption_extension == ".txt" and args.optimizer_type == "AdamW8bit"
    both = _config(tmp_path, {"caption_extention": ".txt", "caption_extension": ".tags"}, "both.toml")
    with pytest.raises(UserError, match="disagree"):  # one file saying both: which one was meant is unknown
        _checked([*BASE, *both])


def test_save_n_epoch_ratio_sets_the_epoch_cadence_as_sd_scripts(tmp_path):
    assert _checked([*BASE, "--max_train_epochs", "10", "--save_n_epoch_ratio", "3"]).save_every_n_epochs == 3
    assert _checked([*BASE, "--max_train_epochs", "2", "--save_n_epoch_ratio", "5"]).save_every_n_epochs == 1
    assert _checked([*BASE, "--save_n_epoch_ratio", "3"]).save_every_n_epochs is None  # set once epochs are known
    with pytest.raises(UserError, match="keep one"):
        _checked([*BASE, "--max_train_epochs", "9", "--save_n_epoch_ratio", "3", "--save_every_n_epochs", "2"])


def test_console_log_level_sets_the_logging_level():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        _checked([*BASE, "--console_log_level", "ERROR"])
        assert root.level == logging.ERROR
    finally:
        root.setLevel(level)
        for handler in root.handlers[len(handlers):]:
            root.removeHandler(handler)


@pytest.mark.parametrize("given", [["train_data_dir"], ["reg_data_dir"], ["in_json"],
                                   ["train_data_dir", "reg_data_dir", "in_json"]])
def test_folder_options_next_to_a_dataset_toml_are_ignored_with_one_warning(caplog, given):
    args = argparse.Namespace(dataset_config="data.toml", train_data_dir=None, reg_data_dir=None, in_json=None)
    for name in given:
        setattr(args, name, f"{name}_value")
    with caplog.at_level(logging.WARNING, logger="library.arg_checks"):
        check_data_sources(args)  # (tools/check_dataset.py runs the same function)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert all(f"--{name}" in message for name in given) and "data.toml" in message and "ignored" in message
    assert (args.train_data_dir, args.reg_data_dir, args.in_json) == (None, None, None)
    caplog.clear()
    check_data_sources(argparse.Namespace(dataset_config="data.toml", train_data_dir=None, reg_data_dir=None,
                                          in_json=None))
    assert not caplog.records
    with pytest.raises(UserError, match="--in_json needs --train_data_dir"):  # without a TOML it still does
        check_data_sources(argparse.Namespace(dataset_config=None, train_data_dir=None, reg_data_dir=None,
                                              in_json="meta.json"))


def test_save_n_epoch_ratio_with_max_train_steps_saves_once_the_epoch_count_is_known(tmp_path, tiny_sd_dir,
                                                                                   tiny_images):
    import train_network

    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 4\n  [[datasets.subsets]]\n'
                    f'  image_dir = "{tiny_images}"\n')  # 8 images: 2 steps per epoch, 8 steps = 4 epochs
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data), "--output_dir",
            str(tmp_path / "out"), "--output_name", "x", "--network_dim", "4", "--max_train_steps", "8",
            "--save_n_epoch_ratio", "2"]
    assert train_network.main(argv) == 0
    # every max(1, 4 // 2) = 2 epochs: epoch 2, then the final file (epoch 4 is the last one)
    assert sorted(p.name for p in (tmp_path / "out").glob("x*.safetensors")) == ["x-000002.safetensors",
                                                                                "x.safetensors"]


def test_scheduler_settings_of_sd_scripts_reach_the_schedule(tmp_path, tiny_sd_dir, tiny_images):
    import train_network
    from library.loss_curve import read_loss_curve

    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 8\n  [[datasets.subsets]]\n'
                    f'  image_dir = "{tiny_images}"\n')
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data), "--output_dir",
            str(tmp_path / "out"), "--output_name", "x", "--network_dim", "4", "--max_train_steps", "4",
            "--learning_rate", "1e-3", "--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.5"]
    assert train_network.main(argv) == 0
    lrs = [row[2] for row in read_loss_curve(tmp_path / "out" / "x_loss.csv", up_to=4)]
    # cosine from 1e-3 down to the floor 0.5 x 1e-3 (without the ratio it would go down to 0)
    assert len(lrs) == 4 and lrs[-1] == pytest.approx(0.5e-3, rel=1e-3) and lrs[0] > lrs[-1]


def test_console_log_level_is_restored_after_the_run():
    import train_network

    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    # a run that stops early (no model) still sets the level during it and restores it afterwards
    assert train_network.main([*BASE, "--console_log_level", "DEBUG"]) != 0
    assert (root.level, list(root.handlers)) == before
