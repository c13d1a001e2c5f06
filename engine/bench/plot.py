"""--plot: speed-up vs K (one line per scenario) and throughput vs concurrency, as one PNG.

Uses matplotlib (the ``dev`` extra), imported only when a plot is asked for.
"""

from __future__ import annotations


class PlotUnavailable(RuntimeError):
    pass


def save_plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("--plot needs matplotlib: pip install matplotlib (or the dev extra)") from exc

    fig, (ax_k, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    for scen in results["scenarios"]:
        fixed = [m for m in scen["methods"] if m["backend"] == "helix" and m["speculative"] and m["k"]]
        if len(fixed) < 2:
            continue
        label = f"T={scen['temperature']:g}, {scen['max_new_tokens']} tok"
        ks = [m["k"] for m in fixed]
        line, = ax_k.plot(ks, [m["speedup_vs_plain"] for m in fixed], "o-", label=f"{label} measured")
        pred = [m["predicted_speedup"] for m in fixed]
        if all(p is not None for p in pred):
            ax_k.plot(ks, pred, "--", color=line.get_color(), alpha=0.6, label=f"{label} predicted")
        ada = next((m for m in scen["methods"] if m["name"] == "helix spec adaptive"), None)
        if ada and ada["mean_k"]:
            ax_k.plot([ada["mean_k"]], [ada["speedup_vs_plain"]], "*", ms=12, color=line.get_color(),
                      label=f"{label} adaptive")
    ax_k.axhline(1.0, color="grey", lw=0.8)
    ax_k.set_xlabel("draft length K")
    ax_k.set_ylabel("speed-up over Helix plain (tokens/s)")
    ax_k.set_title("speed-up vs K (batch 1)")
    if ax_k.get_legend_handles_labels()[0]:
        ax_k.legend(fontsize=7)
    for mode in ("plain", "speculative"):
        rows = [r for r in results.get("concurrency", []) if r["mode"] == mode]
        if rows:
            ax_c.plot([r["concurrency"] for r in rows], [r["tokens_per_second"] for r in rows], "o-", label=mode)
    ax_c.set_xscale("log", base=2)
    ax_c.set_xlabel("concurrent requests")
    ax_c.set_ylabel("throughput (tokens/s, all requests)")
    ax_c.set_title("throughput vs concurrency")
    ax_c.legend()
    m = results["machine"]
    fig.suptitle(f"Helix bench: {m.get('device')} {m.get('gpu') or m.get('cpu_model')}, {m.get('date_utc')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
