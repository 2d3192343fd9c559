"""The cache-file helper both caches share, and the one weight fingerprint they are keyed by."""

import os
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conditioning import cache_file
from conditioning.cache_file import cache_file_fingerprint, read_cache_file, write_cache_file
from conditioning.fingerprint import weights_fingerprint

FMT = "test-cache/1"
STRINGS = ["", "a photo of a cat", "café crème, 東京の夜景 🌃", 'quotes " and \\ backslashes']


def _write(path, value: float = 1.0, fingerprint: str = "fp-1") -> dict[str, torch.Tensor]:
    tensors = {"values": torch.full((4, 3), value), "half": torch.arange(6, dtype=torch.bfloat16)}
    write_cache_file(path, tensors, STRINGS, FMT, fingerprint, {"count": "4"})
    return tensors


def test_round_trip_keeps_tensors_strings_fingerprint_and_metadata(tmp_path):
    path = tmp_path / "sub" / "cache.safetensors"  # the parent folder is created
    tensors = _write(path)
    file = read_cache_file(path, FMT, "test cache")
    assert file.strings == STRINGS and file.fingerprint == "fp-1"
    assert file.metadata == {"format": FMT, "fingerprint": "fp-1", "count": "4"}
    assert file.tensors.keys() == tensors.keys()
    assert all(torch.equal(file.tensors[k], v) and file.tensors[k].dtype == v.dtype for k, v in tensors.items())
    assert os.listdir(path.parent) == ["cache.safetensors"]  # no temporary file left behind


def test_wrong_format_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "cache.safetensors"
    _write(path)
    expected = f"{path}: not a other cache (format '{FMT}', expected 'other/1')"
    with pytest.raises(ValueError, match=re.escape(expected)):
        read_cache_file(path, "other/1", "other cache")
    save_file({"x": torch.zeros(1)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match=r"weights\.safetensors: not a test cache \(format None"):
        read_cache_file(tmp_path / "weights.safetensors", FMT, "test cache")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a test cache"):
        read_cache_file(tmp_path / "junk.safetensors", FMT, "test cache")


def test_missing_file_is_a_file_not_found_error_with_the_remedy(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors: no test cache here; build one$"):
        read_cache_file(tmp_path / "missing.safetensors", FMT, "test cache", "build one")


@pytest.mark.parametrize("failing", ["save_file", "replace"])
def test_a_crash_while_writing_leaves_the_previous_file_readable(tmp_path, monkeypatch, failing):
    path = tmp_path / "cache.safetensors"
    _write(path, value=1.0, fingerprint="old")

    def half_written_then_crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)  # part of a file, as a kill mid-write would leave it
        raise OSError("disk full")

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    if failing == "save_file":
        monkeypatch.setattr(cache_file, "save_file", half_written_then_crash)
    else:
        monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        _write(path, value=2.0, fingerprint="new")
    monkeypatch.undo()
    file = read_cache_file(path, FMT, "test cache")
    assert file.fingerprint == "old" and torch.equal(file.tensors["values"], torch.ones(4, 3))
    assert os.listdir(tmp_path) == ["cache.safetensors"]


class _HeaderSpy:
    """Wraps safe_open and fails the test if a tensor is read."""

    real = cache_file.safe_open

    def __init__(self, *args, **kwargs):
        self.handle = self.real(*args, **kwargs)

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def metadata(self):
        return self.handle.metadata()

    def get_tensor(self, name):
        raise AssertionError(f"read tensor {name!r}; only the header should be read")


def test_fingerprint_is_read_from_the_header_alone(tmp_path, monkeypatch):
    path = tmp_path / "cache.safetensors"
    _write(path, fingerprint="abc123")
    monkeypatch.setattr(cache_file, "safe_open", _HeaderSpy)
    assert cache_file_fingerprint(path, FMT) == "abc123"
    assert cache_file_fingerprint(path, "other/1") is None  # another format (version) needs a rebuild
    assert cache_file_fingerprint(tmp_path / "missing.safetensors", FMT) is None
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert cache_file_fingerprint(tmp_path / "junk.safetensors", FMT) is None


def test_reserved_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'captions_json' is reserved"):
        write_cache_file(tmp_path / "c", {"captions_json": torch.zeros(1)}, [], FMT, "fp")
    with pytest.raises(ValueError, match=r"extra_metadata: \['fingerprint'\]"):
        write_cache_file(tmp_path / "c", {}, [], FMT, "fp", {"fingerprint": "other"})


def _module(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)).to(dtype)
    module.register_buffer("step", torch.tensor(3))  # a 0-d buffer must hash too
    return module


def test_weights_fingerprint_is_equal_for_identical_modules_and_changes_with_extra():
    assert weights_fingerprint(_module(0), {"data": 1}) == weights_fingerprint(_module(0), {"data": 1})
    assert weights_fingerprint(_module(0), {"data": 1}) != weights_fingerprint(_module(1), {"data": 1})
    assert weights_fingerprint(_module(0), {"data": 1}) != weights_fingerprint(_module(0), {"data": 2})
    assert weights_fingerprint(_module(0)) != weights_fingerprint(_module(0), {})


def test_weights_fingerprint_changes_when_one_weight_changes_by_one_bit():
    module = _module()
    before = weights_fingerprint(module)
    with torch.no_grad():
        module[0].weight.view(-1).view(torch.int32)[5] ^= 1  # flip the lowest mantissa bit of one weight
    assert weights_fingerprint(module) != before


def test_weights_fingerprint_works_for_bfloat16():
    module = _module(dtype=torch.bfloat16)
    assert weights_fingerprint(module) == weights_fingerprint(_module(dtype=torch.bfloat16))
    assert weights_fingerprint(module) != weights_fingerprint(_module())  # the dtype is part of the identity
    with torch.no_grad():
        module[1].bias.view(torch.int16)[0] ^= 1
    assert weights_fingerprint(module) != weights_fingerprint(_module(dtype=torch.bfloat16))
