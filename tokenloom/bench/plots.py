"""PNG charts of the benchmarks, through matplotlib's Agg backend (no display needed): throughput against
concurrency, TTFT / TPOT distributions, quantization quality against speed and the quantization bars. Without
matplotlib (it comes with the `bench` extra) the bars fall back to a bare PNG; the other charts need it.
"""
from __future__ import annotations

from pathlib import Path

from tokenloom.bench.common import pct
from tokenloom.config import TokenloomError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TokenloomError("charts need matplotlib: pip install -e \".[bench]\"") from None
    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def throughput_vs_concurrency(runs: list[dict], path: Path, title: str) -> Path:
    """Output tok/s and goodput (left) and TTFT / TPOT p50 and p90 (right) against the concurrency of each run
    (dicts of bench serve's report: concurrency, out_tok_s, goodput_req_s, req_s, ttft_ms, tpot_ms)."""
    plt = _pyplot()
    runs = sorted(runs, key=lambda r: r["concurrency"])
    x = [r["concurrency"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.plot(x, [r["out_tok_s"] for r in runs], "o-", label="output tok/s")
    a.set_xlabel("concurrency (requests in flight)")
    a.set_ylabel("output tokens/s")
    a2 = a.twinx()
    a2.plot(x, [r["req_s"] for r in runs], "s--", color="#888888", label="req/s")
    a2.plot(x, [r["goodput_req_s"] for r in runs], "^:", color="#2a9d4a", label="goodput req/s (SLOs met)")
    a2.set_ylabel("requests/s")
    a.legend(loc="upper left", fontsize=8)
    a2.legend(loc="lower right", fontsize=8)
    a.set_title("throughput")
    for key, style in (("ttft_ms", "o-"), ("tpot_ms", "s-")):
        for q, alpha in (("p50", 1.0), ("p90", 0.5)):
            b.plot(x, [r[key].get(q, float("nan")) for r in runs], style, alpha=alpha, label=f"{key[:4].upper()} {q}")
    b.set_xlabel("concurrency (requests in flight)")
    b.set_ylabel("ms")
    b.set_yscale("log")
    b.legend(fontsize=8)
    b.set_title("latency")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def latency_distributions(ttft_s: list[float], tpot_s: list[float], path: Path, title: str) -> Path:
    """Histograms (top) and CDFs (bottom) of per-request TTFT and TPOT, with their p50 / p90 / p99 marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, (name, values) in enumerate((("TTFT", ttft_s), ("TPOT", tpot_s))):
        ms = sorted(v * 1000 for v in values)
        hist, cdf = axes[0][col], axes[1][col]
        if ms:
            hist.hist(ms, bins=min(40, max(5, len(ms) // 2)), color="#3b7dd8")
            cdf.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post", color="#3b7dd8")
            for q, style in ((50, "-"), (90, "--"), (99, ":")):
                v = pct(ms, q)
                for ax in (hist, cdf):
                    ax.axvline(v, color="#d83b3b", linestyle=style, linewidth=1, label=f"p{q} {v:.1f} ms")
        hist.set_title(f"{name} ({len(ms)} requests)")
        hist.set_xlabel(f"{name} ms")
        hist.set_ylabel("requests")
        hist.legend(fontsize=8)
        cdf.set_xlabel(f"{name} ms")
        cdf.set_ylabel("share of requests")
        cdf.set_ylim(0, 1.01)
        cdf.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def quality_vs_speed(rows: list[dict], path: Path, title: str) -> Path:
    """Δ perplexity % (lower is better) against batch-1 decode tok/s, one labelled point per method (rows of
    bench quant: label, method, decode_tok_s, dppl_pct, weight_bytes)."""
    plt = _pyplot()
    rows = [r for r in rows if "decode_tok_s" in r and "dppl_pct" in r]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        color = "#888888" if r.get("method") == "original" else "#3b7dd8"
        ax.scatter(r["decode_tok_s"], r["dppl_pct"], s=30 + r.get("weight_bytes", 0) / 4e6, color=color, alpha=0.8)
        ax.annotate(r["label"], (r["decode_tok_s"], r["dppl_pct"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("decode tokens/s (batch 1; higher is faster)")
    ax.set_ylabel("Δ perplexity % vs the original weights (lower is better)")
    ax.grid(alpha=0.3)
    ax.set_title(title + "  (marker area: weight bytes)", fontsize=10)
    return _save(fig, path)


def quant_bars(results: list[dict], path: Path, title: str) -> Path:
    """Bars of decode tok/s, weight MB and Δ perplexity % per quantization method (bare PNG without matplotlib)."""
    rows = [r for r in results if "decode_tok_s" in r and "ppl" in r]
    try:
        plt = _pyplot()
    except TokenloomError:
        return _plain_bars(rows, Path(path))
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    specs = [("decode tok/s (batch 1)", [r["decode_tok_s"] for r in rows]),
             ("weight MB", [r["weight_bytes"] / 1e6 for r in rows]),
             ("Δ perplexity %", [r.get("dppl_pct", 0.0) for r in rows])]
    colors = ["#888888" if r["method"] == "original" else "#3b7dd8" for r in rows]
    for ax, (name, vals) in zip(axes, specs):
        bars = ax.bar(range(len(vals)), vals, color=colors)
        ax.set_title(name)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=7)
        ax.axhline(0, color="black", linewidth=0.5)
    fig.suptitle(title)
    return _save(fig, path)


def _plain_bars(rows: list[dict], path: Path) -> Path:
    """Without matplotlib: a bare PNG of decode tok/s bars (grey = original weights), no text."""
    import struct
    import zlib

    w, h, pad = 60 * max(len(rows), 1) + 20, 240, 10
    img = [[(255, 255, 255)] * w for _ in range(h)]
    top = max((r["decode_tok_s"] for r in rows), default=1.0) or 1.0
    for i, r in enumerate(rows):
        bh = int((h - 2 * pad) * r["decode_tok_s"] / top)
        color = (136, 136, 136) if r["method"] == "original" else (59, 125, 216)
        for y in range(h - pad - bh, h - pad):
            for x in range(pad + 60 * i + 5, pad + 60 * i + 50):
                img[y][x] = color
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in img)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path
