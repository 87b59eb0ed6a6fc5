"""diffusers' and TRL / HF Trainer flag names (library/foreign_args.py): aliases set this toolkit's argument from
the command line and from --config_file, disagreements follow the command line > config file rule, and refused
names say what to write instead."""

from __future__ import annotations

import argparse

import pytest
import toml

from library.arg_checks import check_combinations, no_op_notes
from library.args import build_parser
from library.config_file import parse_args_with_sources, write_output_config
from library.errors import UserError
from library.foreign_args import FOREIGN_ARGS

BASE = ["--output_dir", "o", "--pretrained_model_name_or_path", "m"]


@pytest.fixture(autouse=True)
def _trackers_installed(monkeypatch):
    monkeypatch.setattr("library.arg_checks.check_trackers_installed", lambda log_with: None)  # wandb may be absent


def _checked(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    args, sources = parse_args_with_sources(build_parser(), argv)
    check_combinations(args, build_parser().parse_args([]), sources)
    return args, sources


def _config(tmp_path, values: dict) -> list[str]:
    path = tmp_path / "run.toml"
    path.write_text(toml.dumps(values))
    return ["--config_file", str(path)]


def _base(argv: list[str]) -> list[str]:
    return BASE[:2] if argv[0] == "--model_name_or_path" else BASE  # that alias names the model itself


# flag and its value(s) on the command line → (this toolkit's argument, the value it gets)
ALIASES = [
    (["--rank", "16"], {"network_dim": 16, "network_alpha": 16.0}),
    (["--snr_gamma", "5"], {"min_snr_gamma": 5.0}),
    (["--checkpointing_steps", "250"], {"save_every_n_steps": 250, "save_state": True}),
    (["--lr_num_cycles", "3"], {"lr_scheduler_num_cycles": 3}),
    (["--lr_power", "2"], {"lr_scheduler_power": 2.0}),
    (["--adam_weight_decay", "0.001"], {"optimizer_args": ["weight_decay=0.001"]}),
    (["--random_flip"], {"flip_aug": True}),
    (["--center_crop"], {"random_crop": False}),
    (["--train_text_encoder"], {"network_train_unet_only": False}),
    (["--pretrained_vae_model_name_or_path", "vae"], {"vae": "vae"}),
    (["--enable_xformers_memory_efficient_attention"], {"xformers": True}),
    (["--optimizer", "prodigy"], {"optimizer_type": "Prodigy"}),
    (["--prodigy_beta3", "0.5"], {"optimizer_args": ["beta3=0.5"]}),
    (["--prodigy_decouple", "false"], {"optimizer_args": ["decouple=False"]}),
    (["--prediction_type", "v_prediction"], {"v_parameterization": True}),
    (["--num_train_epochs", "4"], {"max_train_epochs": 4}),
    (["--dataloader_num_workers", "2"], {"max_data_loader_n_workers": 2}),
    (["--report_to", "wandb"], {"log_with": "wandb"}),
    (["--report_to", "tensorboard"], {"log_with": "tensorboard", "logging_dir": "o/logs"}),
    (["--report_to", "wandb", "tensorboard"], {"log_with": "all"}),
    (["--report_to", "none"], {"log_with": None}),
    (["--resume_from_checkpoint", "latest"], {"resume": "latest"}),
    (["--adam_beta1", "0.8"], {"optimizer_args": ["betas=(0.8, 0.999)"]}),
    (["--adam_beta1", "0.8", "--adam_beta2", "0.99"], {"optimizer_args": ["betas=(0.8, 0.99)"]}),
    (["--adam_epsilon", "1e-06"], {"optimizer_args": ["eps=1e-06"]}),
    (["--use_dora"], {"network_args": ["use_dora=True"]}),
    (["--model_name_or_path", "m2"], {"pretrained_model_name_or_path": "m2"}),
    (["--per_device_train_batch_size", "4"], {"train_batch_size": 4}),
    (["--max_steps", "5"], {"max_train_steps": 5}),
    (["--warmup_ratio", "0.1"], {"lr_warmup_steps": 0.1}),
    (["--warmup_steps", "50"], {"lr_warmup_steps": 50.0}),
    (["--weight_decay", "0"], {"optimizer_args": ["weight_decay=0.0"]}),  # 0 asks for something: AdamW's is 0.01
    (["--optim", "paged_adamw_8bit"], {"optimizer_type": "PagedAdamW8bit"}),
    (["--lora_r", "8"], {"network_dim": 8, "network_alpha": 16.0}),
    (["--lora_r", "8", "--lora_alpha", "32"], {"network_dim": 8, "network_alpha": 32.0}),
    (["--lora_dropout", "0.05"], {"network_dropout": 0.05}),
    (["--lora_target_modules", "q_proj", "v_proj"], {"network_args": ["target_modules=q_proj,v_proj"]}),
    (["--use_rslora", "True"], {"network_args": ["use_rslora=True"]}),
    (["--bf16"], {"mixed_precision": "bf16"}),
    (["--fp16", "true"], {"mixed_precision": "fp16"}),
    (["--bf16", "False"], {"mixed_precision": None}),
    (["--save_steps", "100"], {"save_every_n_steps": 100, "save_state": True}),
    (["--save_steps", "100", "--save_total_limit", "3"], {"save_last_n_steps": 299}),
    (["--checkpointing_steps", "50", "--checkpoints_total_limit", "2"], {"save_last_n_steps": 99}),
    (["--checkpoints_total_limit", "2", "--save_steps", "40"], {"save_last_n_steps": 79}),
    (["--eval_steps", "20"], {"validate_every_n_steps": 20}),
    (["--run_name", "r"], {"wandb_run_name": "r"}),
    (["--use_peft"], {"network_module": "networks.lora"}),
    (["--lr_scheduler_type", "cosine"], {"lr_scheduler": "cosine", "lr_scheduler_type": ""}),
]


@pytest.mark.parametrize("argv, expected", ALIASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_an_alias_on_the_command_line_sets_the_argument(argv, expected):
    args, sources = _checked(_base(argv) + argv)
    for name, value in expected.items():
        assert getattr(args, name) == value, name
    if argv[0] != "--lr_scheduler_type" and args.mixed_precision:
        assert sources["mixed_precision"] == "command line"  # accelerate's resolution sees an explicit choice


def _toml_value(values: list[str]):
    """The command-line words of an alias as its config file value."""
    if not values:
        return True
    if len(values) > 1:
        return values
    text = values[0]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "true": True, "False": False, "false": False}.get(text, text)


@pytest.mark.parametrize("argv, expected", [a for a in ALIASES if a[0][0] != "--lr_scheduler_type"],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_an_alias_in_a_config_file_sets_the_argument(tmp_path, argv, expected):
    values, name, words = {}, None, []
    for word in argv + ["--end"]:
        if word.startswith("--"):
            if name:
                values[name] = _toml_value(words)
            name, words = word[2:], []
        else:
            words.append(word)
    args, sources = _checked(_base(argv) + _config(tmp_path, values))
    for target, value in expected.items():
        assert getattr(args, target) == value, target
    first = argv[0][2:]
    target = FOREIGN_ARGS[first].target
    if target and target not in ("optimizer_args", "network_args") and values[first] is not False:
        assert sources[target] == "config file run.toml"


def test_every_name_is_an_argument_of_its_own_group_and_none_shadows_ours():
    parser = build_parser()
    group = next(g for g in parser._action_groups if g.title == "diffusers / TRL names")
    assert {a.dest for a in group._group_actions} == set(FOREIGN_ARGS)
    for name, arg in FOREIGN_ARGS.items():
        assert arg.origin in ("diffusers", "TRL/Trainer", "diffusers and TRL/Trainer")
        assert arg.handling != "alias" or name == "use_peft" or arg.target in vars(parser.parse_args([]))
    for ours in ("learning_rate", "output_dir", "seed", "gradient_checkpointing", "max_grad_norm", "resolution",
                 "noise_offset", "prior_loss_weight", "mixed_precision", "lr_scheduler", "logging_dir",
                 "torch_compile", "train_data_dir", "lr_scheduler_type"):
        assert ours not in FOREIGN_ARGS


def test_max_steps_is_its_own_flag_not_an_abbreviation_and_wins_over_epochs():
    args, _ = _checked(BASE + ["--max_steps", "5"])
    assert args.max_train_steps == 5 and args.max_train_epochs is None
    args, _ = _checked(BASE + ["--num_train_epochs", "3", "--max_steps", "7"])  # the Trainer: max_steps wins
    assert args.max_train_steps == 7 and args.max_train_epochs is None
    args, _ = _checked(BASE + ["--num_train_epochs", "3", "--max_train_steps", "9"])  # diffusers: likewise
    assert args.max_train_steps == 9 and args.max_train_epochs is None
    args, _ = _checked(BASE + ["--max_steps", "-1", "--num_train_epochs", "2"])  # -1: the Trainer's unset
    assert args.max_train_epochs == 2


def test_epochs_on_the_command_line_beat_a_config_files_step_count(tmp_path):
    args, _ = _checked(BASE + _config(tmp_path, {"max_train_steps": 400}) + ["--num_train_epochs", "2"])
    assert args.max_train_epochs == 2  # which overrides max_train_steps here


def test_a_partial_epoch_is_refused():
    with pytest.raises(UserError, match=r"--num_train_epochs 0.5: whole epochs only.*--max_steps"):
        _checked(BASE + ["--num_train_epochs", "0.5"])


def test_warmup_steps_win_over_the_warmup_ratio_and_a_ratio_is_below_one():
    args, _ = _checked(BASE + ["--warmup_ratio", "0.1", "--warmup_steps", "30"])
    assert args.lr_warmup_steps == 30
    with pytest.raises(UserError, match=r"--warmup_ratio 1: a ratio of the steps must be below 1"):
        _checked(BASE + ["--warmup_ratio", "1"])


@pytest.mark.parametrize("argv, message", [
    (["--rank", "8", "--network_dim", "16"], r"--rank 8 means --network_dim 8, but --network_dim 16 disagrees"),
    (["--bf16", "--fp16"], r"--fp16 means --mixed_precision fp16, but --bf16 \(sets --mixed_precision bf16\)"),
    (["--bf16", "--mixed_precision", "fp16"], r"--bf16 means --mixed_precision bf16, but --mixed_precision fp16"),
    (["--lora_r", "8", "--rank", "4"], r"--lora_r 8 means --network_dim 8, but --rank \(sets --network_dim 4\)"),
    (["--center_crop", "--random_crop"], r"--center_crop means --random_crop False"),
    (["--weight_decay", "0.1", "--optimizer_args", "weight_decay=0.2"],
     r"--weight_decay 0.1 means --optimizer_args weight_decay=0.1, but --optimizer_args has weight_decay=0.2"),
    (["--lr_scheduler_type", "linear", "--lr_scheduler", "cosine"],
     r"--lr_scheduler_type linear means --lr_scheduler linear, but --lr_scheduler cosine disagrees"),
])
def test_an_alias_and_its_argument_disagreeing_in_one_place_are_an_error(argv, message):
    with pytest.raises(UserError, match=message):
        _checked(BASE + argv)


def test_the_same_value_twice_is_no_conflict():
    args, _ = _checked(BASE + ["--rank", "8", "--network_dim", "8", "--bf16", "--mixed_precision", "bf16",
                               "--weight_decay", "0.1", "--optimizer_args", "weight_decay=0.1"])
    assert args.network_dim == 8 and args.mixed_precision == "bf16" and args.optimizer_args == ["weight_decay=0.1"]


def test_the_command_line_wins_over_a_config_file_either_way(tmp_path, caplog):
    args, sources = _checked(BASE + _config(tmp_path, {"network_dim": 16}) + ["--rank", "8"])
    assert args.network_dim == 8 and sources["network_dim"] == "command line"
    assert "--network_dim from config file run.toml is set aside" in caplog.text
    args, _ = _checked(BASE + _config(tmp_path, {"lora_r": 16, "bf16": True}) + ["--network_dim", "8",
                                                                               "--mixed_precision", "no"])
    assert args.network_dim == 8 and args.mixed_precision == "no"
    args, _ = _checked(BASE + _config(tmp_path, {"optimizer_args": ["weight_decay=0.2"]}) + ["--weight_decay", "0"])
    assert args.optimizer_args == ["weight_decay=0.0"]


def test_given_alpha_is_kept_and_an_llm_default_does_not_replace_the_rank(tmp_path):
    args, sources = _checked(BASE + ["--rank", "8", "--network_alpha", "4"])
    assert (args.network_dim, args.network_alpha) == (8, 4.0)
    args, sources = _checked(BASE + _config(tmp_path, {"lora_r": 32}))
    assert sources["network_dim"] != "default" and sources["network_alpha"] != "default"  # the LLM family's 16s


def test_a_checkpoint_limit_needs_a_step_cadence():
    with pytest.raises(UserError, match=r"--save_total_limit 2 limits step checkpoints.*--checkpointing_steps"):
        _checked(BASE + ["--save_total_limit", "2"])


def test_step_ratios_of_the_trainer_are_refused():
    with pytest.raises(UserError, match=r"0.1 is a ratio of the run's steps in the HF Trainer"):
        _checked(BASE + ["--save_steps", "0.1"])


def test_hf_only_names_and_values_are_refused_with_a_replacement():
    with pytest.raises(UserError, match=r"--use_peft false: this toolkit trains LoRA only"):
        _checked(BASE + ["--use_peft", "false"])
    with pytest.raises(UserError, match=r"--prediction_type epsilon: .*scheduler config"):
        _checked(BASE + ["--prediction_type", "epsilon"])
    with pytest.raises(UserError, match=r"--optim adamw_anyprecision: no counterpart here; choose --optimizer_type"):
        _checked(BASE + ["--optim", "adamw_anyprecision"])
    with pytest.raises(UserError, match=r"--lr_scheduler_type reduce_lr_on_plateau .*evaluation metric"):
        _checked(BASE + ["--lr_scheduler_type", "reduce_lr_on_plateau"])


def test_a_scheduler_class_keeps_working():
    args, _ = _checked(BASE + ["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR"])
    assert args.lr_scheduler_type == "torch.optim.lr_scheduler.StepLR" and args.lr_scheduler == "constant"


REFUSED = [
    (["--instance_data_dir", "dog"], "--train_data_dir"),
    (["--instance_prompt", "sks dog"], "N_<caption>"),
    (["--class_data_dir", "dogs"], "--reg_data_dir"),
    (["--class_prompt", "a dog"], "is_reg = true"),
    (["--with_prior_preservation"], "--reg_data_dir"),
    (["--num_class_images", "100"], "make them beforehand"),
    (["--repeats", "5"], "num_repeats"),
    (["--validation_prompt", "a dog"], "--sample_prompts"),
    (["--validation_epochs", "5"], "--sample_every_n_epochs"),
    (["--num_validation_images", "4"], "--sample_prompts"),
    (["--image_column", "img"], "--caption_extension"),
    (["--caption_column", "text"], "--in_json"),
    (["--scale_lr"], "--learning_rate"),
    (["--max_train_samples", "10"], "--max_train_steps"),
    (["--revision", "main"], "local folder"),
    (["--variant", "fp16"], "--mixed_precision"),
    (["--dataset_name", "imdb"], "jsonl_file"),
    (["--push_to_hub"], "huggingface-cli upload"),
    (["--hub_model_id", "me/x"], "huggingface-cli upload"),
    (["--lora_task_type", "SEQ_CLS"], "causal LMs"),
    (["--lora_modules_to_save", "lm_head"], "target_modules"),
    (["--bnb_4bit_quant_type", "fp4"], "NF4"),
    (["--use_bnb_nested_quant", "false"], "double quantization"),
    (["--torch_dtype", "bfloat16"], "--mixed_precision bf16"),
    (["--dataset_text_field", "content"], 'text_column = "..."'),
    (["--max_seq_length", "512"], "max_seq_length = N"),
    (["--max_length", "512"], "max_seq_length = N"),
    (["--packing"], "packing = true"),
    (["--packing", "false"], "packing = true / false"),
    (["--completion_only_loss", "false"], "train_on_prompt = true"),
    (["--assistant_only_loss", "false"], "train_on_prompt = true"),
    (["--dataset_train_split", "train"], "jsonl_file"),
    (["--dataset_test_split", "test"], "validation_split"),
    (["--save_strategy", "epoch"], "--save_every_n_epochs 1"),
    (["--eval_strategy", "epoch"], "--validate_every_n_epochs 1"),
]


@pytest.mark.parametrize("argv, replacement", REFUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_refused_name_says_what_to_write_instead(tmp_path, argv, replacement):
    for given in (BASE + argv, BASE + _config(tmp_path, {argv[0][2:]: _toml_value(argv[1:])})):
        with pytest.raises(UserError) as e:
            _checked(given)
        assert f"--{argv[0][2:]}" in str(e.value) and replacement in str(e.value)


def test_every_refused_name_is_tested():
    tested = {argv[0][2:] for argv, _ in REFUSED}
    assert tested == {name for name, arg in FOREIGN_ARGS.items() if arg.handling == "refused"} - {"hub_token"}


def test_the_dreambooth_flags_come_back_as_a_dataset_toml():
    with pytest.raises(UserError) as e:
        _checked(BASE + ["--instance_data_dir", "imgs/dog", "--instance_prompt", "a photo of sks dog",
                         "--class_data_dir", "imgs/class", "--class_prompt", "a photo of dog",
                         "--with_prior_preservation", "--hub_token", "secret"])
    message = str(e.value)
    snippet = message[message.index("[[datasets]]"):].replace("\n    ", "\n")
    data = toml.loads(snippet)
    assert data["datasets"][0]["subsets"] == [
        {"image_dir": "imgs/dog", "class_tokens": "a photo of sks dog", "num_repeats": 1},
        {"image_dir": "imgs/class", "class_tokens": "a photo of dog", "is_reg": True}]
    assert "secret" not in message and "--hub_token (" in message


def test_no_op_values_of_refused_names_are_accepted_and_named():
    args, _ = _checked(BASE + ["--lora_task_type", "CAUSAL_LM", "--push_to_hub", "false", "--repeats", "1",
                               "--save_strategy", "steps", "--completion_only_loss", "--bnb_4bit_quant_type", "nf4"])
    notes = no_op_notes(vars(args))
    for name in ("lora_task_type", "push_to_hub", "repeats", "save_strategy", "completion_only_loss"):
        assert any(n.startswith(f"--{name}") and "asks for nothing" in n for n in notes), name


def test_aliases_and_ignored_names_are_named_in_the_log():
    args, _ = _checked(BASE + ["--rank", "8", "--logging_steps", "10", "--use_peft", "--bf16", "false"])
    notes = no_op_notes(vars(args))
    assert any(n.startswith("--rank 8 (diffusers name): used as --network_dim") for n in notes)
    assert any(n.startswith("--logging_steps 10.0 (TRL/Trainer name): ignored") for n in notes)
    assert any(n.startswith("--use_peft (TRL/Trainer name): used as nothing") for n in notes)
    assert not any(n.startswith("--bf16") for n in notes)  # false asks for nothing


def test_a_config_with_foreign_names_round_trips_through_output_config(tmp_path):
    parser = build_parser()
    args, _ = parse_args_with_sources(parser, ["--config_file", str(tmp_path / "out.toml"), "--output_config",
                                               "--rank", "8", "--bf16", "--lora_target_modules", "q_proj", "v_proj"])
    write_output_config(parser, args)
    again, _ = _checked(BASE + ["--config_file", str(tmp_path / "out.toml")])
    assert (again.network_dim, again.mixed_precision) == (8, "bf16")
    assert again.network_args == ["target_modules=q_proj,v_proj"]


def test_an_unknown_report_to_value_is_an_argparse_error():
    with pytest.raises(SystemExit):
        parse_args_with_sources(build_parser(), BASE + ["--report_to", "comet_ml"])
