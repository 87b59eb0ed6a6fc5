"""Nothing lost: signals save a resumable state, NaN stops before writing, SIGKILL mid-save is harmless."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.errors import UserError
from library.loss_curve import read_loss_curve

ROOT = Path(__file__).resolve().parent.parent


def _data(tmp_path: Path, images: Path) -> Path:
    path = tmp_path / "data.toml"
    path.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = \"{images}\"\n")
    return path


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data), "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "4", "--seed", "1", "--cache_latents", *extra]


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {text!r}")



def _signal_a_run(argv: list[str], log: Path, when: str, sig: int, code: int, settle: float = 0.0) -> str:
    """Run train_network.py, send ``sig`` once ``when`` is in its output, check the exit code; the output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_network.py"), *argv],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for(proc, log, when)
            time.sleep(settle)
            proc.send_signal(sig)
            assert proc.wait(timeout=120) == code, log.read_text()[-3000:]
        finally:
            proc.kill()
    return log.read_text()

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_state_and_resume_continues(tmp_path, tiny_sd_dir, tiny_images, sig, code):
    out = tmp_path / "out"
    data = _data(tmp_path, tiny_images)
    text = _signal_a_run(_args(tiny_sd_dir, data, out, "--max_train_steps", "100000"), tmp_path / "log.txt",
                         "steps:", sig, code, settle=1.5)
    assert "--resume" in text and "Traceback" not in text
    states = list(out.glob("lora-step*-state"))
    assert len(states) == 1 and (states[0] / "train_state.json").is_file()
    step = int(states[0].name.split("step")[1].split("-")[0])
    assert (out / f"lora-step{step:08d}.safetensors").is_file()
    # the resumed run continues at the next step and finishes
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", str(step + 2),
                                    "--resume", "latest")) == 0
    rows = (out / "lora_loss.csv").read_text().strip().splitlines()
    # the curve keeps the interrupted run's steps and continues with the next ones
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, step + 3)]


def test_non_finite_loss_stops_without_writing(tmp_path, tiny_sd_dir, tiny_images, capsys):
    out = tmp_path / "out"
    # a huge SGD step makes the weights explode, so the second step's loss is not finite
    code = train_network.main(_args(tiny_sd_dir, _data(tmp_path, tiny_images), out, "--max_train_steps", "10",
                                    "--optimizer_type", "SGD", "--learning_rate", "1e38", "--max_grad_norm", "0",
                                    "--save_every_n_steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "non-finite" in err
    assert not (out / "lora.safetensors").exists()
    for saved in out.glob("*.safetensors"):  # files written before the failure are complete
        load_file(str(saved))


def test_resume_refuses_changed_settings(tmp_path, tiny_sd_dir, tiny_images, capsys):
    out = tmp_path / "out"
    data = _data(tmp_path, tiny_images)
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", "1", "--save_state")) == 0
    code = train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", "2", "--resume", "latest",
                                    "--learning_rate", "5e-3"))
    err = capsys.readouterr().err
    assert code == 2 and "learning_rate" in err and "--resume_allow_changes" in err
    # a state folder with a file missing is named, with the file, instead of a traceback
    broken = tmp_path / "broken-state"
    shutil.copytree(out / "lora-state", broken)
    (broken / "optimizer.bin").unlink()
    code = train_network.main(_args(tiny_sd_dir, data, tmp_path / "other", "--max_train_steps", "2",
                                    "--resume", str(broken)))
    err = capsys.readouterr().err
    assert code == 2 and "incomplete, optimizer.bin is missing" in err
    # resumed into another folder under another name, the loss curve still starts at step 1
    moved = tmp_path / "moved"
    assert train_network.main([*_args(tiny_sd_dir, data, moved, "--max_train_steps", "2", "--resume",
                                      str(out / "lora-state")), "--output_name", "other"]) == 0
    assert [s for s, _, _ in read_loss_curve(moved / "other_loss.csv", up_to=10)] == [1, 2]
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", "2", "--resume", "latest",
                                    "--learning_rate", "5e-3", "--resume_allow_changes")) == 0


_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from library.fileio import atomic_save_safetensors
tensors = {{f"t{{i}}": torch.full((256, 1024), float(i)) for i in range(48)}}  # ~48 MB
print("ready", flush=True)
while True:
    atomic_save_safetensors(tensors, {target!r}, {{"ss_note": "x"}})
"""


def test_sigkill_during_save_leaves_the_previous_file_loadable(tmp_path):
    target = tmp_path / "lora.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), target=str(target))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while not target.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # most likely in the middle of the next write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    loaded = load_file(str(target))
    assert len(loaded) == 48 and float(loaded["t47"][0, 0]) == 47.0
    # a killed writer may leave a hidden temporary file, never a partial file under a real name
    assert all(p.name == target.name or p.name.startswith(".") for p in tmp_path.iterdir())


def test_sigterm_to_accelerate_launch_reaches_training(tmp_path, tiny_sd_dir, tiny_images):
    """A scheduler stopping `accelerate launch` must not leave training running without a save."""
    out = tmp_path / "out"
    log = tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet", str(ROOT / "train_network.py"),
           *_args(tiny_sd_dir, _data(tmp_path, tiny_images), out, "--max_train_steps", "100000")]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for(proc, log, "steps:")
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)  # to the launcher only
            proc.wait(timeout=60)
            deadline = time.time() + 120
            while "--resume" not in log.read_text(errors="replace") and time.time() < deadline:
                time.sleep(0.2)
        finally:
            proc.kill()
    assert "--resume" in log.read_text(), log.read_text()[-3000:]
    assert len([p for p in out.glob("lora-step*-state") if (p / "train_state.json").is_file()]) == 1


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, tiny_sd_dir, tiny_images, capsys, monkeypatch):
    import library.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "free_bytes", lambda folder: 1024)
    out = tmp_path / "out"
    code = train_network.main(_args(tiny_sd_dir, _data(tmp_path, tiny_images), out, "--max_train_steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "Not enough disk space" in err and str(out) in err
    assert not list(out.glob("*.safetensors"))


def test_git_lfs_pointer_and_truncated_files_are_named(tmp_path, tiny_sd_dir):
    import shutil

    from library.errors import UserError
    from library.families import load_family

    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    weights = next((model / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_family("sd", str(model))
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(UserError, match="git-lfs pointer"):
        load_family("sd", str(model))


@pytest.mark.parametrize("cached", [False, True])
def test_nan_latents_name_the_image(tmp_path, tiny_sd_dir, tiny_images, capsys, monkeypatch, cached):
    from library.families import diffusion_parts

    real = diffusion_parts.encode_latents

    def poisoned(vae, images, seed, epoch, indices):
        latents = real(vae, images, seed, epoch, indices)
        if len(indices) > 1:
            raise diffusion_parts.NonFiniteLatents([1])
        return latents

    monkeypatch.setattr(diffusion_parts, "encode_latents", poisoned)
    import library.families.sd as sd

    monkeypatch.setattr(sd, "encode_latents", poisoned)
    args = _args(tiny_sd_dir, _data(tmp_path, tiny_images), tmp_path / "out", "--max_train_steps", "2",
                 "--vae_batch_size", "2")
    if not cached:
        args.remove("--cache_latents")
    assert train_network.main(args) == 2
    err = capsys.readouterr().err
    assert "NaN/inf latents" in err and ".png" in err and str(tiny_images) in err
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_decompression_bomb_is_listed_not_opened(tmp_path, tiny_sd_dir, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 50, 0, 0)).save(images / f"ok{i}.png")
        (images / f"ok{i}.caption").write_text("ok")
    Image.new("1", (20000, 20000)).save(images / "bomb.png")  # 400 Mpx: beyond Pillow's safety limit
    (images / "bomb.caption").write_text("bomb")
    out = tmp_path / "out"
    code = train_network.main(_args(tiny_sd_dir, _data(tmp_path, images), out, "--max_train_steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "bomb.png" in err and "--on_bad_image skip" in err
    assert train_network.main(_args(tiny_sd_dir, _data(tmp_path, images), out, "--max_train_steps", "1",
                                    "--on_bad_image", "skip")) == 0


def test_sigkill_at_any_moment_leaves_a_resumable_run(tmp_path, tiny_sd_dir, tiny_images):
    """Killed while saving model files and state folders every step: the last complete state resumes."""
    out = tmp_path / "out"
    data = _data(tmp_path, tiny_images)
    log = tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_network.py"),
                                 *_args(tiny_sd_dir, data, out, "--max_train_steps", "100000",
                                        "--save_every_n_steps", "1", "--save_state")],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + 120
            while len(list(out.glob("lora-step*-state"))) < 2 and time.time() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.05)
            time.sleep(0.37)  # somewhere inside the next save or step
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
    for saved in out.glob("lora-step*.safetensors"):
        load_file(str(saved))  # every file under a real name is complete
    complete = [p for p in out.glob("lora-step*-state") if (p / "train_state.json").is_file()]
    assert complete
    last = max(int(p.name.split("step")[1].split("-")[0]) for p in complete)
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", str(last + 1),
                                    "--save_every_n_steps", "1", "--save_state", "--resume", "latest")) == 0
    rows = (out / "lora_loss.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]][-1] == last + 1


def test_a_config_with_zero_steps_is_an_error(tmp_path, tiny_sd_dir, tiny_images, capsys):
    code = train_network.main(_args(tiny_sd_dir, _data(tmp_path, tiny_images), tmp_path / "out" / "sub",
                                    "--max_train_steps", "0"))
    assert code == 2 and "--max_train_steps 0: optimizer steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # the folders the failed run created are gone again


def test_a_failed_run_keeps_a_folder_the_user_made(tmp_path, tiny_images, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = train_network.main(_args(tmp_path / "no_model", _data(tmp_path, tiny_images), out / "run"))
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # run/ removed, the user's file untouched


def test_sigterm_to_a_two_process_launch_saves_once_and_resumes(tmp_path, tiny_sd_dir, tiny_images,
                                                                  free_port):
    """Two processes (gloo on CPU, torchrun's agent): a SIGTERM to the launcher stops both at one step.

    The agent forwards the signal to its workers (and PR_SET_PDEATHSIG covers a launcher that dies); the
    stop flag is all-reduced, so both finish the same step, the main process writes one state, and a
    resume from it continues.
    """
    out = tmp_path / "out"
    log = tmp_path / "log.txt"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port), "--quiet", str(ROOT / "train_network.py"),
           *_args(tiny_sd_dir, _data(tmp_path, tiny_images), out, "--max_train_steps", "100000")]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            _wait_for(proc, log, "steps:", timeout=240)
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)  # to the launcher only
            proc.wait(timeout=120)
        finally:
            proc.kill()
    text = log.read_text(errors="replace")
    assert "--resume" in text, text[-3000:]
    states = [p for p in out.glob("lora-step*-state") if (p / "train_state.json").is_file()]
    assert len(states) == 1, text[-3000:]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    step = int(states[0].name.split("step")[1].split("-")[0])
    # the state resumes (in one process: the global batch differs, so the change must be allowed)
    assert train_network.main(_args(tiny_sd_dir, _data(tmp_path, tiny_images), out, "--resume", str(states[0]),
                                    "--max_train_steps", str(step + 1), "--resume_allow_changes")) == 0
    assert (out / "lora.safetensors").is_file()


def test_a_new_run_does_not_write_over_an_earlier_one(tmp_path, tiny_sd_dir, tiny_images, capsys):
    data = _data(tmp_path, tiny_images)
    out = tmp_path / "out"
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", "1")) == 0
    first = (out / "lora.safetensors").read_bytes()
    capsys.readouterr()
    # the same command again (e.g. after changing a setting): refused before anything loads
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", "2", "--learning_rate", "1")) == 2
    err = capsys.readouterr().err
    assert "already holds a run named 'lora'" in err and "lora.safetensors" in err
    assert "--resume latest" in err and "--output_name" in err and "--overwrite" in err
    assert (out / "lora.safetensors").read_bytes() == first
    # another name trains beside it; --overwrite replaces it
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", "1", "--output_name", "b")) == 0
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", "2", "--learning_rate", "1",
                                    "--overwrite")) == 0
    assert (out / "lora.safetensors").read_bytes() != first and (out / "b.safetensors").is_file()


def test_overwrite_sets_the_earlier_run_aside(tmp_path, tiny_sd_dir, tiny_images):
    data = _data(tmp_path, tiny_images)
    out = tmp_path / "out"
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", "2", "--save_every_n_steps", "1",
                                    "--save_state")) == 0
    earlier = sorted(p.name for p in out.iterdir() if p.name.startswith("lora"))
    assert "lora-step00000001.safetensors" in earlier and "lora-step00000001-state" in earlier
    # an --overwrite run that stops on bad input leaves the earlier run where it was
    bad = tmp_path / "bad.toml"
    bad.write_text(data.read_text().replace("batch_size", "batch_sise"))
    assert train_network.main(_args(tiny_sd_dir, bad, out, "--max_train_steps", "1", "--overwrite")) == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("lora")) == earlier
    assert train_network.main(_args(tiny_sd_dir, data, out, "--max_train_steps", "1", "--overwrite")) == 0
    # nothing of the earlier run is left to mix with the new one (or to be found by --resume latest) ...
    assert not list(out.glob("lora-step*")) and (out / "lora.safetensors").is_file()
    # ... and nothing is lost: it waits in lora.replaced/ until the next --overwrite
    assert sorted(p.name for p in (out / "lora.replaced").iterdir()) == earlier



def test_the_earlier_runs_samples_are_refused_and_set_aside_with_it(tmp_path):
    """A run that crashed after --sample_at_first left only samples; they are that run's output too."""
    from library.checkpoint import refuse_to_replace, set_aside_earlier_run

    out = tmp_path / "out"
    (out / "sample").mkdir(parents=True)
    made = ["lora_000000_00_7.png", "lora_000004_01_8.png", "lora_000004.txt"]
    for name in [*made, "lora2_000000_00_7.png", "my_notes.txt"]:  # another run's sample, a user's file
        (out / "sample" / name).write_text("x")
    with pytest.raises(UserError, match=r"already holds a run named 'lora' \(sample/lora_000000_00_7.png, "):
        refuse_to_replace(out, "lora", False, False)
    aside, moved, deleted = set_aside_earlier_run(out, "lora")
    assert moved == 3 and sorted(p.name for p in (aside / "sample").iterdir()) == sorted(made) and not deleted
    assert sorted(p.name for p in (out / "sample").iterdir()) == ["lora2_000000_00_7.png", "my_notes.txt"]
    (out / "sample" / made[0]).write_text("y")  # the next run's sample, replaced in turn: the first set-aside goes
    assert set_aside_earlier_run(out, "lora")[1:] == (1, True)


def test_states_saved_with_fewer_dataset_fields_still_resume():
    """Dataset metadata gains fields over versions (img_count, augmentation, ...): a state saved before compares
    the fields it has; tag counts and buckets stay out of the fingerprint (content and settings cover them)."""
    from library.args import build_parser
    from library.resume_check import check_resume_compatible, training_fingerprint

    args = build_parser().parse_args(["--output_dir", "x"])

    def fingerprint(datasets):
        return training_fingerprint(args, seed=1, batch_size=1, num_processes=1, accumulation=1, data="d",
                                    datasets=datasets)

    old = fingerprint([{"resolution": [64, 64], "subsets": [{"image_dir": "a", "num_repeats": 1}]}])
    new_entry = {"resolution": [64, 64], "tag_frequency": {"a": {"cat": 3}}, "bucket_info": {"buckets": {}},
                 "min_bucket_reso": None, "subsets": [{"image_dir": "a", "num_repeats": 1, "img_count": 8}]}
    new = fingerprint([new_entry])
    assert "tag_frequency" not in new["datasets"][0] and "bucket_info" not in new["datasets"][0]
    assert check_resume_compatible(old, new, False, "s") == []
    changed = fingerprint([{**new_entry, "subsets": [{"image_dir": "a", "num_repeats": 2, "img_count": 8}]}])
    with pytest.raises(UserError, match="datasets"):  # a field both know still counts
        check_resume_compatible(old, changed, False, "s")


def test_a_forced_model_type_that_the_model_contradicts_is_refused_before_loading(tmp_path, tiny_sd_dir,
                                                                                  tiny_images, capsys):
    import sdxl_train_network

    data, out = _data(tmp_path, tiny_images), tmp_path / "out"
    assert train_network.main(_args(tiny_sd_dir, data, out, "--model_type", "llm")) == 2
    assert f"--model_type llm, but {tiny_sd_dir} is an SD 1.x/2.x model" in capsys.readouterr().err
    assert sdxl_train_network.main(_args(tiny_sd_dir, data, out)) == 2
    err = capsys.readouterr().err
    assert "--model_type sdxl (sdxl_train_network.py sets it; use train_network.py)" in err
    assert "leave --model_type out" in err and not out.exists()
    assert train_network.main(_args(tiny_sd_dir, data, out, "--model_type", "sd", "--max_train_steps", "1")) == 0

def test_a_dataset_toml_typo_is_reported_before_the_model_loads(tmp_path, tiny_sd_dir, tiny_images, capsys,
                                                                 monkeypatch):
    import library.families

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset TOML was checked")

    monkeypatch.setattr(library.families, "load_family", no_load)
    bad = tmp_path / "bad.toml"
    bad.write_text(_data(tmp_path, tiny_images).read_text().replace("batch_size", "batch_sise"))
    assert train_network.main(_args(tiny_sd_dir, bad, tmp_path / "out", "--max_train_steps", "1")) == 2
    assert "batch_sise" in capsys.readouterr().err


def test_fp16_loss_scaler_overflows_skip_steps_instead_of_stopping(tmp_path, tiny_sd_dir, tiny_images, monkeypatch):
    """On CUDA, fp16 brings a GradScaler that starts high on purpose: its first steps overflow and are skipped.
    accelerate builds one only on CUDA, so one is attached here as accelerate does (same wiring)."""
    import library.accelerator

    real = library.accelerator.prepare_accelerator
    scalers = []

    def with_scaler(settings):
        accelerator = real(settings)
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows the first steps
        scalers.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(train_network, "prepare_accelerator", with_scaler)
    out = tmp_path / "out"
    assert train_network.main(_args(tiny_sd_dir, _data(tmp_path, tiny_images), out, "--max_train_steps", "4",
                                    "--mixed_precision", "fp16", "--network_train_unet_only")) == 0
    assert scalers[0].get_scale() < 2.0**40  # it backed off instead of the run stopping
    weights = load_file(str(out / "lora.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_resume_to_a_missing_path_or_a_file_says_so(tmp_path):
    from library.checkpoint import find_resume_state

    with pytest.raises(UserError, match="nope does not exist; give a state folder"):
        find_resume_state(str(tmp_path / "nope"), tmp_path, "lora")
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file; give the run's state folder .* --network_weights"):
        find_resume_state(str(lora), tmp_path, "lora")
    with pytest.raises(UserError, match="not a complete training state folder"):
        find_resume_state(str(tmp_path), tmp_path, "lora")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_model_loads_stops_cleanly(tmp_path, tiny_sd_dir, tiny_images, sig, code):
    """Before the loop's own handler is installed, SIGTERM killed the process where it stood (leaving the empty
    --output_dir it had made) and Ctrl-C printed a KeyboardInterrupt traceback."""
    out = tmp_path / "out"
    text = _signal_a_run(_args(tiny_sd_dir, _data(tmp_path, tiny_images), out, "--max_train_steps", "5"),
                         tmp_path / "log.txt", "Effective accelerate settings", sig, code)  # before the model loads
    assert f"Stopped by {signal.Signals(sig).name}" in text and "Traceback" not in text
    assert not out.exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--train_batch_size", "0"], "--train_batch_size 0: images per process and step must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: micro-batches must be at least 1"),
    (["--network_dim", "0"], "--network_dim 0: the rank must be at least 1"),
    (["--learning_rate", "-1"], "--learning_rate -1.0: a learning rate must be at least 0"),
    (["--text_encoder_lr", "0.0001", "-0.0001"], "--text_encoder_lr [0.0001, -0.0001]: a learning rate"),
    (["--max_train_steps", "0"], "--max_train_steps 0: optimizer steps must be at least 1"),
    (["--full_bf16", "--mixed_precision", "no"], "--full_bf16 keeps the LoRA in bf16, which needs"),
    (["--min_snr_gamma", "-5"], "--min_snr_gamma -5.0: gamma must be above 0"),  # a negative loss: ascent
    (["--prior_loss_weight", "-1"], "--prior_loss_weight -1.0: a loss weight must be at least 0"),
    (["--caption_dropout_rate", "1.5"], "--caption_dropout_rate 1.5: a probability must be from 0 to 1"),
    (["--network_dropout", "1"], "--network_dropout 1.0: a dropout probability must be from 0 to below 1"),
    (["--keep_tokens", "-1"], "--keep_tokens -1: a number of tags must be at least 0"),
    (["--clip_skip", "0"], "--clip_skip 0: a layer count from the end must be at least 1"),
    (["--min_timestep", "500", "--max_timestep", "500"], "so 0 <= min < max <= 1000"),  # was a crash at step 1
    (["--min_timestep", "1000"], "--min_timestep 1000 / --max_timestep None"),
    (["--max_timestep", "1200"], "so 0 <= min < max <= 1000"),
    (["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs is for SDXL"),  # an SD model
])
def test_numbers_out_of_range_stop_before_the_model_loads(tmp_path, tiny_sd_dir, tiny_images, capsys, monkeypatch,
                                                          extra, message):
    import library.families

    monkeypatch.setattr(library.families, "load_family", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert train_network.main(_args(tiny_sd_dir, _data(tmp_path, tiny_images), out, *extra)) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("problem, message", [
    ("caption", 'have no caption file ".caption"'),
    ("image", "unreadable image(s)"),
])
def test_caption_and_image_problems_stop_before_the_model_loads(tmp_path, tiny_sd_dir, tiny_images, capsys,
                                                                 monkeypatch, problem, message):
    import shutil

    import library.families

    images = tmp_path / "images"
    shutil.copytree(tiny_images, images)
    if problem == "caption":
        next(images.glob("*.caption")).unlink()
    else:
        next(images.glob("*.png")).write_bytes(b"not an image")
    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{images}"\n'
                    'caption_extension = ".caption"\n')
    monkeypatch.setattr(library.families, "load_family", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert train_network.main(_args(tiny_sd_dir, data, out)) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_states_saved_before_newer_dataset_options_still_resume_unless_one_is_on():
    """A state's "dataset settings" lacks the options added after it was saved (enable_wildcard, alpha_mask, ...):
    off, they change nothing; on, they are a change the saved run could not have had."""
    import dataclasses

    from library.dataset_config import DatasetConfig, SubsetConfig
    from library.resume_check import check_resume_compatible, dataset_settings

    config = DatasetConfig(subsets=(SubsetConfig(image_dir=Path("img")),))
    now = {"dataset settings": dataset_settings([config])}
    old = {"dataset settings": dataset_settings([config])}
    old["dataset settings"][0].pop("skip_image_resolution")
    for key in ("secondary_separator", "enable_wildcard", "alpha_mask", "conditioning_data_dir"):
        old["dataset settings"][0]["subsets"][0].pop(key)
    assert check_resume_compatible(old, now, False, "s") == []
    wildcard = DatasetConfig(subsets=(dataclasses.replace(config.subsets[0], enable_wildcard=True),))
    with pytest.raises(UserError, match="dataset settings"):
        check_resume_compatible(old, {"dataset settings": dataset_settings([wildcard])}, False, "s")


def test_newer_loss_options_are_compared_on_resume_and_old_states_resume():
    from library.args import build_parser
    from library.resume_check import check_resume_compatible, training_fingerprint

    def fingerprint(*extra):
        args = build_parser().parse_args(["--output_dir", "x", *extra])
        return training_fingerprint(args, seed=1, batch_size=1, num_processes=1, accumulation=1, data="d",
                                    datasets=[])

    plain = fingerprint()
    assert "v_pred_like_loss" not in plain and "masked_loss" not in plain  # what older states hold
    for extra in (["--v_pred_like_loss", "0.1"], ["--masked_loss"], ["--weighted_captions"],
                  ["--noise_offset", "0.1", "--adaptive_noise_scale", "0.01"]):
        with pytest.raises(UserError, match=extra[-1].lstrip("-") if extra[-1].startswith("--") else extra[-2][2:]):
            check_resume_compatible(plain, fingerprint(*extra), False, "s")


def test_clip_skip_past_the_text_encoders_depth_is_refused_when_the_model_loads(tiny_sd_dir):
    from library.families import load_family

    with pytest.raises(UserError, match=r"--clip_skip 9: the text encoder has \d+ layers; use 1"):
        load_family("sd", str(tiny_sd_dir), clip_skip=9)  # was an IndexError at the first step
    assert load_family("sd", str(tiny_sd_dir), clip_skip=2).clip_skip == 2


def test_v2_on_an_sd1_model_is_refused(tiny_sd_dir, monkeypatch):
    # --v2 would label the LoRA SD 2 (ss_base_model_version, modelspec), which A1111 uses to hide it on SD 1.x
    from transformers import CLIPTextModel

    from library.families import load_family

    original = CLIPTextModel.from_pretrained.__func__

    def sd1_width(cls, *args, **kwargs):  # the tiny encoder, reporting SD 1.x's CLIP ViT-L width
        model = original(cls, *args, **kwargs)
        model.config.hidden_size = 768
        return model

    monkeypatch.setattr(CLIPTextModel, "from_pretrained", classmethod(sd1_width))
    with pytest.raises(UserError, match="--v2 says .* is SD 2.x, but its text encoder is SD 1.x's"):
        load_family("sd", str(tiny_sd_dir), v2=True)
    assert not load_family("sd", str(tiny_sd_dir)).v2


def test_a_wrong_train_data_dir_layout_stops_before_the_model_loads(tmp_path, tiny_sd_dir, tiny_images, capsys,
                                                                    monkeypatch):
    import shutil

    import library.families

    flat = tmp_path / "10_sks dog"  # the N_name folder itself given, not its parent
    shutil.copytree(tiny_images, flat)
    monkeypatch.setattr(library.families, "load_family", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--train_data_dir", str(flat), "--output_dir",
            str(out), "--resolution", "64", "--max_train_steps", "1"]
    assert train_network.main(argv) == 2
    assert "no N_name subfolder" in capsys.readouterr().err and not out.exists()
