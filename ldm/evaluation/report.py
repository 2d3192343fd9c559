"""Turn the evaluation's numbers into report.md and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.evaluation.fidelity import GEOMETRIC, JUDGED
from ldm.evaluation.text_pathway import ATTRIBUTES


def fidelity_table(rows: list[dict[str, Any]], first_column: str) -> str:
    """A Markdown table: one row per setting, per-attribute accuracy in percent (position read by the probe and
    from the pixels) and seconds per image."""
    header = f"| {first_column} | " + " | ".join(JUDGED) + " | position (pixels) | colour+shape+bg | s / image |"
    lines = [header, "|" + " --- |" * (len(JUDGED) + 4)]
    for row in rows:
        acc = row["accuracy"]
        cells = [f"{100 * acc[k]:.1f}%" for k in (*JUDGED, GEOMETRIC, "all")]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {acc['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of a distilled model's rows beside its teacher's: the U-Net evaluations each image cost,
    per-attribute accuracy in percent and seconds per image."""
    header = "| model, setting | U-Net evaluations / image | " + " | ".join(JUDGED) + " | colour+shape+bg | s / image |"
    lines = [header, "|" + " --- |" * (len(JUDGED) + 4)]
    for row in rows:
        acc = row["accuracy"]
        cells = [f"{100 * acc[k]:.1f}%" for k in (*JUDGED, "all")]
        lines.append(
            f"| {row['model']}, {row['label']} | {row['unet_evaluations_per_image']} | " + " | ".join(cells)
            + f" | {acc['seconds_per_image']:.3f} |"
        )  # fmt: skip
    return "\n".join(lines)


def distilled_note(metrics: dict[str, Any]) -> list[str]:
    """The report's lines on how a distilled model was swept (none for another model)."""
    if not metrics.get("distilled"):
        return []
    w = metrics["fidelity"]["default_guidance_scale"]
    lines = [
        f"A consistency-distilled model: its U-Net takes the guidance scale w as an input, so it is swept with its "
        f"own sampler, lcm, one U-Net evaluation per step (guidance at the folder's default steps; steps at its "
        f"default w = {w:g}).",
        "",
    ]
    beyond = metrics["fidelity"]["steps_beyond_schedule"]
    if beyond:
        lines += [f"Left out: {', '.join(map(str, beyond))} steps, more than the folder's skip-step schedule has.", ""]
    return lines


def teacher_lines(metrics: dict[str, Any]) -> list[str]:
    """The comparison of a distilled model with its teacher (none without one)."""
    comparison = metrics.get("teacher_comparison")
    if comparison is None:
        if not metrics.get("distilled"):
            return []
        return ["`--teacher FOLDER` (the model it was distilled from) adds the teacher's rows beside these.", ""]
    return [
        "### Against the teacher",
        "",
        f"The student's step rows beside its teacher `{comparison['teacher']}` on the same "
        f"{comparison['num_prompts']} captions, judged by the same probe, at the same w = "
        f"{comparison['guidance_scale']:g} (the teacher's U-Net runs classifier-free guidance, two evaluations per "
        f"step, unless w = 1). Seconds per image: {comparison['timing']} (the machine above).",
        "",
        comparison_table(comparison["rows"]),
        "",
    ]


def text_pathway_table(pathway: dict[str, Any]) -> str:
    """A Markdown table of `ldm.evaluation.text_pathway.text_pathway`'s readings."""
    lines = [
        f"| attribute | distance (norm {pathway['norm']:.1f}) | relative | linear probe | chance |",
        "| --- | --- | --- | --- | --- |",
    ]
    for attribute in ATTRIBUTES:
        r = pathway[attribute]
        lines.append(
            f"| {attribute} | {r['distance']:.1f} | {r['relative_distance']:.3f} | {100 * r['probe']:.1f}% "
            f"| {100 * r['chance']:.1f}% |"
        )
    return "\n".join(lines)


def accuracy_line(accuracy: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in accuracy.items())


def write_report(metrics: dict[str, Any], path: Path) -> None:
    """report.md: every table of metrics.json, with the settings that made it."""
    ae = metrics["autoencoder"]
    probe = metrics["probe"]
    lines = [
        f"# Evaluation of `{metrics['model']}`",
        "",
        f"Machine: {metrics['machine']}",
        "",
        "## Autoencoder (held-out shapes)",
        "",
        autoencoder_table(ae),
        "",
        f"{ae['num_images']} held-out images. {_unavailable(ae)}",
        "",
        "The attribute probe on the autoencoder's reconstructions (the most stage 2 can reproduce): "
        f"{accuracy_line(ae['probe_accuracy_on_reconstructions'])}.",
        "",
        "## Text pathway",
        "",
        "What the text encoder gives the U-Net per attribute: the mean L2 distance between the conditioning of "
        "captions that differ in that attribute alone, and a linear probe's accuracy on the token-averaged "
        "conditioning of unseen captions. An attribute the encoder barely separates cannot be drawn from the prompt.",
        "",
        text_pathway_table(metrics["text_pathway"]),
        "",
        "## Prompt fidelity",
        "",
        f"{metrics['fidelity']['num_prompts']} captions of held-out shapes scenes, one image each, judged by an "
        f"attribute probe trained on rendered shapes only. The probe reads real held-out renderings with: "
        f"{accuracy_line(probe['heldout_accuracy'])}. Chance: {accuracy_line(metrics['fidelity']['chance'])}.",
        "",
        *distilled_note(metrics),
        "### Guidance scale",
        "",
        fidelity_table(metrics["fidelity"]["guidance_sweep"], "setting"),
        "",
        "### Novel combinations",
        "",
        f"{metrics['fidelity']['num_prompts']} captions of the compositional split: (shape, colour, position) "
        "triples that no training caption has, though each attribute and each pair of them occur in training.",
        "",
        fidelity_table(metrics["fidelity"]["compositional_guidance_sweep"], "setting"),
        "",
        "### Sampler and steps",
        "",
        fidelity_table(metrics["fidelity"]["step_sweep"], "setting"),
        "",
        *teacher_lines(metrics),
        "## Variational bound on held-out latents",
        "",
        bound_line(metrics["bound"]),
        "",
        "## With pretrained models",
        "",
        f"- CLIP score: {_maybe(metrics['pretrained'].get('clip_score'))}",
        f"- FID: {_maybe(metrics['pretrained'].get('fid'))}",
        f"{_unavailable(metrics['pretrained'])}",
        "",
        "![fidelity vs guidance](fidelity_vs_guidance.png) ![fidelity vs steps](fidelity_vs_steps.png) "
        "![novel combinations: fidelity vs guidance](compositional_fidelity_vs_guidance.png)",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def autoencoder_table(ae: dict[str, Any]) -> str:
    """The autoencoder's held-out metrics as a one-row Markdown table."""
    return "\n".join(
        [
            "| PSNR | SSIM | LPIPS | KL (nats/img) | latent mean | latent std | rFID |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            "| {psnr:.2f} dB | {ssim:.4f} | {lpips} | {kl:.1f} | {mean:.3f} | {std:.3f} | {rfid} |".format(
                psnr=ae["psnr"],
                ssim=ae["ssim"],
                lpips=_maybe(ae.get("lpips")),
                kl=ae["kl"],
                mean=ae["latent_mean"],
                std=ae["latent_std"],
                rfid=_maybe(ae.get("rfid")),
            ),
        ]
    )


def bound_line(bound: dict[str, Any]) -> str:
    """The variational bound in one sentence, with what it was computed over (or why it does not apply)."""
    if "not_applicable" in bound:
        return f"Not applicable: {bound['not_applicable']}."
    return (
        "{bpd:.4f} bits per latent dimension (prior term {prior:.2e}) over {n} latents, conditioned on their "
        "captions, T = {t} timesteps, continuous Gaussian decoder.".format(
            bpd=bound["bits_per_dim"], prior=bound["prior_bits_per_dim"], n=bound["num_latents"], t=bound["timesteps"]
        )
    )


def sampling_line(sampling: dict[str, Any], seed: int) -> str:
    """The sampling settings every generated image was drawn with, in one sentence."""
    karras = ", Karras noise levels" if sampling["karras_sigmas"] else ""
    return (
        "Generated images are drawn with the model folder's default sampling settings: "
        f"{sampling['sampler']} {sampling['num_inference_steps']} steps, w = {sampling['guidance_scale']:g}, "
        f"eta {sampling['eta']:g}{karras}, at {sampling['height']}x{sampling['width']} pixels, seed {seed}."
    )


def write_data_report(metrics: dict[str, Any], path: Path) -> None:
    """report.md of `ldm evaluate --data`: every number of metrics.json, with the data and settings behind it."""
    ae, generated = metrics["autoencoder"], metrics["generated"]
    kid = generated.get("kid_mean")
    kid_cell = "unavailable" if kid is None else f"{kid:.5f} ± {generated['kid_std']:.5f}"
    lines = [
        f"# Evaluation of `{metrics['model']}` on held-out data",
        "",
        f"Data: {metrics['data']['description']}; {metrics['data']['num_images']} held-out images "
        f"({metrics['data']['empty_captions']} without a caption).",
        "",
        f"Machine: {metrics['machine']}",
        "",
        sampling_line(metrics["sampling"], metrics["settings"]["seed"]),
        "",
        "## Autoencoder (held-out images)",
        "",
        autoencoder_table(ae),
        "",
        f"{ae['num_images']} held-out images. {_unavailable(ae)}",
        "",
        "## Variational bound on held-out latents",
        "",
        bound_line(metrics["bound"]),
        "",
        "## Generated images against held-out images",
        "",
        f"One image for each of {generated['num_images']} held-out captions, against the real held-out images. "
        "FID is biased upwards on few images (a 2048-dimensional covariance): compare FIDs of equal counts only."
        if generated["num_images"]
        else "No images were drawn for this table: none of its metrics has its weights.",
        "",
        "| FID | KID (mean ± std over subsets) | CLIP score |",
        "| --- | --- | --- |",
        f"| {_maybe(generated.get('fid'))} | {kid_cell} | {_maybe(generated.get('clip_score'))} |",
        "",
        *([_unavailable(generated), ""] if generated.get("unavailable") else []),
        "## Held-out images and what the model draws for their captions",
        "",
        f"First column: the real held-out image; then {metrics['grid']['per_caption']} images drawn for its caption. "
        f"Captions, one per row, in `{metrics['grid']['captions_file']}`.",
        "",
        f"![held-out images and generations]({metrics['grid']['file']})",
        "",
    ]
    probe = metrics.get("shapes_probe")
    if probe is not None:
        fidelity = probe["default_sampling"]
        lines += [
            "## Attribute probe (shapes data)",
            "",
            f"{probe['num_prompts']} held-out captions, one image each at {probe['resolution']} px, "
            f"{fidelity['label']} (the folder's defaults). The probe reads real held-out renderings with: "
            f"{accuracy_line(probe['probe_heldout_accuracy'])}. Chance: {accuracy_line(probe['chance'])}.",
            "",
            fidelity_table([fidelity], "setting"),
            "",
        ]
    path.write_text("\n".join(lines), encoding="utf-8")


def _maybe(value: float | None) -> str:
    return "unavailable" if value is None else f"{value:.4f}"


def _unavailable(section: dict[str, Any]) -> str:
    reasons = section.get("unavailable", {})
    return " ".join(f"{name} unavailable: {why}." for name, why in reasons.items())


def plot_sweep(
    rows: list[dict[str, Any]], x_values: list[float], x_label: str, path: Path, log_x: bool = False
) -> None:
    """Accuracy per attribute (and all three at once) against the swept setting, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for key in (*JUDGED, "all"):
        ys = [100 * row["accuracy"][key] for row in rows]
        ax.plot(x_values, ys, marker="o", label="colour+shape+bg" if key == "all" else key)
    if log_x:
        ax.set_xscale("log")
    ax.set_xticks(x_values, [row["tick"] for row in rows])
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
