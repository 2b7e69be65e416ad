"""Human-readable report of a compressed model, rendered from its manifest alone."""
from __future__ import annotations

from pathlib import Path


def _f(x, fmt="{:.4f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def finetune_outcome(ft: dict) -> str:
    """What recovery fine-tuning achieved, in one phrase: held-out loss and cosine, KL on the calibration images."""
    parts = []
    if "heldout_loss_before" in ft:
        c0, c1 = ft["heldout_cosine_before"]["mean"], ft["heldout_cosine_after"]["mean"]
        parts.append(f"held-out {ft['target']} loss {ft['heldout_loss_before']:.3g} -> {ft['heldout_loss_best']:.3g} "
                     f"(best step {ft['best_step']}; final-feature cosine {c0:.4f} -> {c1:.4f}"
                     + ("" if ft["kept"] else "; did not pay, factors kept as they were") + ")")
    if "kl_before" in ft:
        parts.append(f"KL to the dense model {ft['kl_before']:.3g} -> {ft['kl_after']:.3g}")
    return "; ".join(parts)


def _finetune_lines(ft: dict | None) -> list[str]:
    """One line when recovery fine-tuning was applied (beyond the paper), with its cost."""
    if not ft:
        return []
    return [f"- **fine-tuned** (beyond the paper): {ft['steps']} distillation steps ({ft.get('target', 'logits')} "
            f"target, lr {ft['lr']:g}) on the {ft['images']} calibration images in {ft['seconds']:.1f} s; "
            f"{finetune_outcome(ft)}. Layer errors below are before fine-tuning; outputs and INT8 ranges are after."]


def _model_lines(m: dict) -> list[str]:
    """Family, build options, preprocessing and any position-table resampling, when recorded."""
    out = []
    if m.get("family"):
        out.append(f"- family: {m['family']}, outputs: {m.get('outputs', 'logits')}"
                   + (f", built with {m['kwargs']}" if m.get("kwargs") else ""))
    pre = m.get("preprocessing")
    if pre:
        out.append(f"- preprocessing: input {'x'.join(map(str, pre['input_size']))}, {pre['interpolation']}, "
                   f"crop {pre['crop_pct']:g} ({pre['crop_mode']}), mean {pre['mean']}, std {pre['std']}"
                   + (f" (overrides: {', '.join(m['data_config'])})" if m.get("data_config") else ""))
    rs = m.get("pos_resampled")
    if rs:
        out.append(f"- checkpoint position tables resampled ({rs['method']}, {rs['by']}): "
                   + ", ".join(f"{k} {o} -> {n}" for k, (o, n) in rs["tables"].items()))
    return out


def _latency_lines(lat: dict | None) -> list[str]:
    """The plan's predicted latency (compress.latency), per batch of the table."""
    if not lat:
        return []
    per = ", ".join(f"batch {b}: {ms:.2f} ms ({ms / lat['dense_predicted_ms'][b]:.2f}x dense)"
                    for b, ms in lat["predicted_ms"].items())
    target = f"; target {lat['target_ms']:g} ms at batch {lat['batch']}" if lat.get("target_ms") else ""
    return [f"- predicted {lat['precision']} latency on {lat['backend']} ({lat['machine'].get('cpu')}, "
            f"{lat['threads'] or 'default'} threads): {per}{target}; widths limited to the latency break-even"]


def render_report(manifest: dict) -> str:
    m, p, b = manifest["model"], manifest["params"], manifest["budget"]
    cal, q = manifest.get("calibration", {}), manifest.get("quant", {})
    lines = [
        f"# Compressed {m['name']}",
        "",
        f"- weights: {m.get('weights', '?')}" + (f" ({m['checkpoint']})" if m.get("checkpoint") else ""),
        *_model_lines(m),
        f"- method: `{manifest['method']}`, allocation: `{manifest['allocation']}`, granule {manifest['granule']}, "
        f"compensation rank {manifest['comp_rank']}",
        f"- budget: {b['description']} (target <= {b['target_params']:,} parameters)",
        *_latency_lines(manifest.get("latency")),
        f"- calibration: {cal.get('images', '?')} images from `{cal.get('path', '?')}` "
        f"(hash {cal.get('hash', '?')}, seed {cal.get('seed', '?')})",
        *_finetune_lines(manifest.get("finetune")),
        "",
        "## Parameters",
        "",
        "| scope | before | after | removed |",
        "|---|---:|---:|---:|",
        f"| whole model (every parameter) | {p['before']:,} | {p['after']:,} | {p['removed_ratio']:.2%} |",
        f"| compressible Linear layers | {p['compressible_before']:,} | {p['compressible_after']:,} | "
        f"{p['compressible_removed_ratio']:.2%} |",
        "",
        "## Layers",
        "",
        "Errors are normalised output errors ||(W - W')X||^2 / ||WX||^2 (METHOD.md §1): `svd` on the "
        "dense network's inputs (the allocation's prediction), `seq before/after` on the inputs of the "
        "compressed network before and after error compensation (METHOD.md §4).",
        "",
        "| layer | out x in | rank | comp | params | of dense | svd | seq before | seq after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, l in manifest["layers"].items():
        rank = "dense" if l["dense"] else str(l["rank"])
        lines.append(
            f"| {name} | {l['out']}x{l['in']} | {rank} | {l['comp_rank']} | {l['params']:,} | "
            f"{l['params'] / l['dense_params']:.0%} | {_f(l.get('error'))} | {_f(l.get('error_seq_before'))} | "
            f"{_f(l.get('error_seq_after'))} |")
    e = manifest.get("errors", {})
    lines += ["", "## Totals", "",
              f"- sum of predicted layer errors (svd): {_f(e.get('sum_svd'))}",
              f"- sum of sequential errors before / after compensation: {_f(e.get('sum_seq_before'))} / "
              f"{_f(e.get('sum_seq_after'))}" + (f" (compensation removes {e['compensation_gain']:.1%})"
                                                  if e.get("compensation_gain") is not None else "")]
    ag = manifest.get("agreement", {})
    if ag and m.get("outputs") == "features":   # headless: an argmax over features means nothing
        lines += ["", "## Final features on the calibration images (headless model)", "",
                  "| comparison | relative feature error | feature cosine |", "|---|---:|---:|"]
        for k, v in ag.items():
            lines.append(f"| {k.replace('_', ' ')} | {v['rel_error']:.4f} | {v['cosine']:.4f} |")
    elif ag:
        lines += ["", "## Outputs on the calibration images", "",
                  "| comparison | relative logit error | cosine | top-1 agreement |", "|---|---:|---:|---:|"]
        for k, v in ag.items():
            lines.append(f"| {k.replace('_', ' ')} | {v['rel_error']:.4f} | {v['cosine']:.4f} | "
                         f"{v['top1_agreement']:.2%} |")
    lines += ["", "## INT8", ""]
    if q.get("enabled"):
        lines += [f"- weights: {q['weights']}", f"- activations: {q['activations']}, ranges by {q['calibration']}",
                  f"- low-rank pairs balanced before calibration: {q.get('balanced', False)}"]
    else:
        lines.append("- quantization skipped (--no-quant); dense-model input ranges are still recorded")
    t = manifest.get("timings", {})
    if t:
        lines += ["", "## Time (s)", "", " | ".join(f"{k} {v:.1f}" for k, v in t.items())]
    return "\n".join(lines) + "\n"


def plot_ranks(manifest: dict, path: str | Path) -> None:
    """Bar plot of width per layer (rank + comp rank; dense layers drawn at full rank, grey)."""
    import matplotlib  # lazy: a slow import, needed only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(manifest["layers"])
    layers = [manifest["layers"][n] for n in names]
    full = [min(l["in"], l["out"]) for l in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names) + 2), 3.6), dpi=110)
    x = range(len(names))
    ax.bar(x, full, color="#dddddd", label="full rank")
    ax.bar(x, [0 if l["dense"] else l["rank"] for l in layers], color="#3b6ea8", label="SVD rank")
    ax.bar(x, [0 if l["dense"] else l["comp_rank"] for l in layers],
           bottom=[0 if l["dense"] else l["rank"] for l in layers], color="#e0a030", label="compensation")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    p = manifest["params"]
    ax.set_title(f"{manifest['model']['name']}: {manifest['method']}/{manifest['allocation']}, "
                 f"{p['removed_ratio']:.1%} of parameters removed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
