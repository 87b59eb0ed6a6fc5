"""Rough edges of the LLM journey found by an audit (each test fails without its fix)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from library.errors import UserError
from networks import lora


def _tiny_network(target_modules: str | None = None):
    from library.tiny_llm import tiny_llama

    model = tiny_llama(64).eval()
    args = {"target_modules": target_modules} if target_modules else {}
    network = lora.create_network(1.0, 4, 4.0, None, None, model, **args)
    network.apply_to(None, model, apply_text_encoder=False)
    return model, network


# --- #7: the trainer's adapter_model.safetensors gets the umask's permissions, not 0600 -------------------


def test_the_peft_adapter_weights_follow_the_umask(tmp_path):
    from networks.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_peft_adapter

    model, network = _tiny_network()
    old = os.umask(0o022)
    try:
        folder = write_peft_adapter(network, model, tmp_path / "adapter", "base")
    finally:
        os.umask(old)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name


# --- #9: PEFT adapters with modules_to_save are refused with what they are and what to do -----------------


def _adapter_with_modules_to_save(tmp_path, key: str = "base_model.model.lm_head.weight"):
    from safetensors.torch import load_file, save_file

    from networks.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_peft_adapter

    model, network = _tiny_network()
    folder = write_peft_adapter(network, model, tmp_path / "mts", "base")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    tensors[key] = model.lm_head.weight.detach().clone()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["modules_to_save"] = ["lm_head"]
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("key", ["base_model.model.lm_head.weight",
                                 "base_model.model.lm_head.modules_to_save.default.weight"])
def test_network_weights_with_modules_to_save_say_what_they_are(tmp_path, key):
    from networks.peft_export import load_network_weights

    folder = _adapter_with_modules_to_save(tmp_path, key)
    with pytest.raises(UserError) as e:
        load_network_weights(folder)
    text = str(e.value)
    assert str(folder) in text and "modules_to_save" in text and "lm_head" in text, text
    assert "not supported" in text and "without modules_to_save" in text and "merge" in text, text


def test_show_refuses_modules_to_save_naming_the_folder(tmp_path, capsys):
    from tools import show

    folder = _adapter_with_modules_to_save(tmp_path)
    assert show.main([str(folder)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and str(folder) in out.err and "modules_to_save" in out.err, out.err
    assert "Traceback" not in out.err


def test_convert_refuses_modules_to_save_naming_the_folder(tmp_path, capsys):
    from tools import convert

    folder = _adapter_with_modules_to_save(tmp_path)
    assert convert.main(["--model", str(folder), "--to", "kohya", "--save_to", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "modules_to_save" in err and "Traceback" not in err, err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("suffix", ["lora_B.bias", "base_layer.bias"])  # the second: how PEFT saves bias="all"
def test_a_peft_adapter_with_trained_biases_says_so(tmp_path, capsys, suffix):
    from safetensors.torch import load_file, save_file

    from networks.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_network_weights, write_peft_adapter
    from tools import show

    model, network = _tiny_network()
    folder = write_peft_adapter(network, model, tmp_path / "bias", "base")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    b_key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[b_key.replace("lora_B.weight", suffix)] = torch.zeros(tensors[b_key].shape[0])
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "bias": "lora_only"}), encoding="utf-8")
    with pytest.raises(UserError, match=r'trains biases \(LoraConfig bias="lora_only".*bias="none"'):
        load_network_weights(folder)
    # the tools said "modules_to_save = ['base_layer']": a trained bias is no layer copy
    assert show.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert "trains biases" in err and "modules_to_save" not in err, err


def test_a_plain_peft_adapter_still_loads(tmp_path):
    from networks.peft_export import check_peft_folder, load_network_weights, write_peft_adapter

    model, network = _tiny_network()
    folder = write_peft_adapter(network, model, tmp_path / "plain", "base")
    check_peft_folder(folder)
    assert any(k.endswith(".lora_down.weight") for k in load_network_weights(folder))


# --- #8: a target_modules network_arg narrower than the loaded weights is named, not the architecture -----


def test_weights_with_a_narrower_target_modules_blame_target_modules():
    from library.tiny_llm import tiny_llama

    _, network = _tiny_network("q_proj,v_proj")
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(UserError) as e:
        lora.create_network_from_weights(1.0, None, None, None, tiny_llama(64), weights, target_modules="q_proj")
    text = str(e.value)
    assert "target_modules=q_proj leaves out 2 LoRA modules" in text and "(v_proj)" in text, text
    assert "self_attn_v_proj" in text and "architecture" not in text, text
    assert "leave target_modules out" in text and "target_modules=q_proj,v_proj" in text, text
    # the weights' own modules load as before
    net, _ = lora.create_network_from_weights(1.0, None, None, None, tiny_llama(64), weights,
                                              target_modules="q_proj,v_proj")
    assert len(net.all_loras()) == 4


def test_weights_for_another_model_still_blame_the_architecture():
    from library.tiny_llm import tiny_llama

    _, network = _tiny_network("q_proj")
    weights = {k.replace("self_attn_q_proj", "self_attn_qkv_proj"): v.clone() for k, v in network.state_dict().items()}
    for args in ({}, {"target_modules": "q_proj"}):
        with pytest.raises(UserError, match="another model architecture"):
            lora.create_network_from_weights(1.0, None, None, None, tiny_llama(64), weights, **args)


# --- #5: a data file given as --dataset_config gets the dataset TOML that wraps it ------------------------

CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
ALPACA_ROW = {"instruction": "add", "input": "1 and 2", "output": "3"}


def _wrapping_toml(message: str) -> str:
    assert "not a dataset TOML" in message and "pass that as --dataset_config" in message, message
    return message.split("\n\n", 1)[1]


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("train.jsonl", json.dumps(CHAT_ROW) + "\n" + json.dumps(CHAT_ROW) + "\n", {"messages_column": "messages"}),
    ("train.json", json.dumps(CHAT_ROW) + "\n" + json.dumps(CHAT_ROW) + "\n", {"messages_column": "messages"}),
    ("alpaca.json", json.dumps([ALPACA_ROW, ALPACA_ROW], indent=2),
     {"prompt_column": "instruction", "input_column": "input", "response_column": "output",
      "prompt_template": "alpaca"}),
    ("pc.jsonl", json.dumps({"prompt": "a", "completion": "b"}) + "\n",
     {"prompt_column": "prompt", "response_column": "completion"}),
    ("corpus.toml", json.dumps({"text": "some text"}) + "\n", {"text_column": "text"}),
])
def test_a_data_file_as_dataset_config_prints_the_toml_to_use(tmp_path, name, text, expected):
    import tomllib

    from library.data.config_checks import read_config_file

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_config_file(path)
    message = str(e.value)
    assert str(path) in message and "looks like JSON" not in message, message
    subset = tomllib.loads(_wrapping_toml(message))["datasets"][0]["subsets"][0]
    jsonl = path.with_suffix(".jsonl") if name == "train.json" else path
    assert subset == {"jsonl_file": str(jsonl.resolve()), **expected}
    if name == "train.json":
        assert "rename the file train.jsonl" in message


def test_the_printed_toml_reads_the_data(tmp_path):
    from library.data.config_checks import read_config_file
    from library.data.text_config import load_text_dataset_config

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(CHAT_ROW) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_config_file(data)
    toml = tmp_path / "data.toml"
    toml.write_text(_wrapping_toml(str(e.value)), encoding="utf-8")
    group = load_text_dataset_config(toml)
    assert group.datasets[0].subsets[0].messages_column == "messages"


def test_dataset_configs_are_still_read(tmp_path):
    from library.data.config_checks import read_config_file

    json_config = tmp_path / "data.json"
    json_config.write_text(json.dumps({"datasets": [{"subsets": [{"jsonl_file": "x.jsonl", "text_column": "text"}]}]}))
    assert read_config_file(json_config)[0]["datasets"][0]["subsets"][0]["text_column"] == "text"
    toml = tmp_path / "data.toml"
    toml.write_text('[[datasets]]\n  [[datasets.subsets]]\n  jsonl_file = "x.jsonl"\n', encoding="utf-8")
    assert read_config_file(toml)[0]["datasets"][0]["subsets"][0]["jsonl_file"] == "x.jsonl"


def test_the_trainer_stops_on_a_data_file_as_dataset_config(tmp_path, capsys, monkeypatch):
    import library.families
    import train_network
    from library.tiny_llm import save_tiny_llm

    monkeypatch.setattr(library.families, "load_family", lambda *a, **k: pytest.fail("the model was loaded"))
    model = save_tiny_llm(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(CHAT_ROW) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert train_network.main(["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data),
                               "--output_dir", str(out), "--max_train_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and 'messages_column = "messages"' in err and f'jsonl_file = "{data}"' in err
    assert not out.exists()


# --- #11: data-format rough edges -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from library.tiny_llm import tiny_bpe_tokenizer

    return tiny_bpe_tokenizer()


def _chat_dataset(tmp_path, tok, rows, column="messages", extra=""):
    from tests.test_llm_data import _dataset, _jsonl

    return _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "c.jsonl", rows)}"\n'
                    f'messages_column = "{column}"\n{extra}', tok=tok)


def _samples(dataset):
    return [(s.input_ids, s.labels) for s in dataset.train]


@pytest.mark.parametrize(("user", "assistant"), [("human", "gpt"), ("user", "chatgpt")])
def test_sharegpt_speaker_names_under_role_map_as_under_from(tmp_path, tok, user, assistant):
    openai = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    named = [{"messages": [{"role": user, "content": "hi"}, {"role": assistant, "content": "hello"}]}]
    assert _samples(_chat_dataset(tmp_path, tok, named)) == _samples(_chat_dataset(tmp_path, tok, openai))


def test_an_unknown_role_is_refused_with_file_and_line(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(UserError) as e:
        _chat_dataset(tmp_path, tok, rows)
    assert "c.jsonl:2" in str(e.value) and "role 'bot' is not one of system, user, assistant, tool" in str(e.value)


def test_trl_conversational_prompt_completion_rows_say_to_use_messages(tmp_path, tok):
    from tests.test_llm_data import _dataset, _jsonl

    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}]
    with pytest.raises(UserError) as e:
        _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "pc.jsonl", rows)}"\nprompt_column = "prompt"\n'
                 'response_column = "completion"', tok=tok)
    text = str(e.value)
    assert "pc.jsonl:1" in text and "holds chat turns" in text and 'messages_column = "messages"' in text, text
    assert "is list, expected str" not in text


def test_openai_tool_call_rows_are_refused_as_unsupported(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "weather?"},
                          {"role": "assistant", "content": None,
                           "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                          {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "sunny"}]}]
    with pytest.raises(UserError) as e:
        _chat_dataset(tmp_path, tok, rows)
    assert "c.jsonl:1" in str(e.value) and "messages[1] has tool_calls: tool calls are not supported" in str(e.value)


def test_a_jsonl_file_as_text_file_warns_once(tmp_path, caplog):
    import logging

    from library.data import text_config
    from tests.test_llm_data import _config, _jsonl

    data = _jsonl(tmp_path / "chat.jsonl", [{"text": "a"}])
    body = f'[[datasets]]\n[[datasets.subsets]]\ntext_file = "{data}"\n[[datasets.subsets]]\ntext_file = "{data}"\n'
    text_config._warned_json_text_files.discard(data.resolve())
    with caplog.at_level(logging.WARNING, logger="library.data.text_config"):
        _config(tmp_path, body)
        _config(tmp_path, body)
    warnings = [r.getMessage() for r in caplog.records if "raw JSON" in r.getMessage()]
    assert len(warnings) == 1 and str(data) in warnings[0] and f'jsonl_file = "{data}"' in warnings[0], warnings
    caplog.clear()
    plain = tmp_path / "corpus.txt"
    plain.write_text("some text\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="library.data.text_config"):
        _config(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\ntext_file = "{plain}"\n')
    assert not [r for r in caplog.records if "raw JSON" in r.getMessage()]


# --- #12: small message and cosmetic issues ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from library.tiny_llm import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm", seed=0)


def _chat_toml(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(CHAT_ROW) + "\n", encoding="utf-8")
    toml = tmp_path / "data.toml"
    toml.write_text(f'[[datasets]]\nmax_seq_length = 64\n  [[datasets.subsets]]\n  jsonl_file = "{data}"\n'
                    '  messages_column = "messages"\n', encoding="utf-8")
    return toml


@pytest.mark.parametrize("lr_args", [["--learning_rate", "0"], ["--learning_rate", "1e-4", "--unet_lr", "0"]])
def test_an_llm_learning_rate_of_0_does_not_mention_text_encoder_lr_as_a_fix(llm_dir, tmp_path, capsys, monkeypatch,
                                                                              lr_args):
    import library.families
    import train_network

    monkeypatch.setattr(library.families, "load_family", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert train_network.main(["--pretrained_model_name_or_path", str(llm_dir), "--dataset_config",
                               str(_chat_toml(tmp_path)), "--output_dir", str(out), "--max_train_steps", "1",
                               *lr_args]) == 2
    err = capsys.readouterr().err
    assert f"error: {' '.join(lr_args[-2:])}: the LLM's LoRA would train nothing" in err, err
    assert "Check --learning_rate, --unet_lr and --text_encoder_lr" not in err and "Traceback" not in err
    assert not out.exists()


def test_the_llm_check_leaves_diffusion_models_alone(tmp_path):
    import argparse

    from library.arg_checks import _is_llm

    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}", encoding="utf-8")
    for path, model_type in ((tmp_path / "sd", "auto"), (tmp_path / "missing", "auto"), (None, "auto"),
                             (tmp_path / "sd", "sdxl")):
        assert not _is_llm(argparse.Namespace(pretrained_model_name_or_path=path and str(path), model_type=model_type))
    assert _is_llm(argparse.Namespace(pretrained_model_name_or_path=None, model_type="llm"))


def test_show_labels_an_llm_adapters_modules_as_llm(tmp_path, capsys):
    from networks.peft_export import write_peft_adapter
    from tools import show

    model, network = _tiny_network()
    folder = write_peft_adapter(network, model, tmp_path / "adapter", "base")
    kohya = tmp_path / "adapter.safetensors"
    network.save_weights(kohya, None, {"ss_network_dim": "4"})
    for path in (folder, kohya):
        assert show.main([str(path), "--json", "--no_modules"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["family"] == "llm" and info["modules_by_prefix"] == {"llm": len(network.all_loras())}, path
    assert show.main([str(kohya), "--no_modules"]) == 0
    assert "'unet'" not in capsys.readouterr().out


def test_a_samples_first_token_is_not_marked_as_learnt():
    from library.data.text_preview import render_sample
    from library.tiny_llm import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer()
    ids = tok("the quick brown fox", add_special_tokens=False).input_ids
    assert render_sample(ids, list(ids), tok) == tok.decode(ids[:1]) + "⟦" + tok.decode(ids[1:]) + "⟧"
    labels = [-100] * 2 + ids[2:]  # a masked prompt: unchanged
    assert render_sample(ids, labels, tok) == tok.decode(ids[:2]) + "⟦" + tok.decode(ids[2:]) + "⟧"


def test_an_llm_files_metadata_leaves_out_diffusion_keys():
    from library.train_metadata import training_metadata
    from tests.test_metadata import _run_info

    switches = {"huber_c": 0.1, "huber_schedule": "snr", "multires_noise_discount": 0.3, "face_crop_aug_range": None,
                "max_grad_norm": 1.0, "gradient_checkpointing": True, "loss_type": "cross_entropy"}
    diffusion = ("ss_huber_c", "ss_huber_schedule", "ss_multires_noise_discount", "ss_prior_loss_weight", "ss_v2",
                 "ss_face_crop_aug_range", "ss_v_parameterization", "ss_text_encoder_lr", "ss_noise_offset")
    llm = training_metadata(_run_info(base_model_version="llm", switches=switches), 1, 1)
    assert not [k for k in diffusion if k in llm], [k for k in diffusion if k in llm]
    assert llm["ss_base_model_version"] == "llm" and llm["ss_max_grad_norm"] == "1.0"
    assert llm["ss_gradient_checkpointing"] == "True" and llm["ss_loss_type"] == "cross_entropy"
    assert llm["ss_learning_rate"] == "0.0001" and llm["ss_steps"] == "1"
    sd = training_metadata(_run_info(switches=switches), 1, 1)  # diffusion files keep sd-scripts' keys
    assert all(k in sd for k in diffusion)


def test_resume_to_a_peft_adapter_folder_points_at_network_weights(tmp_path):
    from library.checkpoint import find_resume_state

    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError) as e:
        find_resume_state(str(adapter), tmp_path, "lora")
    text = str(e.value)
    assert "not a complete training state folder" in text and f"--network_weights {adapter}" in text, text
    empty = tmp_path / "some-state"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        find_resume_state(str(empty), tmp_path, "lora")
    assert "--network_weights" not in str(e.value)
