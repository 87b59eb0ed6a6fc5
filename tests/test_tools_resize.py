"""tools/resize.py: SVD rank reduction, dynamic ranks, metadata and hashes of the output."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from test_tools_common import KOHYA_META, pristine_pipe, random_network, state_deltas

from library.lora_files import read_metadata
from library.metadata import compute_sshs_hashes
from tools import resize


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A dim-8 LoRA (conv_dim 4) whose deltas have true rank 2 in every module, plus noise in one."""
    folder = tmp_path_factory.mktemp("resize")
    network = random_network(pristine_pipe(), dim=8, alpha=4.0, conv_dim=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in network.all_loras():  # up has rank 2: columns 2.. are combinations of the first two
            up = m.lora_up.weight.flatten(1)
            mix = torch.randn(2, up.shape[1] - 2, generator=gen)
            up[:, 2:] = up[:, :2] @ mix
    path = folder / "src.safetensors"
    meta = {
        **KOHYA_META,
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1.5"}),
    }
    network.save_weights(path, None, meta)
    return folder, path


def test_fixed_rank_keeps_exact_delta_when_rank_suffices(source, capsys):
    folder, path = source
    out = folder / "r2.safetensors"
    assert resize.main(["--model", str(path), "--save_to", str(out), "--new_rank", "2", "--new_conv_rank", "2"]) == 0
    report = capsys.readouterr().out
    assert "retained 100.000%" in report and "rank   8 -> 2" in report
    src, dst = safetensors.torch.load_file(path), safetensors.torch.load_file(out)
    assert set(dst) == set(src)
    assert all(v.shape[0] == 2 for k, v in dst.items() if k.endswith("lora_down.weight"))
    want, got = state_deltas(src), state_deltas(dst)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), name
        # alpha/rank ratio preserved: 4/8 (linear), 1.5/4 (conv)
        ratio = float(dst[f"{name}.alpha"]) / 2
        assert ratio == pytest.approx(float(src[f"{name}.alpha"]) / src[f"{name}.lora_down.weight"].shape[0])
    meta = read_metadata(str(out))
    assert meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == pytest.approx(1.0)
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    assert "resized from 8 to 2" in meta["ss_training_comment"]
    assert meta["sshs_model_hash"] == compute_sshs_hashes(dst, meta)[0]


def test_rank_1_loses_energy_and_reports_it(source, capsys):
    folder, path = source
    out = folder / "r1.safetensors"
    assert resize.main(["--model", str(path), "--save_to", str(out), "--new_rank", "1",
                        "--save_precision", "fp16"]) == 0  # fmt: skip
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "retained" in ln and "rank" in ln]
    retained = [float(ln.split("retained")[1].split("%")[0]) for ln in lines]
    assert retained and all(0 < r < 100 for r in retained)
    dst = safetensors.torch.load_file(out)
    assert {v.dtype for v in dst.values()} == {torch.float16}
    src = safetensors.torch.load_file(path)
    name = next(iter(state_deltas(src)))
    err = float((state_deltas(dst)[name] - state_deltas(src)[name]).norm() / state_deltas(src)[name].norm())
    line = next(ln for ln in lines if ln.startswith(name + " "))
    assert err == pytest.approx(float(line.split("error")[1].split()[0]), rel=2e-2, abs=1e-3)


def test_dynamic_sv_fro_picks_rank_2(source, capsys):
    folder, path = source
    out = folder / "dyn.safetensors"
    args = [
        "--model",
        str(path),
        "--save_to",
        str(out),
        "--new_rank",
        "8",
        "--dynamic_method",
        "sv_fro",
        "--dynamic_param",
        "0.999999",
    ]
    assert resize.main(args) == 0
    dst = safetensors.torch.load_file(out)
    assert {v.shape[0] for k, v in dst.items() if k.endswith("lora_down.weight")} == {2}
    assert read_metadata(str(out))["ss_network_dim"] == "Dynamic"
    # the output exists now: a second run refuses to overwrite it, --overwrite allows it
    assert resize.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert resize.main([*args, "--overwrite"]) == 0


def test_bad_dynamic_param_is_a_user_error(source, tmp_path, capsys):
    _, path = source
    code = resize.main(["--model", str(path), "--save_to", str(tmp_path / "x.safetensors"),
                        "--dynamic_method", "sv_fro", "--dynamic_param", "2"])  # fmt: skip
    assert code == 2 and "fraction" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_dora_file_is_refused_not_stripped(tmp_path, capsys):
    from test_tools_common import llm_adapter

    dora = llm_adapter(tmp_path, use_dora=True)
    out = tmp_path / "small.safetensors"
    assert resize.main(["--model", str(dora["kohya"]), "--save_to", str(out), "--new_rank", "2"]) == 2
    assert "DoRA adapter" in capsys.readouterr().err and not out.exists()



def test_resizes_a_ckpt_as_its_safetensors(source, tmp_path, capsys):
    folder, path = source
    ckpt = tmp_path / "src.ckpt"
    torch.save(safetensors.torch.load_file(path), ckpt)  # as train_network.py --save_model_as ckpt writes it
    outs = [tmp_path / "from_ckpt.safetensors", tmp_path / "from_st.safetensors"]
    for src, out in zip((ckpt, path), outs, strict=True):
        assert resize.main(["--model", str(src), "--save_to", str(out), "--new_rank", "2"]) == 0, capsys.readouterr()
    got, want = (state_deltas(safetensors.torch.load_file(o)) for o in outs)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_integer_alphas_do_not_turn_the_output_into_zeros(source, tmp_path):
    # diffusers' convert_state_dict_to_kohya stores alpha as int64, which safetensors writes first: the output
    # dtype must come from the weights, not from the first tensor in the file (that cast rounded all to 0).
    from tools import convert, merge

    _folder, path = source
    tensors = safetensors.torch.load_file(path)
    int_alpha = {k: (v.round().to(torch.int64) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    src = tmp_path / "int_alpha.safetensors"
    safetensors.torch.save_file(int_alpha, str(src), metadata=KOHYA_META)
    outputs = {"resized": (resize, ["--new_rank", "8", "--new_conv_rank", "4"]),
               "merged": (merge, ["--models", str(src), str(src), "--ratios", "0.5", "0.5"]),
               "converted": (convert, ["--to", "kohya"])}
    for name, (tool, extra) in outputs.items():
        out = tmp_path / f"{name}.safetensors"
        model = [] if tool is merge else ["--model", str(src)]
        assert tool.main([*model, "--save_to", str(out), *extra]) == 0, name
        written = safetensors.torch.load_file(out)
        assert all(v.is_floating_point() for k, v in written.items() if "lora_" in k), name
        got, want = state_deltas(written), state_deltas({k: v.float() for k, v in int_alpha.items()})
        assert all(torch.allclose(got[m], want[m], rtol=1e-4, atol=1e-6) for m in want), name
