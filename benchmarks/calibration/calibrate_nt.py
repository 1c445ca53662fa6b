"""Calibrate the leaderboard's negative-transfer verdict on the quick suite's pairs.

Two throw-away methods (``plugins/calib_methods.py``, loaded with
``--plugins-dir``) run next to each pair's reference over a pool of seeds:

- ``calib-null``: the reference at an independent seed stream: it differs
  from the reference by training noise only; a calibrated test flags it in at
  most 5 % of cells;
- ``calib-planted``: the null's very model with a planted target-accuracy
  loss of about 5 points (its exact size per pair is measured with labels:
  planted minus null, same weights, averaged over the pool).

A calibration replicate is a sweep with ``S`` seeds: a subset of ``S`` seeds
drawn from the pool.  Every seed's runs are i.i.d. draws (data split,
training noise), so every ``S``-subset is a valid replicate, and averaging a
verdict over many subsets estimates its rate without bias (a U-statistic);
the pool's runs are reused across replicates instead of training new models
for each.  Subsets overlap, so the rates are more precise than the number of
subsets suggests only up to about ``pool / S`` independent sweeps; the
summary states the pool size.

For each ``S`` and each candidate test the script reports the null's
false-positive rate, the planted effect's power, the stated minimum
detectable effect (MDE) per cell, and the planted effect's power in the
cells where it exceeds the stated MDE.  Candidate tests (one-sided, level
0.05, "the method is worse"):

- ``t-floor`` (the verdict the leaderboard uses,
  :func:`dabench.verdicts.nt_verdict`): paired t-test over seeds per cell,
  its spread never below the test points' sampling spread of a gap;
- ``t-seeds``: the same without the floor;
- ``t-seeds-holm``: the previous verdict, a two-sided paired t-test with
  Holm's correction over the method's pairs;
- ``hier-bootstrap``: resample seeds, then test points within each seed
  (exactly, as multinomial counts of per-point differences -1/0/+1);
- ``points-only``: a paired z-test over the pooled test points (ignores
  training noise);
- ``var-components``: the seeds' variance, or the test points' sampling
  variance where that is larger (a normal test then), which uses test points
  where the seeds happen to agree.

It also reports which share of the per-seed gap's variance is the test
points' sampling noise (the rest is training noise, which only more seeds
can average out).

Usage (CPU, one thread per run, resumable: stores are kept in ``--work``)::

    python benchmarks/calibration/calibrate_nt.py run --pool 40
    python benchmarks/calibration/calibrate_nt.py analyse --pool 40

``run`` first runs a one-seed pilot (reference, null, planted at flip
``--pilot-flip``) to choose each pair's flip fraction for a loss of about
``--target-loss``, then each pair's suite over the pool.  ``analyse`` writes
``calibration.json``, ``calibration.md`` and PNG figures into ``--out``
(default: this folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from dabench.leaderboard import _columns, _frame, _pair_reference, holm, paired_t_test  # noqa: E402
from dabench.store import RunStore  # noqa: E402
from dabench.verdicts import NT_ALPHA, decode_bits, nt_verdict, point_sd  # noqa: E402

NULL, PLANTED = "calib-null", "calib-planted"
TESTS = ("t-floor", "t-seeds", "t-seeds-holm", "hier-bootstrap", "points-only", "var-components")


# ---------------------------------------------------------------- running


def _suite_text(base: Path, name: str, pairs: list, flips: dict[int, float] | None, lr: float) -> str:
    """A suite with the base suite's settings and ``pairs``, and the
    references + calibration methods (``flips``: per pair index)."""
    raw = tomllib.loads(base.read_text())
    out = [f'name = "{name}"', f"seeds = 1", f'validator = "{raw.get("validator", "source-val")}"',
           f'backbone = "{raw.get("backbone", "default")}"', "pairs = ["]
    out += [f"  {_toml(p)}," for p in pairs]
    out.append("]")
    for table in ("protocol", "budget", "source_model"):
        if table in raw:
            out.append(f"[{table}]")
            out += [f"{k} = {_toml(v)}" for k, v in raw[table].items()]
    flip = next(iter(flips.values())) if flips else 0.06
    out += ["[methods.source-only]", "[methods.target-only-k]", f"params = {{ lr = {lr} }}",
            f"[methods.{NULL}]", f"params = {{ lr = {lr} }}",
            f"[methods.{PLANTED}]", f"params = {{ lr = {lr}, flip = {flip:.4f} }}"]
    return "\n".join(out) + "\n"


def _toml(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def _dabench_run(suite: Path, results: Path, seeds: int, log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dabench", "run", str(suite), "--plugins-dir", str(HERE / "plugins"),
           "--results", str(results), "--seeds", str(seeds), "--jobs", "1", "--threads", "1"]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc not in (0, 1):
        raise SystemExit(f"dabench run failed ({rc}); see {log}")


def cmd_run(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.suite)
    pairs = tomllib.loads(base.read_text())["pairs"]
    # pilot: one seed, every pair, planted at a fixed flip -> loss per unit of flip per pair
    pilot_suite = work / "pilot.toml"
    pilot_suite.write_text(_suite_text(base, "calib-pilot", pairs, {0: args.pilot_flip}, args.lr))
    _dabench_run(pilot_suite, work / "pilot", args.pilot_seeds, work / "run.log")
    loss = _planted_loss(RunStore(work / "pilot", create=False).rows())
    flips = {}
    for i, p in enumerate(pairs):
        col = _pilot_column(p, loss)
        per_flip = loss[col] / args.pilot_flip
        flips[i] = float(min(0.5, max(0.01, args.target_loss / per_flip))) if per_flip > 0 else 0.5
    (work / "flips.json").write_text(json.dumps({"pilot_loss": loss, "pilot_flip": args.pilot_flip,
                                                "flips": flips}, indent=1))
    for i, p in enumerate(pairs):
        suite = work / f"pair{i}.toml"
        suite.write_text(_suite_text(base, f"calib-pair{i}", [p], {i: flips[i]}, args.lr))
        _dabench_run(suite, work / f"pair{i}", args.pool, work / "run.log")


def _pilot_column(pair, loss: dict[str, float]) -> str:
    name = pair if isinstance(pair, str) else pair["pair"]
    cands = [c for c in loss if c.split(" [")[0] == name]
    if len(cands) == 1:
        return cands[0]
    proto = {} if isinstance(pair, str) else pair.get("protocol", {})
    want = "native" if proto.get("feature_space") == "native" else "shared"
    return next(c for c in cands if f"feature_space={want}" in c)


def _planted_loss(rows: list[dict]) -> dict[str, float]:
    """Mean planted loss (null minus planted accuracy, same weights) per column."""
    df = _frame(rows)
    df = df.assign(column=_columns(df))
    ok = df[df["status"] == "ok"]
    out = {}
    for col, g in ok.groupby("column"):
        n = g[g["method"] == NULL].set_index("seed")["target_acc"]
        p = g[g["method"] == PLANTED].set_index("seed")["target_acc"]
        common = n.index.intersection(p.index)
        if len(common):
            out[col] = float((n.loc[common] - p.loc[common]).mean())
    return out


# ---------------------------------------------------------------- analysis


def _load(work: Path, pool: int) -> dict[str, dict]:
    """Per pair: reference name, seeds, accuracies and per-point correctness."""
    data = {}
    for folder in sorted(work.glob("pair*")):
        if not (folder / "runs.sqlite").exists():
            continue
        rows = RunStore(folder, create=False).rows()
        if not rows:
            continue
        df = _frame(rows)
        df = df.assign(column=_columns(df))
        df = df[(df["status"] == "ok") & (df["seed"] < pool)]
        for col, g in df.groupby("column"):
            ref = _pair_reference(g["protocol"].iloc[0], "source-only")
            by = {m: {int(r["seed"]): r for r in g[g["method"] == m].to_dict("records")} for m in (ref, NULL, PLANTED)}
            seeds = sorted(set(by[ref]) & set(by[NULL]) & set(by[PLANTED]))
            d = {"reference": ref, "seeds": seeds}
            for m, key in ((ref, "ref"), (NULL, "null"), (PLANTED, "planted")):
                d[key] = np.array([by[m][s]["target_acc"] for s in seeds])
                d[key + "_bits"] = [decode_bits(by[m][s].get("x_target_correct")) for s in seeds]
            data[col] = d
    return data


def _boot_p(dm: list[np.ndarray], rng: np.random.Generator, n_boot: int) -> float:
    """Hierarchical bootstrap p (one-sided, worse) from per-seed per-point
    differences; points are resampled exactly as multinomial counts."""
    k = len(dm)
    probs = []
    for d in dm:
        n = len(d)
        probs.append((n, np.array([(d < 0).mean(), (d == 0).mean(), (d > 0).mean()])))
    total = np.zeros(n_boot)
    picks = rng.integers(0, k, size=(n_boot, k))
    for j in range(k):
        # the mean gap of the seed drawn in position j, its points resampled
        means = np.empty(n_boot)
        for s in range(k):
            idx = picks[:, j] == s
            m = int(idx.sum())
            if m:
                n, p = probs[s]
                c = rng.multinomial(n, p, size=m)
                means[idx] = (c[:, 2] - c[:, 0]) / n
        total += means
    total /= k
    return float((1 + (total >= 0).sum()) / (n_boot + 1))


def _points_p(dm: list[np.ndarray]) -> float:
    from scipy import stats

    d = np.concatenate(dm)
    sd = d.std(ddof=1)
    return float(stats.norm.cdf(d.mean() / (sd / math.sqrt(len(d))))) if sd > 0 else (0.0 if d.mean() < 0 else 1.0)


def _vc_p(gaps: np.ndarray, dm: list[np.ndarray]) -> float:
    from scipy import stats

    s = len(gaps)
    v_seeds = gaps.var(ddof=1)
    v_points = float(np.mean([d.var(ddof=1) / len(d) for d in dm]))
    if v_points >= v_seeds:
        return float(stats.norm.cdf(gaps.mean() / math.sqrt(v_points / s)))
    return float(stats.t.cdf(gaps.mean() / math.sqrt(v_seeds / s), df=s - 1))


def analyse(data: dict[str, dict], sizes: list[int], n_subsets: int, n_boot: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cols = sorted(c for c in data if len(data[c]["seeds"]) >= 3)
    out: dict = {"pairs": {}, "sizes": {}}
    for col in cols:
        d = data[col]
        eff = d["null"] - d["planted"]
        gaps = d["null"] - d["ref"]
        # variance shares: test-point sampling noise of the null's per-seed gap vs its total variance
        dm = [a.astype(float) - b.astype(float) for a, b in zip(d["null_bits"], d["ref_bits"])]
        v_points = float(np.mean([x.var(ddof=1) / len(x) for x in dm]))
        out["pairs"][col] = {
            "reference": d["reference"], "n_seeds": len(d["seeds"]),
            "reference_acc_mean": float(d["ref"].mean()), "reference_acc_sd": float(d["ref"].std(ddof=1)),
            "null_acc_mean": float(d["null"].mean()),
            "null_gap_mean": float(gaps.mean()), "null_gap_sd": float(gaps.std(ddof=1)),
            "planted_effect": float(eff.mean()), "planted_effect_sd": float(eff.std(ddof=1)),
            "test_points": int(np.median([len(x) for x in dm])),
            "gap_variance_share_test_points": v_points / float(gaps.var(ddof=1)),
        }
    for S in sizes:
        rows = {t: {"null": [], "planted": []} for t in TESTS}
        mde_null, mde_pl, cond, null_better = [], [], [], []
        per_pair = {col: {"mde_null": [], "mde_planted": [], "fp": [], "power": [], "cond_flag": []} for col in cols}
        scols = [c for c in cols if len(data[c]["seeds"]) >= S]
        if not scols:
            continue
        pools = {c: len(data[c]["seeds"]) for c in scols}
        for _ in range(n_subsets):  # a replicate sweep: S seeds drawn per pair from its pool
            raw_two = {"null": [], "planted": []}
            for col in scols:
                d = data[col]
                idx = list(rng.choice(pools[col], S, replace=False))
                for kind in ("null", "planted"):
                    gaps = d[kind][idx] - d["ref"][idx]
                    v = nt_verdict(gaps, point_sd=point_sd([d[kind + "_bits"][i] for i in idx],
                                                           [d["ref_bits"][i] for i in idx]))
                    dm = [d[kind + "_bits"][i].astype(float) - d["ref_bits"][i].astype(float) for i in idx]
                    flags = {
                        "t-floor": v.flag == "negative transfer",
                        "t-seeds": nt_verdict(gaps).flag == "negative transfer",
                        "hier-bootstrap": _boot_p(dm, rng, n_boot) < NT_ALPHA,
                        "points-only": _points_p(dm) < NT_ALPHA,
                        "var-components": _vc_p(gaps, dm) < NT_ALPHA,
                    }
                    raw_two[kind].append((paired_t_test(gaps)[1], float(gaps.mean())))
                    for t, f in flags.items():
                        rows[t][kind].append(f)
                    if kind == "null":
                        null_better.append(v.flag == "better")
                        mde_null.append(v.mde)
                        per_pair[col]["mde_null"].append(v.mde)
                        per_pair[col]["fp"].append(flags["t-floor"])
                    else:
                        mde_pl.append(v.mde)
                        per_pair[col]["mde_planted"].append(v.mde)
                        per_pair[col]["power"].append(flags["t-floor"])
                        true = out["pairs"][col]["planted_effect"]
                        if math.isfinite(v.mde) and true > v.mde:
                            cond.append(flags["t-floor"])
                            per_pair[col]["cond_flag"].append(flags["t-floor"])
            for kind in ("null", "planted"):
                ps = holm([p for p, _ in raw_two[kind]])
                rows["t-seeds-holm"][kind] += [p < NT_ALPHA and m < 0 for p, (_, m) in zip(ps, raw_two[kind])]
        res = {
            "n_subsets": n_subsets, "pool": min(pools.values()),
            "false_positive_rate": {t: float(np.mean(rows[t]["null"])) for t in TESTS},
            # the null and the reference are exchangeable (one procedure, independent seeds): the chosen
            # test's rate of calling the null *better* estimates the same false-positive rate
            "false_better_rate": float(np.mean(null_better)),
            "power_planted": {t: float(np.mean(rows[t]["planted"])) for t in TESTS},
            "mde_null_median": float(np.nanmedian(mde_null)),
            "mde_planted_median": float(np.nanmedian(mde_pl)),
            "share_cells_mde_below_effect": float(len(cond) / max(1, len(mde_pl))),
            "power_where_effect_exceeds_mde": float(np.mean(cond)) if cond else math.nan,
            "n_cells_effect_exceeds_mde": len(cond),
            "per_pair": {
                col: {"mde_null_median": float(np.nanmedian(v["mde_null"])),
                      "mde_null_q25": float(np.nanpercentile(v["mde_null"], 25)),
                      "mde_null_q75": float(np.nanpercentile(v["mde_null"], 75)),
                      "mde_planted_median": float(np.nanmedian(v["mde_planted"])),
                      "false_positive_rate": float(np.mean(v["fp"])),
                      "power_planted": float(np.mean(v["power"])),
                      "share_effect_exceeds_mde": len(v["cond_flag"]) / max(1, len(v["power"])),
                      "power_where_effect_exceeds_mde": float(np.mean(v["cond_flag"])) if v["cond_flag"] else None}
                for col, v in per_pair.items() if col in scols},
        }
        out["sizes"][str(S)] = res
        print(f"S={S}: FP {res['false_positive_rate']}  power {res['power_planted']}  "
              f"MDE null median {100 * res['mde_null_median']:.1f}  power|effect>MDE "
              f"{res['power_where_effect_exceeds_mde']:.2f} over {len(cond)} cells", flush=True)
    return out


def _figures(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    sizes = sorted(int(s) for s in res["sizes"])
    names = []
    # 1. false-positive rate and power per test vs seeds
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for t in TESTS:
        axes[0].plot(sizes, [100 * res["sizes"][str(s)]["false_positive_rate"][t] for s in sizes], "o-", label=t)
        axes[1].plot(sizes, [100 * res["sizes"][str(s)]["power_planted"][t] for s in sizes], "o-", label=t)
    axes[0].axhline(5, color="k", ls="--", lw=1)
    axes[0].set(xlabel="seeds", ylabel="null flagged (% of cells)", title="False-positive rate (null)")
    axes[1].axhline(80, color="k", ls="--", lw=1)
    axes[1].set(xlabel="seeds", ylabel="planted flagged (% of cells)", title="Power at the planted ~5-point loss")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "calibration_rates.png", dpi=100)
    plt.close(fig)
    names.append("calibration_rates.png")
    # 2. stated MDE per pair vs seeds
    pairs = sorted(res["pairs"])
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for j, col in enumerate(pairs):
        have = [s for s in sizes if col in res["sizes"][str(s)]["per_pair"]]
        med = [100 * res["sizes"][str(s)]["per_pair"][col]["mde_null_median"] for s in have]
        lo = [100 * res["sizes"][str(s)]["per_pair"][col]["mde_null_q25"] for s in have]
        hi = [100 * res["sizes"][str(s)]["per_pair"][col]["mde_null_q75"] for s in have]
        x = np.array(have) + (j - len(pairs) / 2) * 0.06
        ax.errorbar(x, med, yerr=[np.array(med) - lo, np.array(hi) - med], fmt="o-", capsize=2,
                    label=col.replace(":", "→"))
    ax.axhline(5, color="k", ls="--", lw=1)
    ax.set(xlabel="seeds", ylabel="stated MDE (points)", yscale="log",
           title="Minimum detectable loss per cell (null cells: the reference's training noise), median and IQR")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "calibration_mde.png", dpi=100)
    plt.close(fig)
    names.append("calibration_mde.png")
    return names


def _markdown(res: dict, figs: list[str], cmdline: str) -> str:
    sizes = sorted(int(s) for s in res["sizes"])
    L = ["# Negative-transfer verdict: calibration on the quick suite's pairs", "",
         f"Generated by `{cmdline}` (see the script's docstring for the method).", "",
         "## Pairs (pool of seeds)", "",
         "| Pair | Reference | Seeds | Ref. acc. (mean ± sd) | Null gap sd | Planted loss | Test points | "
         "Gap variance from test points |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    for col, p in sorted(res["pairs"].items()):
        L.append(f"| {col.replace(':', '→')} | {p['reference']} | {p['n_seeds']} | "
                 f"{100 * p['reference_acc_mean']:.1f} ± {100 * p['reference_acc_sd']:.1f} | "
                 f"{100 * p['null_gap_sd']:.1f} | {100 * p['planted_effect']:.1f} | {p['test_points']} | "
                 f"{100 * p['gap_variance_share_test_points']:.0f} % |")
    L += ["", "## Rates per test and number of seeds", "",
          "False positives: the null flagged as negative transfer (% of cells); power: the planted loss flagged. "
          "The null and the reference are one procedure with independent seeds, so the chosen test's rate of "
          "calling the null *better* estimates the same false-positive rate (last column): the two differ by the "
          "pool's sampling noise.", "",
          "| Seeds | " + " | ".join(f"FP {t}" for t in TESTS) + " | " + " | ".join(f"power {t}" for t in TESTS)
          + " | null called better (t-floor) |",
          "|--:|" + "--:|" * (2 * len(TESTS) + 1)]
    for s in sizes:
        r = res["sizes"][str(s)]
        L.append(f"| {s} | " + " | ".join(f"{100 * r['false_positive_rate'][t]:.1f}" for t in TESTS) + " | "
                 + " | ".join(f"{100 * r['power_planted'][t]:.1f}" for t in TESTS)
                 + f" | {100 * r['false_better_rate']:.1f} |")
    L += ["", "## The chosen test (t-floor): stated MDE and power where the planted loss exceeds it", "",
          "| Seeds | Subsets | Median MDE, null cells (pts) | Cells where the planted loss > stated MDE | "
          "Power there |", "|--:|--:|--:|--:|--:|"]
    for s in sizes:
        r = res["sizes"][str(s)]
        pw = r["power_where_effect_exceeds_mde"]
        L.append(f"| {s} | {r['n_subsets']} | {100 * r['mde_null_median']:.1f} | "
                 f"{100 * r['share_cells_mde_below_effect']:.0f} % | {'—' if pw != pw else f'{100 * pw:.1f} %'} |")
    L += ["", "Per pair (median stated MDE of the null cells, points; false-positive rate; power at the planted loss):",
          "", "| Pair | " + " | ".join(f"{s} seeds" for s in sizes) + " |", "|---|" + "--:|" * len(sizes)]
    for col in sorted(res["pairs"]):
        cells = []
        for s in sizes:
            pp = res["sizes"][str(s)]["per_pair"].get(col)
            if pp is None:
                cells.append("—")
                continue
            cells.append(f"MDE {100 * pp['mde_null_median']:.1f}, FP {100 * pp['false_positive_rate']:.0f} %, "
                         f"power {100 * pp['power_planted']:.0f} %")
        L.append(f"| {col.replace(':', '→')} | " + " | ".join(cells) + " |")
    L += [""] + [f"![{f}]({f})" for f in figs]
    return "\n".join(L) + "\n"


def cmd_analyse(args: argparse.Namespace) -> None:
    data = _load(Path(args.work), args.pool)
    if not data:
        raise SystemExit(f"no calibration runs in {args.work}: run `{Path(__file__).name} run` first")
    sizes = [int(s) for s in args.sizes.split(",")]
    res = analyse(data, sizes, args.subsets, args.boot)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["settings"] = {"pool": args.pool, "sizes": sizes, "subsets": args.subsets, "bootstrap": args.boot,
                       "alpha": NT_ALPHA}
    (out / "calibration.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    figs = _figures(res, out)
    cmdline = (f"python benchmarks/calibration/calibrate_nt.py analyse --pool {args.pool} --sizes {args.sizes} "
               f"--subsets {args.subsets}")
    (out / "calibration.md").write_text(_markdown(res, figs, cmdline))
    print(f"wrote {out / 'calibration.md'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "analyse"):
        p = sub.add_parser(name)
        p.add_argument("--work", default=str(ROOT / ".calibration"), help="stores of the calibration sweeps")
        p.add_argument("--pool", type=int, default=40, help="seeds per pair")
        if name == "run":
            p.add_argument("--suite", default=str(ROOT / "suites" / "quick.toml"))
            p.add_argument("--lr", type=float, default=0.03, help="the suite's reference learning rate")
            p.add_argument("--target-loss", type=float, default=0.05)
            p.add_argument("--pilot-flip", type=float, default=0.06)
            p.add_argument("--pilot-seeds", type=int, default=1)
        else:
            p.add_argument("--sizes", default="3,5,8,10")
            p.add_argument("--subsets", type=int, default=300)
            p.add_argument("--boot", type=int, default=1000)
            p.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    (cmd_run if args.cmd == "run" else cmd_analyse)(args)


if __name__ == "__main__":
    main()
