"""Measuring a trained model: autoencoder metrics, prompt fidelity read by an attribute probe, the bound."""

from ldm.evaluation.evaluate import EvaluationConfig, evaluate_model
from ldm.evaluation.fidelity import FidelityPrompts, SweepPoint, prompt_fidelity
from ldm.evaluation.probe import AttributeProbe, ProbeConfig, load_or_train_probe, train_probe

__all__ = [
    "AttributeProbe",
    "EvaluationConfig",
    "FidelityPrompts",
    "ProbeConfig",
    "SweepPoint",
    "evaluate_model",
    "load_or_train_probe",
    "prompt_fidelity",
    "train_probe",
]
