"""The attribute probe for data with an added shape or colour: it has classes for them and is saved with them."""

import json

import torch

from ldm.data.shapes import COLORS, SHAPES, ShapesDataset
from ldm.evaluation.probe import ProbeConfig, load_or_train_probe, shapes_tensors

FOUR = [*SHAPES, "cross"]
NINE = [*COLORS, "pink"]


def test_a_probe_for_added_shapes_and_colours_has_classes_for_them_and_is_saved_with_them(tmp_path):
    # How well it reads crosses is measured with the full probe (docs/fine_tuning.md); this pins the plumbing.
    cfg = ProbeConfig(
        resolution=16, train_samples=64, heldout_samples=32, steps=2, batch_size=8, shapes=FOUR, colors=NINE
    )
    probe, accuracy = load_or_train_probe(cfg, tmp_path)
    assert probe.heads["shape"].out_features == 4 and set(accuracy) == set(probe.attributes)
    assert probe.heads["color"].out_features == probe.heads["background"].out_features == 9
    data = ShapesDataset(200, 16, "heldout", shapes=FOUR, colors=NINE)
    images, labels = shapes_tensors(data)
    crosses = [i for i in range(200) if data[i]["attributes"]["shape"] == "cross"]
    assert crosses and all(labels["shape"][i] == 3 for i in crosses)
    pinks = [i for i in range(200) if data[i]["attributes"]["color"] == "pink"]
    assert pinks and all(labels["color"][i] == 8 for i in pinks)
    assert set(probe.predict(images)["shape"]) <= set(FOUR)
    saved = json.loads((tmp_path / "probe.json").read_text())["config"]
    assert saved["shapes"] == FOUR and saved["colors"] == NINE
    again, _ = load_or_train_probe(cfg, tmp_path)  # reloaded with its four classes, not retrained
    assert all(torch.equal(a, b) for a, b in zip(probe.state_dict().values(), again.state_dict().values(), strict=True))


def test_a_probe_saved_before_shapes_existed_still_loads(tmp_path):
    cfg = ProbeConfig(resolution=16, train_samples=64, heldout_samples=16, steps=2, batch_size=8)
    load_or_train_probe(cfg, tmp_path)
    info = json.loads((tmp_path / "probe.json").read_text())
    del info["config"]["shapes"], info["config"]["colors"]
    info["heldout_accuracy"] = {"marker": 1.0}  # shows whether the file was reused
    (tmp_path / "probe.json").write_text(json.dumps(info))
    _, accuracy = load_or_train_probe(cfg, tmp_path)
    assert accuracy == {"marker": 1.0}
