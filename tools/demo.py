"""The quick-start demo: a tiny SD model, a synthetic data set, a real LoRA training run.

Everything is built offline from configs in code, then trained exactly as a user would:
``accelerate launch train_network.py --config_file train.toml --dataset_config data.toml``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAIN_TOML = """\
# Training arguments (kohya names). CLI flags override these.
[model]
pretrained_model_name_or_path = "{model}"

[network]
network_module = "networks.lora"
network_dim = 8
network_alpha = 8.0

[optimisation]
learning_rate = 1e-3
optimizer_type = "AdamW"
lr_scheduler = "cosine"
lr_warmup_steps = 0.05
max_train_steps = {steps}
seed = 42
mixed_precision = "no"
cache_latents = true            # encode each image once: the VAE leaves the training step

[saving]
output_dir = "{output}"
output_name = "demo_lora"
save_every_n_steps = {save_every}
save_precision = "fp16"
overwrite = true                # the demo replaces its own earlier output (a real run is refused instead)

[logging]
logging_dir = "{logs}"
"""

DATA_TOML = """\
# Dataset (kohya schema): one DreamBooth-style subset with side-file captions.
[general]
caption_extension = ".caption"
shuffle_caption = false

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{images}"
  num_repeats = 2
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=str(ROOT / "demo_output"), help="where everything is written")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps to train")
    a = parser.parse_args()

    from library.tiny_models import save_tiny_sd, write_synthetic_images

    work = Path(a.workdir).resolve()
    model, images, output = work / "tiny-sd", work / "images", work / "output"
    if not (model / "model_index.json").is_file():
        print(f"building a tiny SD model in {model}")
        save_tiny_sd(model)
    if not images.is_dir():
        print(f"writing a synthetic data set in {images}")
        write_synthetic_images(images, count=8, size=64)
    train_toml, data_toml = work / "train.toml", work / "data.toml"
    train_toml.write_text(TRAIN_TOML.format(model=model, steps=a.steps, output=output,
                                            save_every=max(a.steps // 2, 1), logs=work / "logs"))
    data_toml.write_text(DATA_TOML.format(images=images))

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet",
           str(ROOT / "train_network.py"), "--config_file", str(train_toml), "--dataset_config", str(data_toml)]
    print("running:", " ".join(cmd[2:]))
    result = subprocess.run(cmd, env=env, cwd=ROOT)
    if result.returncode == 0:
        print(f"\nDemo finished. LoRA: {output / 'demo_lora.safetensors'}\n"
              f"Loss curve: {output / 'demo_lora_loss.png'}\nTensorBoard: tensorboard --logdir {work / 'logs'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
