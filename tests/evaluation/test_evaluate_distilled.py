"""`ldm evaluate` on a consistency-distilled folder (its U-Net takes the guidance scale, time_cond_proj_dim): swept
with sampler lcm (guidance at its default steps, steps 1/2/4/8), no variational bound, and with --teacher its step
rows beside the teacher's DDIM 50 and DPM-Solver++(2M) 15 rows, each with U-Net evaluations and seconds per image.

The student is the tiny random teacher's U-Net given a (zero) guidance-embedding input, as `ldm distill` starts it.
"""

import json
import re

import pytest

import ldm.evaluation
from ldm.cli import main
from ldm.evaluation import EvaluationConfig, evaluate_model
from ldm.evaluation.distilled import unet_evaluations_per_image
from ldm.evaluation.fidelity import JUDGED, sweep_point
from ldm.generation import LatentDiffusionPipeline, SamplingDefaults
from ldm.training.distill_stage import student_unet
from tests.evaluation.test_evaluate import TINY_PROBE
from tests.pipeline.tiny_models import tiny_pipeline

STUDENT_DEFAULTS = SamplingDefaults(guidance_scale=3.0, num_inference_steps=2, sampler="lcm")


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""


def distilled(teacher: LatentDiffusionPipeline) -> LatentDiffusionPipeline:
    student = student_unet(teacher.unet, 16)
    return LatentDiffusionPipeline(teacher.vae, teacher.text_encoder, student, teacher.noise_schedule, STUDENT_DEFAULTS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(teacher folder, distilled student folder)."""
    root = tmp_path_factory.mktemp("distilled")
    teacher = tiny_pipeline()
    return teacher.save_pretrained(root / "teacher"), distilled(teacher).save_pretrained(root / "student")


def test_a_distilled_folder_is_swept_with_lcm_and_set_beside_its_teacher(folders, tmp_path):
    teacher, student = folders
    cfg = EvaluationConfig(
        num_prompts=3, autoencoder_images=8, bound_latents=2, guidance_scales=[1.0, 3.0], probe=TINY_PROBE,
        teacher=str(teacher),
    )  # fmt: skip
    out = tmp_path / "eval"
    metrics = evaluate_model(student, out, cfg)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["distilled"] is True
    fidelity = metrics["fidelity"]

    def settings(rows):
        return [(r["settings"]["sampler"], r["settings"]["num_inference_steps"], r["settings"]["guidance_scale"])
                for r in rows]  # fmt: skip

    # Guidance: lcm at the folder's default steps (not DDIM 50); steps: lcm 1/2/4/8 at its default w (no DDPM).
    assert settings(fidelity["guidance_sweep"]) == [("lcm", 2, 1.0), ("lcm", 2, 3.0)]
    assert settings(fidelity["compositional_guidance_sweep"]) == [("lcm", 2, 1.0), ("lcm", 2, 3.0)]
    assert settings(fidelity["step_sweep"]) == [("lcm", n, 3.0) for n in (1, 2, 4, 8)]
    assert fidelity["steps_beyond_schedule"] == []
    assert set(metrics["bound"]) == {"not_applicable"} and "consistency-distilled" in metrics["bound"]["not_applicable"]

    comparison = metrics["teacher_comparison"]
    assert comparison["teacher"] == str(teacher) and comparison["guidance_scale"] == 3.0
    rows = comparison["rows"]
    assert [(r["model"], *s[:2]) for r, s in zip(rows, settings(rows), strict=True)] == [
        ("student", "lcm", 1), ("student", "lcm", 2), ("student", "lcm", 4), ("student", "lcm", 8),
        ("teacher", "ddim", 50), ("teacher", "dpmpp_2m", 15),
    ]  # fmt: skip
    assert all(s[2] == 3.0 for s in settings(rows))  # one guidance scale for every row
    # One U-Net evaluation per lcm step; the teacher runs classifier-free guidance at w = 3: two per step.
    assert [r["unet_evaluations_per_image"] for r in rows] == [1, 2, 4, 8, 100, 30]
    assert all(r["accuracy"]["seconds_per_image"] > 0 for r in rows)
    assert all(0.0 <= r["accuracy"][k] <= 1.0 for r in rows for k in JUDGED)
    assert rows[:4] == [{"model": "student", **r, "unet_evaluations_per_image": n}
                        for r, n in zip(fidelity["step_sweep"], (1, 2, 4, 8), strict=True)]  # fmt: skip

    report = (out / "report.md").read_text()
    assert "### Against the teacher" in report and "same run on the same machine" in report
    assert "| model, setting | U-Net evaluations / image |" in report
    assert "| teacher, ddim 50 steps, w=3 | 100 |" in report and "| student, lcm 4 steps, w=3 | 4 |" in report
    assert "Not applicable: the U-Net is a consistency-distilled student" in report
    assert "ddpm" not in report
    for name in ("fidelity_vs_guidance.png", "fidelity_vs_steps.png", "samples.png"):
        assert (out / name).is_file(), name


def test_unet_evaluations_count_guidance_passes_only_where_guidance_runs():
    teacher = tiny_pipeline()
    assert unet_evaluations_per_image(teacher, sweep_point(4.0, 50, "ddim")) == 100
    assert unet_evaluations_per_image(teacher, sweep_point(1.0, 50, "ddim")) == 50  # w = 1: the conditional pass
    assert unet_evaluations_per_image(distilled(teacher), sweep_point(4.0, 4, "lcm")) == 4


def test_evaluate_passes_the_teacher_to_the_evaluation(folders, monkeypatch):
    teacher, student = folders
    configs = []
    monkeypatch.setattr(ldm.evaluation, "evaluate_model", lambda model, out, cfg, device: configs.append(cfg))
    assert main(["evaluate", "--model", str(student), "--teacher", str(teacher), "--device", "cpu"]) == 0
    assert [cfg.teacher for cfg in configs] == [str(teacher)]


@pytest.mark.parametrize(
    ("model", "teacher", "extra", "message"),
    [
        ("teacher", "teacher", [], r"--teacher: compares a distilled model with its teacher, but .* is not distilled"),
        ("student", "student", [], r"--teacher: .*student is itself distilled"),
        ("student", "missing", [], r"--teacher: .*missing: model folder not found"),
        ("student", "teacher", ["--data", "data.yaml"], r"--teacher: only without --data"),
    ],
    ids=["undistilled-model", "distilled-teacher", "missing-teacher", "with-data"],
)
def test_a_teacher_that_cannot_stand_beside_the_model_is_refused_by_name(
    folders, monkeypatch, capsys, model, teacher, extra, message
):
    paths = dict(zip(("teacher", "student"), folders, strict=True))
    paths["missing"] = folders[0].parent / "missing"
    monkeypatch.setattr(ldm.evaluation, "evaluate_model", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--model", str(paths[model]), "--teacher", str(paths[teacher]), "--device", "cpu", *extra])
    assert info.value.code == 2
    assert re.search(rf"ldm evaluate: error: {message}", capsys.readouterr().err)


def test_evaluate_model_refuses_a_distilled_teacher_before_any_work(folders, tmp_path):
    _, student = folders
    with pytest.raises(ValueError, match=r"^teacher: .* is itself distilled"):
        evaluate_model(student, tmp_path / "eval", EvaluationConfig(teacher=str(student), probe=TINY_PROBE))
    assert not (tmp_path / "eval" / "probe").exists()
