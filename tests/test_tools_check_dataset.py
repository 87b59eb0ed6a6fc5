"""tools/check_dataset.py: the trainer's dataset checks and step arithmetic, without a model."""

from __future__ import annotations

import math

from PIL import Image

from library.tiny_models import write_synthetic_images
from tools import check_dataset


def write_toml(path, body: str):
    path.write_text(body, encoding="utf-8")
    return path


def test_report_counts_captions_buckets_and_steps(tmp_path, capsys):
    a = write_synthetic_images(tmp_path / "a", count=6, size=64, seed=0)
    b = write_synthetic_images(tmp_path / "b", count=3, size=64, seed=1)
    for cap in b.glob("*.caption"):
        cap.rename(cap.with_suffix(".txt"))  # wrong extension, rescued by class_tokens
    Image.new("RGB", (128, 64), (10, 20, 30)).save(a / "wide.png")
    (a / "wide.caption").write_text("wide", encoding="utf-8")
    toml = write_toml(
        tmp_path / "data.toml",
        f"""
[general]
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
resolution = 64
[[datasets]]
batch_size = 2
[[datasets.subsets]]
image_dir = "{a}"
num_repeats = 2
[[datasets.subsets]]
image_dir = "{b}"
class_tokens = "sks thing"
""",
    )
    code = check_dataset.main(["--dataset_config", str(toml), "--num_processes", "2",
                               "--gradient_accumulation_steps", "2", "--max_train_epochs", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "images: 7" in out and "captions (.caption): 7 found, 0 missing" in out
    assert "captions (.caption): 0 found, 3 missing" in out and ".txt (3)" in out and "'sks thing'" in out
    # samples: 6 square x2 + 3 square x1 = 15 in the square bucket; the wide image x2 = 2 in its own bucket
    assert "total 10 images, 17 samples per epoch" in out
    square = next(ln for ln in out.splitlines() if ln.strip().startswith("64x64"))
    assert square.split()[-2:] == ["9", "15"]
    # an optimizer step takes 2 per process x 2 processes x 2 accumulation = 8 samples of one bucket
    steps = math.ceil(15 / 8) + math.ceil(2 / 8)
    assert f"batches per process per epoch: {2 * steps}" in out  # whole accumulation groups only
    assert f"optimizer steps per epoch: {steps}" in out
    assert f"total: {3 * steps} steps = 3 epochs" in out
    assert "global batch: 2 per process x 2 processes x 2 accumulation = 8" in out


def test_problems_the_trainer_would_stop_on(tmp_path, capsys):
    a = write_synthetic_images(tmp_path / "a", count=4, size=64)
    for cap in a.glob("*.caption"):
        cap.rename(cap.with_suffix(".txt"))
    toml = write_toml(
        tmp_path / "data.toml", f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{a}"\n'
    )
    assert check_dataset.main(["--dataset_config", str(toml)]) == 1
    captured = capsys.readouterr()
    assert "0 found, 4 missing" in captured.out
    assert "trainer would stop" in captured.err and 'caption_extension = ".txt"' in captured.err

    b = write_synthetic_images(tmp_path / "b", count=3, size=64)
    (b / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    toml2 = write_toml(
        tmp_path / "d2.toml", f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{b}"\n'
    )
    assert check_dataset.main(["--dataset_config", str(toml2)]) == 1
    captured = capsys.readouterr()
    assert "corrupt image: " in captured.out and "img_001.png" in captured.out
    assert "--on_bad_image skip" in captured.err
    assert check_dataset.main(["--dataset_config", str(toml2), "--on_bad_image", "skip"]) == 0
    assert "total 2 images" in capsys.readouterr().out


def test_bad_toml_key_is_a_usage_error(tmp_path, capsys):
    toml = write_toml(tmp_path / "bad.toml", '[[datasets]]\nbatch_sise = 2\n[[datasets.subsets]]\nimage_dir = "x"\n')
    assert check_dataset.main(["--dataset_config", str(toml)]) == 2
    assert "batch_size" in capsys.readouterr().err  # the did-you-mean hint


def llm_toml(tmp_path, extra_subset: str = "") -> tuple:
    from library.tiny_llm import save_tiny_llm, write_tiny_llm_data

    files = write_tiny_llm_data(tmp_path / "data")
    chat = tmp_path / "data" / "chat.jsonl"
    assert chat.is_file(), files
    body = f"""
[general]
max_seq_length = 64
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  jsonl_file = "{chat}"
  messages_column = "messages"
  [[datasets.subsets]]
  text_file = "{tmp_path / "data" / "corpus.txt"}"
{extra_subset}"""
    return write_toml(tmp_path / "llm.toml", body), save_tiny_llm(tmp_path / "model")


def test_llm_dataset_toml_is_checked_with_the_llm_schema(tmp_path, capsys):
    toml, model = llm_toml(tmp_path)
    assert check_dataset.main(["--dataset_config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "LLM text data" in out and "(chat, 1 repeats): 5 rows, 0 bad" in out
    assert check_dataset.main(["--dataset_config", str(toml), "--pretrained_model_name_or_path", str(model)]) == 0
    out = capsys.readouterr().out
    assert "sequences of <= 64 tokens packed" in out and "optimizer steps per epoch:" in out


def test_llm_dataset_bad_rows_and_keys(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    toml, _ = llm_toml(tmp_path, f'  [[datasets.subsets]]\n  jsonl_file = "{bad}"\n  messages_column = "messages"\n')
    assert check_dataset.main(["--dataset_config", str(toml)]) == 1
    assert f"{bad}:1: 'messages' has no assistant message" in capsys.readouterr().err
    toml.write_text(toml.read_text(encoding="utf-8").replace("max_seq_length", "max_seq_len"), encoding="utf-8")
    assert check_dataset.main(["--dataset_config", str(toml)]) == 2
    assert "did you mean 'max_seq_length'" in capsys.readouterr().err


def test_fine_tuning_layout_with_in_json(tmp_path, capsys):
    import json

    folder = write_synthetic_images(tmp_path / "ft", count=3, size=64, seed=0)
    for cap in folder.glob("*.caption"):
        cap.unlink()  # captions come from the JSON only
    stems = sorted(p.stem for p in folder.glob("*.png"))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({s: {"caption": f"image {s}", "tags": "a, b"} for s in stems}), encoding="utf-8")
    code = check_dataset.main(["--train_data_dir", str(folder), "--in_json", str(meta), "--dataset_repeats", "2",
                               "--resolution", "64", "--max_train_epochs", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"captions: from {meta}" in out and "(training, 2 repeats)" in out
    assert "total 3 images, 6 samples per epoch" in out and "total: 6 steps = 1 epochs" in out

    # without --in_json the flat folder is refused, and the message names the other layout
    assert check_dataset.main(["--train_data_dir", str(folder), "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert "has no subfolders" in err and "--in_json" in err
    # --in_json alone is refused as the trainer refuses it
    assert check_dataset.main(["--in_json", str(meta)]) == 2
    assert "--in_json needs --train_data_dir" in capsys.readouterr().err


def test_a_json_llm_dataset_config_is_checked_as_an_llm_one(tmp_path, capsys):
    import json
    import tomllib

    toml, _ = llm_toml(tmp_path)
    as_json = tmp_path / "llm.json"
    as_json.write_text(json.dumps(tomllib.loads(toml.read_text(encoding="utf-8"))), encoding="utf-8")
    assert check_dataset.main(["--dataset_config", str(as_json)]) == 0
    assert "LLM text data" in capsys.readouterr().out


def test_an_llm_dataset_is_planned_as_the_trainer_plans_it(tmp_path, capsys):
    toml, model = llm_toml(tmp_path)
    assert check_dataset.main(["--dataset_config", str(toml), "--pretrained_model_name_or_path", str(model)]) == 0
    assert "= 3 epochs" in capsys.readouterr().out  # not kohya's 1600 steps: the trainer's LLM default


def test_llm_samples_are_shown_with_the_learnt_tokens_marked(tmp_path, capsys):
    toml, model = llm_toml(tmp_path)
    assert check_dataset.main(["--dataset_config", str(toml), "--pretrained_model_name_or_path", str(model)]) == 0
    out = capsys.readouterr().out
    chat = out[out.index("datasets[0].subsets[0] sample 1"):out.index("datasets[0].subsets[1] sample 1")]
    # the user turn is context, the assistant turn is learnt through its end-of-turn token
    body = chat.split("):\n", 1)[1]
    assert body.startswith("    <s><|user|>\n") and "⟦" not in body.split("<|assistant|>")[0]
    assert "<|assistant|>\n    ⟦the capital of france is paris.<|end|>\n    ⟧" in body
    text = out[out.index("datasets[0].subsets[1] sample 1"):]
    first = text.split("\n")[1]  # plain text: every token is learnt but the first, which nothing predicts
    assert not first.startswith("    ⟦") and "⟦" in first
    assert check_dataset.main(["--dataset_config", str(toml), "--pretrained_model_name_or_path", str(model),
                               "--show_samples", "0"]) == 0
    assert "sample 1" not in capsys.readouterr().out


def test_render_sample_marks_runs_and_elides_the_middle():
    from library.data.text_preview import render_sample
    from library.tiny_llm import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer()
    ids = tok("the sky is blue", add_special_tokens=False).input_ids
    labels = [-100] * 2 + ids[2:]
    assert render_sample(ids, labels, tok) == tok.decode(ids[:2]) + "⟦" + tok.decode(ids[2:]) + "⟧"
    long = render_sample(ids * 50, [-100] * len(ids) * 50, tok, limit=40)
    assert long.startswith(tok.decode(ids)[:20]) and " characters) … " in long and len(long) < 80


def test_render_sample_keeps_the_space_a_sentencepiece_decoder_drops_at_a_runs_start():
    # Llama 2 / Mistral / Gemma decode a run on its own without its leading space; the preview must not show
    # a missing separator that the data does not have
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from library.data.text_preview import render_sample

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    raw.train_from_iterator(["Question: what is two plus two? Answer: four five six"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    prompt = tok("Question: what is two plus two? Answer:", add_special_tokens=False).input_ids
    answer = tok(" four", add_special_tokens=False).input_ids
    assert tok.decode(answer) == "four"  # the trap: decoded alone, the space is gone
    rendered = render_sample(prompt + answer, [-100] * len(prompt) + answer, tok)
    assert rendered == "Question: what is two plus two? Answer:⟦ four⟧"


def test_command_line_validation_split_is_planned_as_the_trainer_plans_it(tmp_path, capsys):
    toml, model = llm_toml(tmp_path)
    argv = ["--dataset_config", str(toml), "--pretrained_model_name_or_path", str(model), "--show_samples", "0"]
    assert check_dataset.main(argv) == 0
    assert ", 0 validation samples" in capsys.readouterr().out
    assert check_dataset.main([*argv, "--validation_split", "0.5", "--validation_seed", "2"]) == 0
    summary = next(line for line in capsys.readouterr().out.splitlines() if "validation samples" in line)
    assert int(summary.split(", ")[-1].split(" validation samples")[0]) > 0, summary
    assert check_dataset.main([*argv, "--validation_split", "1"]) == 2
    assert "--validation_split 1.0: expected a fraction" in capsys.readouterr().err
