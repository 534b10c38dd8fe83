"""VBench's custom-input evaluation of folders of generated videos, ranked as in the paper's tables.

VBench pins transformers==4.33.2 and numpy<2, so it runs in its own environment (`make eval-env` builds
.venv-eval) as a subprocess: `python -m torch.distributed.run --standalone --nproc_per_node N -m
vbench.launch.evaluate --mode custom_input --load_ckpt_from_local True`, which needs CUDA. Weights are read from a
local cache directory (VBench's VBENCH_CACHE_DIR; clusters are offline, and VBench would try to download each
missing file), so every missing file is named before anything starts. VBench writes
OUTPUT/results_<time>_eval_results.json: {dimension: [aggregate score, [{"video_path", "video_results"}, ...]]}.
"""

import json
import os
import re
import subprocess
from pathlib import Path

from megatron_wan.eval.ranking import DECIMALS, DIMENSIONS, report
from megatron_wan.eval.tables import csv_text, named_path, number

VBENCH_DIMENSIONS = tuple(DIMENSIONS)  # the six dimensions VBench supports for custom input
VIDEO_SUFFIXES = (".mp4", ".gif", ".jpg", ".png")  # the files custom-input mode picks up in a folder
DEFAULT_VENV = Path(__file__).resolve().parents[2] / ".venv-eval"
_CLIP = "download https://openaipublic.azureedge.net/clip/models"
WEIGHTS = {  # dimension -> [(file under the cache dir, how to get it)], as VBench 0.1.5's local mode reads them
    "subject_consistency": [
        ("dino_model/facebookresearch_dino_main/hubconf.py",
         "git clone https://github.com/facebookresearch/dino {cache}/dino_model/facebookresearch_dino_main"),
        ("dino_model/dino_vitbase16_pretrain.pth",
         "download https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
        ("torch/hub/checkpoints/dino_vitbase16_pretrain.pth",
         "a copy of dino_model/dino_vitbase16_pretrain.pth (DINO's hub entry reads TORCH_HOME, set to {cache}/torch)"),
    ],
    "background_consistency": [
        ("clip_model/ViT-B-32.pt",
         f"{_CLIP}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
    ],
    "motion_smoothness": [
        ("amt_model/amt-s.pth", "download https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"),
    ],
    "dynamic_degree": [
        ("raft_model/models/raft-things.pth",
         "download https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip and unzip it in {cache}/raft_model"),
    ],
    "aesthetic_quality": [
        ("clip_model/ViT-L-14.pt",
         f"{_CLIP}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
        ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
         "download https://github.com/LAION-AI/aesthetic-predictor/blob/main/sa_0_4_vit_l_14_linear.pth?raw=true"),
    ],
    "imaging_quality": [
        ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth", "download "
         "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth"),
    ],
}
# Run by the environment's python with the GPU count and dimensions: vbench present (found without importing it),
# the dimensions' modules importable (a torch/torchvision mismatch fails there), enough CUDA devices.
_PROBE = """import importlib, importlib.util, sys
if importlib.util.find_spec("vbench") is None:
    sys.exit("vbench is not installed in it: run `make eval-env`")
for dim in sys.argv[2:]:
    try:
        importlib.import_module(f"vbench.{dim}")
    except Exception as e:
        sys.exit(f"vbench.{dim} does not import: {e!r}")
import torch
if torch.cuda.device_count() < int(sys.argv[1]):
    sys.exit(f"VBench's launcher needs {sys.argv[1]} CUDA device(s); torch there sees {torch.cuda.device_count()}")
"""


class VBenchUnavailable(RuntimeError):
    """VBench, its environment, a GPU, a weight file or the videos are missing; the message names each."""


def missing_requirements(venv, cache_dir, dimensions=VBENCH_DIMENSIONS, ngpus: int = 1) -> list[str]:
    """Everything missing to run `dimensions`, each with how to provide it; empty when VBench can run."""
    problems = []
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        problems.append(f"{python}: no VBench environment; build it with `make eval-env` or pass --venv")
    else:
        probe = subprocess.run([str(python), "-c", _PROBE, str(ngpus), *dimensions], capture_output=True, text=True)
        if probe.returncode:
            last = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
            problems.append(f"{python}: {last}")
    if cache_dir is None:
        problems.append("the weights cache directory: pass --cache-dir or set VBENCH_CACHE_DIR")
        return problems
    for dim in dimensions:
        if dim not in WEIGHTS:
            problems.append(f"dimension {dim!r}: custom-input mode supports only {', '.join(WEIGHTS)}")
            continue
        problems += [f"{Path(cache_dir) / rel} (for {dim}): {how.format(cache=cache_dir)}"
                     for rel, how in WEIGHTS[dim] if not (Path(cache_dir) / rel).is_file()]
    return problems


def missing_videos(videos: dict) -> list[str]:
    """Method -> folder entries whose folder has no video for VBench."""
    def has_videos(folder):
        return folder.is_dir() and any(p.suffix.lower() in VIDEO_SUFFIXES for p in folder.iterdir())

    return [f"{folder} (method {name!r}): no {'/'.join(VIDEO_SUFFIXES)} files"
            for name, folder in videos.items() if not has_videos(Path(folder))]


def run_vbench(videos, out_dir, *, venv, cache_dir, dimensions=VBENCH_DIMENSIONS, ngpus: int = 1) -> Path:
    """Run VBench on one folder of videos; returns the results JSON it wrote under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(venv) / "bin" / "python"), "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ngpus}", "-m", "vbench.launch.evaluate", "--videos_path", str(videos),
           "--dimension", *dimensions, "--mode", "custom_input", "--load_ckpt_from_local", "True",
           "--output_path", str(out_dir)]
    env = dict(os.environ, VBENCH_CACHE_DIR=str(cache_dir), TORCH_HOME=str(Path(cache_dir) / "torch"))
    before = {p: p.stat().st_mtime_ns for p in out_dir.glob("*_eval_results.json")}
    if subprocess.run(cmd, env=env).returncode:
        raise RuntimeError(f"VBench failed on {videos} (command: {' '.join(cmd)})")
    written = [p for p in out_dir.glob("*_eval_results.json") if before.get(p) != p.stat().st_mtime_ns]
    if not written:
        raise RuntimeError(f"{out_dir}: VBench wrote no *_eval_results.json (command: {' '.join(cmd)})")
    return max(written, key=lambda p: p.stat().st_mtime)


def parse_results(path, dimensions=VBENCH_DIMENSIONS) -> dict:
    """dimension -> aggregate score from a VBench `*_eval_results.json`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of dimension -> [aggregate score, per-video results]")
    scores = {}
    for dim in dimensions:
        if dim not in data:
            raise ValueError(f"{path}: no {dim!r} (it has {', '.join(data) or 'nothing'})")
        entry = data[dim]
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            raise ValueError(f"{path}: {dim!r} is not [aggregate score, per-video results]")
        scores[dim] = number(entry[0], f"{path}, {dim}")
    return scores


def add_arguments(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", type=named_path, action="append", metavar="METHOD=DIR",
                        help="a method's generated videos (repeat per method); runs VBench")
    source.add_argument("--results", type=named_path, action="append", metavar="METHOD=JSON",
                        help="a method's existing VBench *_eval_results.json (repeat per method)")
    parser.add_argument("--out", type=Path, required=True,
                        help="writes METHOD/ (VBench's output), values.csv, vbench.md and vbench.csv")
    parser.add_argument("--cache-dir", type=Path, default=os.environ.get("VBENCH_CACHE_DIR"),
                        help="VBench's weights (default: $VBENCH_CACHE_DIR)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the VBench environment (make eval-env)")
    parser.add_argument("--ngpus", type=int, default=1, help="GPUs per VBench run")
    parser.add_argument("--dimensions", nargs="+", default=list(VBENCH_DIMENSIONS), metavar="DIM")
    parser.add_argument("--base", help="method the arrows compare with (the paper: Base)")
    parser.add_argument("--decimals", type=int, default=DECIMALS, help="printed precision; ties are judged at it")


def run(args):
    if args.videos:
        videos = dict(args.videos)
        problems = missing_requirements(args.venv, args.cache_dir, args.dimensions, args.ngpus) + missing_videos(videos)
        if problems:
            raise VBenchUnavailable("VBench cannot run; missing:\n  " + "\n  ".join(problems))
        results = {name: run_vbench(folder, args.out / re.sub(r"[^\w.+-]+", "_", name), venv=args.venv,
                                    cache_dir=args.cache_dir, dimensions=args.dimensions, ngpus=args.ngpus)
                   for name, folder in videos.items()}
    else:
        results = dict(args.results)
    values = {name: parse_results(path, args.dimensions) for name, path in results.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [[name, *(repr(scores[d]) for d in args.dimensions)] for name, scores in values.items()]
    (args.out / "values.csv").write_text(csv_text(["method", *args.dimensions], rows), encoding="utf-8")
    print(report(values, args.out / "vbench", args.base, args.decimals), end="")
    return values
