"""Vanilla Diffusion-DPO vs Reg-DPO (r = DGR) on a tiny model for a few hundred CPU steps, plotted like the paper's
Fig. 2 (DGR, r, DGR + r, Win Gap, Lose Gap, s, L_DPO).

    python -m megatron_wan.bench.stability --model TINY_WAN_DIR --data ENCODED_DIR --out outputs/stability

Both runs use the tiny recipe with the same seed, data and learning rate; only the SFT weight differs. The script
prints, per run, the mean Win Gap and Lose Gap over the first and last quarter of the steps and whether both rose
(the collapse signature the paper describes), and writes training_curves.png. It reports what happens; nothing
is tuned to agree with the paper.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from megatron_wan.eval.curves import plot_training

RUNS = {"DPO": ("dpo", "0"), "Reg-DPO (r = DGR)": ("regdpo", "dgr")}
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tiny-t2v-regdpo.yaml"


def _quarters(rows: list[dict], key: str) -> tuple[float, float]:
    n = max(1, len(rows) // 4)
    return (sum(r[key] for r in rows[:n]) / n, sum(r[key] for r in rows[-n:]) / n)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m megatron_wan.bench.stability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="tiny Wan folder (diffusers layout)")
    parser.add_argument("--data", required=True, help="encoded T2V dataset of that model")
    parser.add_argument("--out", default="outputs/stability")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=500.0)
    parser.add_argument("--finetune", choices=("lora", "full"), default="full")
    args = parser.parse_args(argv)
    out = Path(args.out)
    logs, report = {}, {}
    for name, (mode, weight) in RUNS.items():
        run_dir = out / mode
        overrides = [f"model.weights={args.model}", f"data.dir={args.data}", f"run.output_dir={run_dir}",
                     "run.context_parallel=1", f"run.steps={args.steps}", f"run.save_every={args.steps}",
                     "run.resume=false", "run.tensorboard=false", f"optim.lr={args.lr}", f"objective.mode={mode}",
                     f"objective.sft_weight={weight}", f"objective.beta={args.beta}",
                     f"run.finetune={args.finetune}"]
        if args.finetune == "full":
            overrides += ["lora=null", "objective.reference=copy"]
        subprocess.run([sys.executable, "-m", "megatron_wan.train", "--config", str(RECIPE), *overrides], check=True)
        logs[name] = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in logs[name].read_text().splitlines()]
        win, lose = _quarters(rows, "win_gap"), _quarters(rows, "lose_gap")
        report[name] = {"win_gap_first_last": win, "lose_gap_first_last": lose,
                        "both_rose": win[1] > win[0] and lose[1] > lose[0], "final_win_gap_negative": win[1] < 0,
                        "dgr_first_last": _quarters(rows, "dgr")}
    png = plot_training(logs, out / "training_curves.png")
    for name, r in report.items():
        print(f"{name}: Win Gap {r['win_gap_first_last'][0]:+.3g} -> {r['win_gap_first_last'][1]:+.3g}, "
              f"Lose Gap {r['lose_gap_first_last'][0]:+.3g} -> {r['lose_gap_first_last'][1]:+.3g} "
              f"(first -> last quarter means); both rose: {r['both_rose']}; "
              f"DGR {r['dgr_first_last'][0]:.3g} -> {r['dgr_first_last'][1]:.3g}")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(png)
    return report


if __name__ == "__main__":
    main()
