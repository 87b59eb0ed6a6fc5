"""Several runs in one --output_dir: each run's files, states and loss curve stay its own (resume audit F1-F5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train_inprocess import _data_toml, _run

from library.checkpoint import (
    STATE_MARKER,
    SavePlan,
    earlier_outputs,
    find_resume_state,
    read_state,
    saved_loss_curve,
    state_output_name,
)
from library.errors import UserError
from library.loss_curve import write_loss_curve


def _steps(csv: Path) -> list[str]:
    return [row.split(",")[0] for row in csv.read_text().strip().splitlines()[1:]]


def test_resume_latest_takes_this_runs_state_not_a_newer_one_of_another_name(tmp_path, tiny_sd_dir, tiny_images,
                                                                           capsys, caplog):  # fmt: skip
    data = _data_toml(tmp_path, tiny_images)
    out = tmp_path / "out"
    assert _run(tiny_sd_dir, data, out, "--output_name", "charA", "--max_train_steps", "4", "--save_state") == 0
    assert _run(tiny_sd_dir, data, out, "--output_name", "charB", "--max_train_steps", "2", "--save_state") == 0
    # charA's state (step 4) is the newest in the folder; charB continues from its own (step 2)
    assert find_resume_state("latest", out, "charB") == out / "charB-state"
    capsys.readouterr()
    assert _run(tiny_sd_dir, data, out, "--output_name", "charB", "--max_train_steps", "3", "--resume", "latest") == 0
    assert "the saved run's total was 2 optimizer steps, this run's is 3" in capsys.readouterr().out  # audit F7
    assert _steps(out / "charB_loss.csv") == ["1", "2", "3"]
    assert _steps(out / "charA_loss.csv") == ["1", "2", "3", "4"]
    assert json.loads((out / "charB-state" / STATE_MARKER).read_text())["output_name"] == "charB"
    # a run renamed on resume (CONTRACTS.md §4) continues the folder's newest state, and the log says whose
    assert find_resume_state("latest", out, "renamed") == out / "charA-state"
    assert "no state of a run named 'renamed'; continuing run 'charA' from charA-state" in caplog.text


def test_resuming_a_finished_state_trains_nothing(tmp_path, tiny_sd_dir, tiny_images, capsys):
    data = _data_toml(tmp_path, tiny_images)  # 4 steps per epoch: 3 steps end mid-epoch
    out = tmp_path / "out"
    assert _run(tiny_sd_dir, data, out, "--max_train_steps", "3", "--save_state") == 0
    before = load_file(str(out / "lora.safetensors"))
    capsys.readouterr()
    assert _run(tiny_sd_dir, data, out, "--max_train_steps", "3", "--resume", "latest") == 0
    assert "nothing left to train" in capsys.readouterr().out
    after = load_file(str(out / "lora.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _steps(out / "lora_loss.csv") == ["1", "2", "3"]


def _lora_file(path: Path, output_name: str) -> None:
    save_file({"x.lora_down.weight": torch.zeros(1, 2)}, str(path), {"ss_output_name": output_name})


def test_a_name_ending_in_digits_is_another_run_not_an_epoch_file(tmp_path):
    _lora_file(tmp_path / "mylora-240115.safetensors", "mylora-240115")  # a finished run of that name
    state = tmp_path / "mylora-240115-state"
    state.mkdir()
    (state / STATE_MARKER).write_text(json.dumps({"global_step": 2, "output_name": "mylora-240115"}))
    assert earlier_outputs(tmp_path, "mylora") == []  # a run named mylora leaves them alone
    assert state_output_name(state) == "mylora-240115"
    assert saved_loss_curve(state) == tmp_path / "mylora-240115_loss.csv"
    # mylora's own epoch file (its metadata says so) and a state written before names were recorded
    _lora_file(tmp_path / "mylora-000001.safetensors", "mylora")
    old = tmp_path / "mylora-000001-state"
    old.mkdir()
    (old / STATE_MARKER).write_text(json.dumps({"global_step": 1}))
    assert earlier_outputs(tmp_path, "mylora") == [tmp_path / "mylora-000001-state",
                                                   tmp_path / "mylora-000001.safetensors"]  # fmt: skip
    assert state_output_name(old, "mylora") == "mylora"


def test_an_output_name_with_a_dot_keeps_its_loss_curve_name(tmp_path):
    csv, png = write_loss_curve([(1, 0.5, 1e-4), (2, 0.4, 1e-4)], tmp_path / "style_v1.5_loss")
    assert (csv.name, png.name) == ("style_v1.5_loss.csv", "style_v1.5_loss.png") and csv.is_file() and png.is_file()


def test_save_last_n_steps_keeps_what_sd_scripts_keeps():
    # sd-scripts' get_remove_step_no: the files saved at step - N or later stay
    plan = SavePlan(Path("."), "lora", every_n_steps=2, last_n_steps=5)
    assert [plan.stale_step(s) for s in (2, 4, 6, 8, 10, 12)] == [None, None, None, 2, 4, 6]
    docs = SavePlan(Path("."), "lora", every_n_steps=10, last_n_steps=30)  # sd-scripts' documented example
    assert docs.stale_step(50) == 10  # 20, 30, 40, 50 stay
    # TRL's --save_total_limit 2 with --save_steps 50 maps to 2 x 50 - 1: exactly the last two saves stay
    trl = SavePlan(Path("."), "lora", every_n_steps=50, last_n_steps=99)
    assert [trl.stale_step(s) for s in (50, 100, 150, 200)] == [None, None, 50, 100]


def test_resuming_another_folders_state_never_writes_over_this_folders_run(tmp_path, tiny_sd_dir, tiny_images,
                                                                          capsys):  # fmt: skip
    """A state "possibly in another --output_dir" continues that run; a finished run of the same name in
    --output_dir is refused as for a new run, and set aside with --overwrite (resume audit F10)."""
    data = _data_toml(tmp_path, tiny_images)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert _run(tiny_sd_dir, data, run_a, "--max_train_steps", "1", "--save_state") == 0
    assert _run(tiny_sd_dir, data, run_b, "--max_train_steps", "1", "--seed", "9") == 0
    b_file = (run_b / "lora.safetensors").read_bytes()
    capsys.readouterr()
    resume = ["--max_train_steps", "2", "--resume", str(run_a / "lora-state")]
    assert _run(tiny_sd_dir, data, run_b, *resume) == 2
    assert f"{run_b} already holds a run named 'lora'" in capsys.readouterr().err
    assert (run_b / "lora.safetensors").read_bytes() == b_file
    assert _run(tiny_sd_dir, data, run_b, *resume, "--overwrite") == 0
    assert (run_b / "lora.replaced" / "lora.safetensors").read_bytes() == b_file
    assert _steps(run_b / "lora_loss.csv") == ["1", "2"]


def test_loss_per_epoch_after_a_resume_inside_the_epoch_counts_the_whole_epoch(tmp_path, tiny_sd_dir, tiny_images):
    """loss/epoch of the epoch a run was resumed in averaged only the steps after the resume (resume audit F8)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _data_toml(tmp_path, tiny_images)  # 4 steps per epoch

    def epoch_loss(out: Path, *extra: str) -> float:
        logs = out / "logs"
        assert _run(tiny_sd_dir, data, out, "--log_with", "tensorboard", "--logging_dir", str(logs), *extra) == 0
        values = []
        for events in logs.rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(events.parent))
            acc.Reload()
            if "loss/epoch" in acc.Tags()["scalars"]:
                values += [e.value for e in acc.Scalars("loss/epoch") if e.step == 4]
        assert len(values) == 1, values
        return values[0]

    straight = epoch_loss(tmp_path / "straight", "--max_train_steps", "4")
    split = tmp_path / "split"
    assert _run(tiny_sd_dir, data, split, "--max_train_steps", "2", "--save_state") == 0
    assert abs(epoch_loss(split, "--max_train_steps", "4", "--resume", "latest") - straight) < 1e-6


def test_a_state_folder_of_sd_scripts_is_named_not_a_traceback(tmp_path):
    state = tmp_path / "lora-state"
    state.mkdir()
    (state / STATE_MARKER).write_text(json.dumps({"current_epoch": 1, "current_step": 40}))  # sd-scripts' file
    for resume in (str(state), "latest"):
        with pytest.raises(UserError, match="written by sd-scripts.*--network_weights"):
            read_state(find_resume_state(resume, tmp_path, "lora"))
    (state / STATE_MARKER).write_text(json.dumps({"global_step": 3}))
    with pytest.raises(UserError, match="lacks epoch, batches_done_in_epoch"):
        read_state(state)


def test_a_changed_resume_setting_is_named_by_its_field_and_a_moved_model_is_no_change():
    from library.resume_check import check_resume_compatible

    saved = {"pretrained_model_name_or_path": "/data/models/tiny-sd",
             "dataset settings": [{"resolution": [64, 64], "subsets": [{"image_dir": "images", "num_repeats": 1}]}]}
    now = {"pretrained_model_name_or_path": "models/tiny-sd/",
           "dataset settings": [{"resolution": [64, 64], "subsets": [{"image_dir": "images6", "num_repeats": 1}]}]}
    with pytest.raises(UserError) as e:
        check_resume_compatible(saved, now, False, "lora-state")
    lines = [line for line in str(e.value).splitlines() if line.startswith("  ")]
    assert lines == ["  dataset settings[0].subsets[0].image_dir: saved 'images', now 'images6'"]


def test_rotation_also_removes_a_stops_step_saves_off_the_cadence(tmp_path):
    """A stop saves at the step it stopped (lora-step00000003 with a cadence of 5); rotation only ever computed
    multiples of the cadence, so those stayed forever (resume audit F11)."""
    plan = SavePlan(tmp_path, "lora", every_n_steps=5, last_n_steps=5)
    made = ["lora-step00000003.safetensors", "lora-step00000003", "lora-step00000003-state",
            "lora-step00000005.safetensors", "lora-step00000005-state", "lora-step00000010.safetensors",
            "lora-step00000010-state", "lora-stepper.safetensors", "lora2-step00000001.safetensors"]
    for name in made:
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("x")
    stale_model, stale_state = plan.stale_at_step(15)
    assert stale_model == "lora-step00000005"
    assert [p.name for p in plan.older_step_saves(stale_model, states=False)] == [
        "lora-step00000003", "lora-step00000003.safetensors", "lora-step00000005.safetensors"]
    assert [p.name for p in plan.older_step_saves(stale_state, states=True)] == [
        "lora-step00000003-state", "lora-step00000005-state"]
    assert plan.older_step_saves("lora-000002", states=False) == []  # epoch rotation is by cadence alone


def test_max_train_epochs_beside_max_train_steps_says_which_sets_the_length(tmp_path, tiny_sd_dir, tiny_images,
                                                                            capsys):  # fmt: skip
    data = _data_toml(tmp_path, tiny_images)  # 4 steps per epoch
    assert _run(tiny_sd_dir, data, tmp_path / "out", "--max_train_steps", "5", "--max_train_epochs", "1") == 0
    assert "--max_train_epochs 1 sets the length, 4 optimizer steps; --max_train_steps 5 is not used" in \
        capsys.readouterr().out
    assert _steps(tmp_path / "out" / "lora_loss.csv") == ["1", "2", "3", "4"]
