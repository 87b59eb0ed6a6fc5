"""--config_file precedence, validation and --output_config (CONTRACTS.md §2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import toml

from library.arg_checks import check_combinations
from library.args import build_parser
from library.config_file import loggable_config, parse_args_with_sources, write_output_config
from library.errors import UserError


def _parse(argv):
    return parse_args_with_sources(build_parser(), argv)


def test_cli_beats_toml_beats_default(tmp_path):
    cfg = tmp_path / "train.toml"
    cfg.write_text('[optimisation]\nlearning_rate = 5e-4\nmax_train_steps = 30\n[network]\nnetwork_dim = 8\n')
    args, sources = _parse(["--config_file", str(cfg), "--max_train_steps", "99"])
    assert args.max_train_steps == 99 and sources["max_train_steps"] == "command line"
    assert args.learning_rate == 5e-4 and sources["learning_rate"] == "config file train.toml"
    assert args.network_dim == 8
    assert args.network_alpha == 1.0 and sources["network_alpha"] == "default"


def test_store_true_on_cli_beats_false_in_toml(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("cache_latents = false\n")
    args, sources = _parse(["--config_file", str(cfg), "--cache_latents"])
    assert args.cache_latents is True and sources["cache_latents"] == "command line"


def test_unknown_key_names_line_and_suggestion(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("[optimisation]\nlearning_rate = 1e-4\nlearning_rat = 2e-4\n")
    with pytest.raises(UserError) as e:
        _parse(["--config_file", str(cfg)])
    message = str(e.value)
    assert "learning_rat" in message and "line 3" in message and "did you mean 'learning_rate'" in message
    assert str(cfg) in message


@pytest.mark.parametrize("line, expected", [
    ('max_train_steps = "10"', "an integer"),
    ("learning_rate = true", "a number"),
    ('cache_latents = "yes"', "true or false"),
    ('mixed_precision = "fp32"', "not one of"),
    ("network_dim = [4, 8]", "a single value"),
])
def test_wrong_type_is_an_error(tmp_path, line, expected):
    cfg = tmp_path / "t.toml"
    cfg.write_text(line + "\n")
    with pytest.raises(UserError, match=expected):
        _parse(["--config_file", str(cfg)])


def test_toml_syntax_error_names_line(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("learning_rate = 1e-4\nnetwork_dim = = 3\n")
    with pytest.raises(UserError, match="line 2"):
        _parse(["--config_file", str(cfg)])


def test_same_key_in_two_tables_is_an_error(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("[a]\nseed = 1\n[b]\nseed = 2\n")
    with pytest.raises(UserError, match="set twice"):
        _parse(["--config_file", str(cfg)])


def test_numbers_accepted_for_string_options_and_lists(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('resolution = 512\nnetwork_args = ["conv_dim=4", "conv_alpha=1"]\n')
    args, _ = _parse(["--config_file", str(cfg)])
    assert args.resolution == "512"
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]


def test_output_config_writes_non_defaults_only_and_never_overwrites(tmp_path):
    out = tmp_path / "written.toml"
    parser = build_parser()
    args, _ = parse_args_with_sources(parser, ["--config_file", str(out), "--output_config", "--network_dim", "16",
                                               "--wandb_api_key", "SECRET", "--network_args", "conv_dim=4"])
    write_output_config(parser, args)
    written = toml.loads(out.read_text())
    assert written == {"network_dim": 16, "network_args": ["conv_dim=4"]}
    with pytest.raises(UserError, match="refuses to overwrite"):
        write_output_config(parser, args)
    # and the written file reads back to the same values
    again, sources = _parse(["--config_file", str(out)])
    assert again.network_dim == 16 and sources["network_dim"].startswith("config file")


def test_loggable_config_drops_secrets_and_absolute_paths():
    args, _ = _parse(["--wandb_api_key", "SECRET", "--output_dir", "/home/me/out", "--network_dim", "4"])
    logged = loggable_config(args)
    assert "wandb_api_key" not in logged and "SECRET" not in str(logged)
    assert logged["output_dir"] == "out" and logged["network_dim"] == 4


def test_not_implemented_arguments_are_refused():
    args, _ = _parse(["--full_fp16", "--output_dir", "o", "--pretrained_model_name_or_path", "m"])
    with pytest.raises(UserError, match="full_fp16"):
        check_combinations(args, build_parser().parse_args([]))
    # --xformers (in many sd-scripts configs) is met by SDPA, which is always on: accepted
    args, _ = _parse(["--xformers", "--output_dir", "o", "--pretrained_model_name_or_path", "m"])
    check_combinations(args, build_parser().parse_args([]))


def test_conflicting_flags_are_refused():
    args, _ = _parse(["--network_train_unet_only", "--network_train_text_encoder_only", "--output_dir", "o",
                      "--pretrained_model_name_or_path", "m"])
    with pytest.raises(UserError, match="exclude each other"):
        check_combinations(args, build_parser().parse_args([]))


def test_toml_accepts_the_sd_scripts_arguments_added_later(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("[training]\nscale_weight_norms = 1.0\nip_noise_gamma = 0.1\nip_noise_gamma_random_strength = true\n"
                   'huber_schedule = "exponential"\nsave_last_n_epochs_state = 1\nsave_last_n_steps_state = 100\n'
                   "stop_text_encoder_training = 50\n"
                   'lr_scheduler_type = "torch.optim.lr_scheduler.StepLR"\nlr_scheduler_args = ["step_size=10"]\n'
                   "loraplus_lr_ratio = 16\nloraplus_unet_lr_ratio = 8\nloraplus_text_encoder_lr_ratio = 4\n"
                   "mem_eff_attn = true\nlowram = true\nhighvram = true\nxformers = true\n")
    args, sources = _parse(["--config_file", str(cfg)])
    assert args.scale_weight_norms == 1.0 and args.ip_noise_gamma == 0.1 and args.ip_noise_gamma_random_strength
    assert args.huber_schedule == "exponential" and args.save_last_n_epochs_state == 1
    assert args.save_last_n_steps_state == 100 and args.stop_text_encoder_training == 50
    assert args.lr_scheduler_type.endswith("StepLR") and args.lr_scheduler_args == ["step_size=10"]
    assert (args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio, args.loraplus_text_encoder_lr_ratio) == (16, 8, 4)
    assert args.mem_eff_attn and args.lowram and args.highvram and sources["lowram"].startswith("config file")
    assert build_parser().parse_args([]).huber_schedule == "snr"  # sd-scripts' default
    cfg.write_text('huber_schedule = "linear"\n')
    with pytest.raises(UserError, match="not one of"):
        _parse(["--config_file", str(cfg)])


def test_accepted_no_op_switches_are_named_in_the_log():
    from library.arg_checks import no_op_notes

    args, _ = _parse(["--mem_eff_attn", "--lowram", "--highvram", "--xformers"])
    notes = no_op_notes(vars(args))
    assert [n.split(":")[0] for n in notes] == ["--xformers", "--mem_eff_attn", "--lowram", "--highvram"]
    assert "SDPA" in notes[1] and "low RAM" in notes[2] and "low-VRAM" in notes[3]
    assert no_op_notes(vars(_parse([])[0])) == []


def test_scheduler_args_without_a_type_pass_and_negative_max_norm_is_refused():
    base = ["--output_dir", "o", "--pretrained_model_name_or_path", "m"]
    args, _ = _parse([*base, "--lr_scheduler_args", "num_cycles=0.25"])
    check_combinations(args, build_parser().parse_args([]))  # keywords of the named --lr_scheduler (sd-scripts)
    args, _ = _parse([*base, "--scale_weight_norms", "-1"])
    with pytest.raises(UserError, match="must be > 0"):
        check_combinations(args, build_parser().parse_args([]))
    args, _ = _parse([*base, "--loss_type", "huber", "--huber_c", "0"])
    with pytest.raises(UserError, match="needs a value > 0"):
        check_combinations(args, build_parser().parse_args([]))
    args, _ = _parse([*base, "--loss_type", "smooth_l1", "--huber_scale", "-2"])
    with pytest.raises(UserError, match="--huber_scale -2.0: .* needs a value > 0"):
        check_combinations(args, build_parser().parse_args([]))


def test_resume_compares_the_new_arguments_and_still_accepts_older_states():
    from library.resume_check import check_resume_compatible, training_fingerprint

    def fingerprint(*argv):
        args, _ = _parse(list(argv))
        return training_fingerprint(args, seed=1, batch_size=1, num_processes=1, accumulation=1, data="d",
                                    datasets=[])

    plain = fingerprint()
    # a state saved before these arguments existed has none of their keys: default settings still resume
    assert not {"ip_noise_gamma", "huber_schedule", "lr_scheduler_type", "scale_weight_norms"} & plain.keys()
    assert check_resume_compatible(plain, fingerprint(), False, "s") == []
    perturbed = fingerprint("--ip_noise_gamma", "0.1")
    for saved, now in ((perturbed, plain), (plain, perturbed)):  # set on either side only: a difference
        with pytest.raises(UserError, match="ip_noise_gamma"):
            check_resume_compatible(saved, now, False, "s")
    huber = fingerprint("--loss_type", "huber")  # the default snr schedule; earlier runs had a constant one
    with pytest.raises(UserError, match="huber_schedule"):
        check_resume_compatible(fingerprint("--loss_type", "huber", "--huber_schedule", "constant"), huber, False, "s")
    assert "huber_scale" not in huber  # the default scale: states from before --huber_scale still resume
    with pytest.raises(UserError, match="huber_scale"):
        check_resume_compatible(huber, fingerprint("--loss_type", "huber", "--huber_scale", "2"), False, "s")
    # options added later with a non-empty default: stored only when changed, so older states still resume
    assert "multires_noise_discount" not in plain
    with pytest.raises(UserError, match="multires_noise_discount"):
        check_resume_compatible(plain, fingerprint("--multires_noise_discount", "0.5"), False, "s")
    lines = check_resume_compatible(plain, fingerprint("--lr_scheduler_type", "StepLR"), True, "s")
    assert any("lr_scheduler_type" in line for line in lines)


def test_resume_compares_dataset_options_and_only_the_samples_per_step():
    from library.dataset_config import DatasetConfig, SubsetConfig
    from library.resume_check import check_resume_compatible, dataset_settings, training_fingerprint

    def fingerprint(batch: int, accumulation: int, flip: bool, settings: bool = True) -> dict:
        args, _ = _parse([])
        config = DatasetConfig((SubsetConfig(Path("/data/a"), flip_aug=flip),), batch_size=batch)
        return training_fingerprint(args, seed=1, batch_size=batch, num_processes=1, accumulation=accumulation,
                                    data="d", datasets=[{"batch_size_per_device": batch}],
                                    settings=dataset_settings([config]) if settings else None)

    # batch 2 = batch 1 x accumulation 2: the same samples at every step, so not a change
    assert check_resume_compatible(fingerprint(2, 1, False), fingerprint(1, 2, False), False, "s") == []
    with pytest.raises(UserError, match="batch_size: saved 2, now 1"):
        check_resume_compatible(fingerprint(2, 1, False), fingerprint(1, 1, False), False, "s")
    # an augmentation switched on changes training
    with pytest.raises(UserError, match="dataset settings"):
        check_resume_compatible(fingerprint(2, 1, False), fingerprint(2, 1, True), False, "s")
    # a state saved before dataset settings were stored still resumes
    assert check_resume_compatible(fingerprint(2, 1, False, settings=False), fingerprint(2, 1, True), False, "s") == []


def test_text_encoder_lr_takes_one_value_or_one_per_encoder(tmp_path):
    base = ["--output_dir", "o", "--pretrained_model_name_or_path", "m"]
    args, _ = _parse([*base, "--text_encoder_lr", "1e-5", "2e-5"])
    check_combinations(args, build_parser().parse_args([]))
    assert args.text_encoder_lr == [1e-5, 2e-5]  # SDXL: encoder 1, encoder 2 (as sd-scripts' nargs="*")
    args, _ = _parse([*base, "--text_encoder_lr", "3e-5"])
    check_combinations(args, build_parser().parse_args([]))
    assert args.text_encoder_lr == 3e-5
    cfg = tmp_path / "train.toml"
    cfg.write_text("text_encoder_lr = [1e-5, 2e-5]\n")
    args, _ = _parse([*base, "--config_file", str(cfg)])
    check_combinations(args, build_parser().parse_args([]))
    assert args.text_encoder_lr == [1e-5, 2e-5]


def test_abbreviated_flag_is_a_command_line_source_and_wins_over_accelerate():
    from library.accelerator import LaunchContext
    from library.train_setup import accelerator_settings

    args, sources = _parse(["--mixed_prec", "bf16", "--gradient_acc", "2"])
    assert args.mixed_precision == "bf16" and sources["mixed_precision"] == "command line"
    assert sources["gradient_accumulation_steps"] == "command line"
    with pytest.raises(UserError, match="'bf16' from the script's command line.*'fp16' from environment"):
        accelerator_settings(args, sources, LaunchContext(environ={"ACCELERATE_MIXED_PRECISION": "fp16"},
                                                          launched=False))


def test_config_file_name_without_suffix_means_toml(tmp_path):
    parser = build_parser()
    args, _ = parse_args_with_sources(parser, ["--config_file", str(tmp_path / "run"), "--output_config",
                                               "--network_dim", "16"])
    assert write_output_config(parser, args) == tmp_path / "run.toml"
    again, sources = _parse(["--config_file", str(tmp_path / "run")])
    assert again.network_dim == 16 and sources["network_dim"] == "config file run.toml"
    with pytest.raises(UserError, match=r"not found: .*other\.toml \(--config_file .*other: \.toml is added"):
        _parse(["--config_file", str(tmp_path / "other")])


@pytest.mark.parametrize("text, expected", [
    ('config_file = "x.toml"\n', r"line 1: 'config_file' cannot be set inside the config file"),
    ("seed = {a = 1}\n", r"'seed' = \{'a': 1\} has the wrong type; --seed takes a single value"),
    ("[[datasets]]\nresolution = 512\n", r"\[\[datasets\]\] belongs in a dataset TOML; pass that file with "
                                         r"--dataset_config"),
    ("max_train_steps = 3\ntraining.learning_rat = 1e-4\n", r"line 2, table \[training\]: unknown argument"),
])
def test_toml_mistakes_get_clear_messages(tmp_path, text, expected):
    cfg = tmp_path / "t.toml"
    cfg.write_text(text)
    with pytest.raises(UserError, match=expected):
        _parse(["--config_file", str(cfg)])


def test_loggable_config_hides_paths_in_lists_and_home_but_keeps_free_text_and_adds_accelerate_values():
    from library.accelerator import Setting

    args, _ = _parse(["--network_args", "conv_dim=4", "lycoris_config=/home/x/y.toml",
                      "--optimizer_args", "weight_decay=0.01", "--output_dir", "~/loras/out",
                      "--vae", r"C:\Users\alice\vae.safetensors", "--training_comment", "/home/alice/notes"])
    logged = loggable_config(args, {"mixed_precision": Setting("bf16", "accelerate launch --mixed_precision"),
                                    "gradient_accumulation_steps": Setting(4, "environment X")})
    assert logged["network_args"] == "conv_dim=4 lycoris_config=y.toml"
    assert logged["optimizer_args"] == "weight_decay=0.01"
    assert logged["output_dir"] == "out" and logged["vae"] == "vae.safetensors"
    assert logged["training_comment"] == "/home/alice/notes"
    assert logged["mixed_precision"] == "bf16" and logged["gradient_accumulation_steps"] == 4
    assert "/home" not in str({k: v for k, v in logged.items() if k != "training_comment"})


def test_log_prefix_without_logging_dir_is_named_in_the_log():
    from library.arg_checks import no_op_notes

    assert any("--log_prefix run_: ignored without --logging_dir" in n
               for n in no_op_notes({"log_prefix": "run_", "logging_dir": None}))
    assert no_op_notes({"log_prefix": "run_", "logging_dir": "logs"}) == []


def test_check_combinations_refuses_a_tracker_that_is_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    args, _ = _parse(["--log_with", "wandb", "--output_dir", "o", "--pretrained_model_name_or_path", "m"])
    with pytest.raises(UserError, match="--log_with wandb needs the wandb package: pip install wandb"):
        check_combinations(args, build_parser().parse_args([]))


@pytest.mark.parametrize("value, expected", [(1, True), (0, False), ("true", None), (2, None), (1.0, None)])
def test_a_switch_takes_0_or_1_as_the_kohya_ss_gui_writes_it(tmp_path, value, expected):
    cfg = tmp_path / "gui.toml"  # GUI v24 / v25.0: persistent_data_loader_workers = int(checkbox)
    cfg.write_text(toml.dumps({"persistent_data_loader_workers": value}))
    if expected is None:  # other numbers (and strings) stay errors: 2 is no switch position
        with pytest.raises(UserError, match="expected true or false"):
            _parse(["--config_file", str(cfg)])
        return
    args, sources = _parse(["--config_file", str(cfg)])
    assert args.persistent_data_loader_workers is expected and sources["persistent_data_loader_workers"] != "default"


@pytest.mark.parametrize("key", ["network_args", "optimizer_args", "lr_scheduler_args"])
def test_an_empty_string_for_a_list_of_options_is_no_options(tmp_path, key):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'{key} = ""\n')
    args, _ = _parse(["--config_file", str(cfg), "--output_dir", "o", "--pretrained_model_name_or_path", "m"])
    assert getattr(args, key) == []  # not [""], which the option parsers call "'' is not key=value"
    check_combinations(args, build_parser().parse_args([]))  # [] lr_scheduler_args need no --lr_scheduler_type


@pytest.mark.parametrize("key", ["logging_dir", "output_dir", "vae", "network_weights", "sample_prompts", "resume",
                                 "dataset_config", "reg_data_dir", "in_json", "tokenizer_cache_dir", "log_with"])
def test_an_empty_string_for_a_path_in_a_config_file_means_unset(tmp_path, key):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'{key} = ""\n')  # logging_dir = "" once wrote tensorboard logs to ./<timestamp>/
    args, sources = _parse(["--config_file", str(cfg)])
    assert getattr(args, key) is None and sources[key].startswith("config file")
    if key != "log_with":  # (argparse checks choices on the command line before anything else)
        args, _ = _parse([f"--{key}", ""])  # the command line says the same
        assert getattr(args, key) is None
    # defaults that are strings keep an explicit "" (an empty separator or optimizer name is a value)
    cfg.write_text('optimizer_type = ""\ncaption_separator = ";"\n')
    assert _parse(["--config_file", str(cfg)])[0].optimizer_type == ""


def test_an_empty_output_dir_gets_the_required_message(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('output_dir = ""\npretrained_model_name_or_path = "m"\n')
    args, _ = _parse(["--config_file", str(cfg)])
    with pytest.raises(UserError, match="--output_dir is required"):
        check_combinations(args, build_parser().parse_args([]))
