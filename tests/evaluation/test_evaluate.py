import json

import pytest
import torch

from ldm.data.shapes import NOVEL_COMBINATIONS, combination
from ldm.evaluation import EvaluationConfig, FidelityPrompts, ProbeConfig, evaluate_model, train_probe
from ldm.evaluation.fidelity import GEOMETRIC, JUDGED, prompt_fidelity, sweep_point
from ldm.evaluation.probe import ATTRIBUTES, AttributeProbe, load_or_train_probe
from tests.pipeline.tiny_models import tiny_pipeline

TINY_PROBE = ProbeConfig(resolution=16, train_samples=256, heldout_samples=64, steps=20, batch_size=32)


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""


@pytest.mark.training
def test_the_probe_learns_to_read_rendered_shapes():
    _, accuracy = train_probe(ProbeConfig(resolution=16, train_samples=2000, heldout_samples=300, steps=300))
    assert set(accuracy) == set(ATTRIBUTES)
    assert accuracy["color"] > 0.8 and accuracy["background"] > 0.8  # chance is 1/8
    assert accuracy["shape"] > 0.5  # chance is 1/3; 16 px shapes are 2..5 px across


def test_a_saved_probe_is_reused_only_for_the_same_settings(tmp_path):
    probe, accuracy = load_or_train_probe(TINY_PROBE, tmp_path)
    again, same = load_or_train_probe(TINY_PROBE, tmp_path)
    assert same == accuracy
    assert all(torch.equal(a, b) for a, b in zip(probe.state_dict().values(), again.state_dict().values(), strict=True))
    (tmp_path / "probe.safetensors").unlink()  # a different config retrains rather than reading stale weights
    load_or_train_probe(ProbeConfig(**{**TINY_PROBE.__dict__, "seed": 1}), tmp_path)
    assert (tmp_path / "probe.safetensors").is_file()


def test_fidelity_scores_match_the_probes_reading():
    class Fixed(AttributeProbe):  # always says: a small red circle at the center on blue
        def predict(self, images):
            n = images.shape[0]
            said = {"shape": "circle", "color": "red", "background": "blue", "size": "small", "position": "center"}
            return {k: [v] * n for k, v in said.items()}

    prompts = FidelityPrompts(
        captions=["a", "b"],
        attributes=[
            {"shape": "circle", "color": "red", "background": "blue", "size": "large", "position": "center"},
            {"shape": "square", "color": "red", "background": "green", "size": "small", "position": "left"},
        ],
    )
    result = prompt_fidelity(tiny_pipeline(), Fixed(), prompts, sweep_point(2.0, 2))
    assert result["shape"] == 0.5 and result["color"] == 1.0 and result["background"] == 0.5
    assert result["size"] == 0.5 and result["position"] == 0.5 and result["all"] == 0.5
    assert result["seconds_per_image"] > 0


def test_evaluate_writes_every_table_and_says_what_is_unavailable(tmp_path):
    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    cfg = EvaluationConfig(
        num_prompts=3,
        autoencoder_images=8,
        bound_latents=2,
        guidance_scales=[1.0, 3.0],
        guidance_sweep_steps=2,
        ddim_steps=[2, 3],
        ddpm_steps=4,
        probe=TINY_PROBE,
    )
    out = tmp_path / "eval"
    metrics = evaluate_model(model, out, cfg)
    for name in ("metrics.json", "report.md", "fidelity_vs_guidance.png", "fidelity_vs_steps.png", "samples.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert [row["settings"]["guidance_scale"] for row in metrics["fidelity"]["guidance_sweep"]] == [1.0, 3.0]
    samplers = [
        (r["settings"]["sampler"], r["settings"]["num_inference_steps"]) for r in metrics["fidelity"]["step_sweep"]
    ]
    assert samplers == [("ddim", 2), ("ddim", 3), ("ddpm", 4)]
    assert metrics["distilled"] is False and "teacher_comparison" not in metrics
    novel = metrics["fidelity"]["compositional_guidance_sweep"]
    assert [row["settings"]["guidance_scale"] for row in novel] == [1.0, 3.0]
    assert (out / "compositional_fidelity_vs_guidance.png").is_file()
    for row in [*metrics["fidelity"]["guidance_sweep"], *novel]:
        assert set(row["accuracy"]) == {*JUDGED, GEOMETRIC, "all", "seconds_per_image"}
        assert all(0.0 <= row["accuracy"][k] <= 1.0 for k in (*JUDGED, GEOMETRIC))
    pathway = metrics["text_pathway"]
    assert {a: set(pathway[a]) for a in JUDGED} == {
        a: {"distance", "relative_distance", "probe", "chance"} for a in JUDGED
    }
    assert all(pathway[a]["distance"] > 0 for a in JUDGED)  # a random encoder tells every attribute apart a little
    assert set(metrics["autoencoder"]["probe_accuracy_on_reconstructions"]) == set(ATTRIBUTES)
    assert metrics["autoencoder"]["rfid"] is None and "Inception" in metrics["autoencoder"]["unavailable"]["rFID"]
    assert metrics["pretrained"]["clip_score"] is None and metrics["pretrained"]["fid"] is None
    assert metrics["bound"]["num_latents"] == 2 and metrics["bound"]["timesteps"] == 1000
    assert torch.isfinite(torch.tensor(metrics["bound"]["bits_per_dim"]))
    report = (out / "report.md").read_text()
    assert "| ddpm 1000" not in report and "ddpm 4 steps" in report
    assert "rFID unavailable" in report and "CLIP score unavailable" in report
    assert "### Novel combinations" in report
    assert "## Text pathway" in report and "| position |" in report and "position (pixels)" in report


@pytest.mark.parametrize(
    ("argument", "cuda", "expected"), [([], True, "cuda"), ([], False, "cpu"), (["--device", "cpu"], True, "cpu")]
)
def test_evaluate_runs_on_the_device_asked_for_or_the_gpu(tmp_path, monkeypatch, argument, cuda, expected):
    import ldm.evaluation
    from ldm.cli import main

    model = tiny_pipeline().save_pretrained(tmp_path / "model")
    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(ldm.evaluation, "evaluate_model", lambda model, out, cfg, device: devices.append(device))
    assert main(["evaluate", "--model", str(model), *argument]) == 0
    assert devices == [expected]


def test_evaluate_names_a_bad_device_before_any_work(tmp_path, capsys):
    from ldm.cli import main

    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--model", str(tmp_path / "missing"), "--device", "gpu0"])
    assert info.value.code == 2
    assert "ldm evaluate: error: --device: 'gpu0' is not a torch device" in capsys.readouterr().err


def test_compositional_prompts_name_only_combinations_left_out_of_training():
    heldout, novel = FidelityPrompts.heldout(40, 16), FidelityPrompts.compositional(40, 16)
    assert all(combination(a) in NOVEL_COMBINATIONS for a in novel.attributes)
    assert not any(combination(a) in NOVEL_COMBINATIONS for a in heldout.attributes)
    assert len(set(novel.captions)) == 40
