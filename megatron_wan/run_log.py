"""Per-step metrics to `metrics.jsonl`, TensorBoard and (when configured) Weights & Biases, sample videos to the latter
two, on rank 0; and the collapse watchdog: Win Gap and Lose Gap climbing together is how DPO collapses (the paper's
Fig. 2, Sec. 4.3)."""

import json
import warnings
from pathlib import Path


class RunLog:
    """Appends one JSON object per step; a resumed run continues the same file, cut back to its checkpoint."""

    def __init__(self, out_dir, *, resume_step: int = 0, tensorboard: bool = True, wandb_project=None,
                 config: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        kept = []
        if self.path.exists():  # drop the steps after the checkpoint we resume from: they are redone
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if line.endswith("\n") and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(out_dir), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def log_videos(self, step: int, videos: dict, fps: int) -> None:
        """{tag: (RGB uint8 frames [F, H, W, 3], its mp4 path)} to TensorBoard (add_video) and W&B."""
        if self.tb:
            import torch

            for tag, (frames, _) in videos.items():  # add_video takes [N, T, C, H, W]
                self.tb.add_video(tag, torch.from_numpy(frames).permute(0, 3, 1, 2)[None], step, fps=fps)
            self.tb.flush()
        if self.wandb:
            import wandb

            self.wandb.log({tag: wandb.Video(str(path), fps=fps, format="mp4") for tag, (_, path) in videos.items()},
                           step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class CollapseWatchdog:
    """Warns once per episode when win_gap and lose_gap both exceed `threshold` for `patience` steps in a row."""

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience, self.run, self.warned = threshold, patience, 0, 0

    def update(self, step: int, metrics: dict) -> bool:
        """True when this step completes a warning."""
        climbing = metrics.get("win_gap", -1) > self.threshold and metrics.get("lose_gap", -1) > self.threshold
        self.run = self.run + 1 if climbing else 0
        if self.run == self.patience:
            self.warned += 1
            warnings.warn(f"step {step}: Win Gap ({metrics['win_gap']:.3g}) and Lose Gap ({metrics['lose_gap']:.3g}) "
                          f"have both stayed above {self.threshold:g} for {self.patience} steps: the signature of DPO "
                          "collapse; consider a larger SFT weight (objective.sft_weight=dgr) or a lower lr",
                          stacklevel=2)
            return True
        return False
