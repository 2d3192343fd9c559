"""`import ldm` stays light; `from ldm import LatentDiffusionPipeline` loads the pipeline on demand."""

import subprocess
import sys

import pytest

import ldm


def test_import_ldm_does_not_import_torch_or_diffusers():
    code = "import sys, ldm; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_pipeline_names_are_exported_lazily():
    from ldm import LatentDiffusionPipeline, PipelineOutput, SamplingDefaults
    from ldm.generation import LatentDiffusionPipeline as Direct

    assert LatentDiffusionPipeline is Direct
    assert PipelineOutput.__module__ == "ldm.generation.run"
    assert SamplingDefaults().guidance_scale == 7.5
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        ldm.Nope  # noqa: B018
