"""A model folder with a missing or corrupt piece is refused by name: by the pipeline, `ldm generate` and
`ldm evaluate` (tests/pipeline/test_model_folder.py covers the missing subfolders themselves)."""

import shutil

import pytest

from ldm import LatentDiffusionPipeline
from ldm.cli import main


def _broken(model_folder, tmp_path, remove=(), truncate=(), overwrite=()):
    folder = shutil.copytree(model_folder, tmp_path / "broken")
    for name in remove:
        target = folder / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for name in truncate:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    for name in overwrite:
        (folder / name).write_text("{not json")
    return folder


def test_a_tokenizer_without_its_vocabulary_is_missing_not_an_empty_tokenizer(model_folder, tmp_path):
    # transformers would load tokenizer_config.json alone as a 2-token tokenizer that maps every word to one id.
    broken = _broken(model_folder, tmp_path, remove=["tokenizer/tokenizer.json", "tokenizer/vocab.json"])
    with pytest.raises(FileNotFoundError, match="component 'tokenizer' has no vocabulary") as info:
        LatentDiffusionPipeline.from_pretrained(broken)
    assert str(broken) in str(info.value)
    # Either vocabulary is enough.
    only_json = _broken(model_folder, tmp_path / "json", remove=["tokenizer/vocab.json", "tokenizer/merges.txt"])
    assert len(LatentDiffusionPipeline.from_pretrained(only_json).text_encoder.tokenizer) == 49408


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"truncate": ["unet/diffusion_pytorch_model.safetensors"]}, "component 'unet' cannot be loaded"),
        ({"truncate": ["vae/diffusion_pytorch_model.safetensors"]}, "component 'vae' cannot be loaded"),
        ({"truncate": ["text_encoder/model.safetensors"]}, "component 'text_encoder' cannot be loaded"),
        ({"overwrite": ["unet/config.json"]}, "component 'unet' cannot be loaded"),
        ({"overwrite": ["text_encoder/config.json"]}, "text_encoder/config.json: not valid JSON"),
        ({"overwrite": ["scheduler/scheduler_config.json"]}, "scheduler_config.json: not valid JSON"),
        ({"overwrite": ["model_index.json"]}, "model_index.json: not valid JSON"),
    ],
)
def test_a_corrupt_component_is_named(model_folder, tmp_path, damage, message):
    broken = _broken(model_folder, tmp_path, **damage)
    with pytest.raises((OSError, ValueError), match=message) as info:
        LatentDiffusionPipeline.from_pretrained(broken)
    assert str(broken) in str(info.value)


def test_generate_reports_a_corrupt_component_on_one_line(model_folder, tmp_path, capsys):
    broken = _broken(model_folder, tmp_path, truncate=["unet/diffusion_pytorch_model.safetensors"])
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(broken), "a red circle", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("ldm generate: error: ") and "component 'unet' cannot be loaded" in last
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        (["unet"], "component 'unet' is missing (unet/config.json not found)"),
        (["vae/diffusion_pytorch_model.safetensors"], "component 'vae' has no .safetensors weights"),
        (["tokenizer/tokenizer.json", "tokenizer/merges.txt"], "component 'tokenizer' has no vocabulary"),
        (["model_index.json"], "model_index.json is missing"),
    ],
)
def test_evaluate_names_the_missing_component_before_any_work(model_folder, tmp_path, capsys, remove, message):
    broken = _broken(model_folder, tmp_path, remove=remove)
    out = tmp_path / "evaluation"
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--model", str(broken), "--output-dir", str(out)])
    assert info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"ldm evaluate: error: --model: {broken}: ") and message in last
    assert not out.exists()
