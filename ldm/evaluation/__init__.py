"""Measuring a trained model: autoencoder metrics, prompt fidelity read by an attribute probe, the bound; and,
on the held-out split of the user's own data, the autoencoder, the bound, FID / KID and the CLIP score."""

from ldm.evaluation.evaluate import EvaluationConfig, evaluate_model
from ldm.evaluation.fidelity import FidelityPrompts, prompt_fidelity, sweep_label, sweep_point
from ldm.evaluation.heldout import HeldoutData, load_data_config, open_heldout
from ldm.evaluation.own_data import DataEvaluationConfig, evaluate_on_data
from ldm.evaluation.probe import AttributeProbe, ProbeConfig, load_or_train_probe, train_probe

__all__ = [
    "AttributeProbe",
    "DataEvaluationConfig",
    "EvaluationConfig",
    "FidelityPrompts",
    "HeldoutData",
    "ProbeConfig",
    "evaluate_model",
    "evaluate_on_data",
    "load_data_config",
    "load_or_train_probe",
    "open_heldout",
    "prompt_fidelity",
    "sweep_label",
    "sweep_point",
    "train_probe",
]
