"""Sample images while training: schedule, reference names, PNG parameters, and no effect on
what is trained (a run with sampling is bit-identical to one without)."""

from __future__ import annotations

from train_runs import assert_same_training, make_dataset, train, write_config

from sdtrain.models.png import read_parameters


def test_sampling_does_not_perturb_training(cli, tmp_path):
    data = make_dataset(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# two prompts\nshs cat --d 5 --s 2 --w 64 --h 64\nred --s 2 --w 64 --h 64\n"
    )
    plain = write_config(
        tmp_path / "plain.toml",
        data,
        tmp_path / "plain",
        saving={"save_every_n_steps": None, "save_state": False},
    )
    sampled = write_config(
        tmp_path / "sampled.toml",
        data,
        tmp_path / "sampled",
        saving={"save_every_n_steps": None, "save_state": False},
    )
    text = sampled.read_text() + (
        f'[sample]\nsample_prompts = "{prompts}"\nsample_every_n_steps = 3\n'
        'sample_at_first = true\nsample_sampler = "euler_a"\n'
    )
    sampled.write_text(text)
    train(cli, plain)
    train(cli, sampled)
    assert_same_training(tmp_path / "plain", tmp_path / "sampled")

    names = sorted(p.name for p in (tmp_path / "sampled" / "sample").glob("*.png"))
    # at first (e000000), steps 3 and 6 (reference numbering), and the end (step 7)
    for num in ("e000000", "000003", "000006", "000007"):
        assert any(n.startswith(f"t_{num}_00_") and n.endswith("_5.png") for n in names), names
        assert any(n.startswith(f"t_{num}_01_") for n in names), names
        assert any(n.startswith(f"t_{num}_sheet_") for n in names), names
    first = next((tmp_path / "sampled" / "sample").glob("t_000003_00_*.png"))
    params = read_parameters(first)
    assert params.startswith("shs cat")
    assert "Seed: 5" in params and "Steps: 2" in params and "Size: 64x64" in params
