"""library/network_setup.py: another package's failure as one clear error; empty --network_args."""

from __future__ import annotations

import pytest

from library.errors import UserError
from library.network_setup import network_args_dict, third_party_errors


def test_a_failure_inside_another_package_names_it_and_its_version():
    with pytest.raises(UserError) as e, third_party_errors("lycoris.kohya"):
        raise AssertionError("duplicated lora name: lora_unet_time_embedding_linear_1")
    message = str(e.value)
    assert "--network_module lycoris.kohya failed while building the network, inside lycoris" in message
    assert "AssertionError: duplicated lora name" in message and "preset=attn-mlp" in message


def test_this_projects_own_modules_keep_their_traceback():
    with pytest.raises(ZeroDivisionError), third_party_errors("networks.lora"):
        raise ZeroDivisionError


def test_empty_network_args_items_are_no_arguments():
    assert network_args_dict([""]) == {}  # the kohya_ss GUI writes network_args = ""
    assert network_args_dict(["conv_dim=4", " "]) == {"conv_dim": "4"}
    with pytest.raises(UserError, match="'conv_dim' is not key=value"):
        network_args_dict(["conv_dim"])


def test_out_of_memory_inside_another_package_stays_what_it_is():
    import torch

    with pytest.raises(torch.OutOfMemoryError), third_party_errors("lycoris.kohya"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_peft_folder_for_another_package_is_refused_clearly(tmp_path):
    from types import SimpleNamespace

    from library.network_setup import build_network

    args = SimpleNamespace(network_module="lycoris.kohya", network_args=None, network_weights=str(tmp_path))
    with pytest.raises(UserError, match="is a folder: a PEFT adapter folder is read by this toolkit's networks.lora"):
        build_network(args, family=None, log=print)


def test_peft_spellings_of_network_args():
    from networks.lora_args import parse_network_args

    assert parse_network_args({"target_modules": "all-linear"})["target_modules"] is None  # every Linear: default
    assert parse_network_args({"target_modules": "[q_proj, 'v_proj']"})["target_modules"] == ("q_proj", "v_proj")
    with pytest.raises(UserError, match="lora_dropout: PEFT's name; here .* is --network_dropout"):
        parse_network_args({"lora_dropout": "0.05"})


def test_an_sd_scripts_network_module_this_toolkit_lacks_says_so():
    from library.network_setup import import_network_module

    with pytest.raises(UserError, match="networks.dylora: cannot import it .*sd-scripts ships it, this toolkit "
                                        "does not: use networks.lora"):
        import_network_module("networks.dylora")
    with pytest.raises(UserError, match=r"no_such_module: cannot import it \(No module named 'no_such_module'\)\.$"):
        import_network_module("no_such_module")
