"""A/B of one stage between two commits of pzscale, runs interleaved, on the same data and workers' settings.

For a change that should not move throughput (a refactor): each round runs the stage once with the code of
commit A and once with the code of commit B (each in a fresh process importing that commit's ``pzscale`` from
a git worktree, on a fresh 2-worker local cluster), alternating which goes first; the figure is the median of
the per-round ratios B/A, which cancels the drift of a shared VM's speed between rounds.

    python benchmarks/ab_commits.py --stage ingest --base a5430e9 --images 131072 --rounds 4
    python benchmarks/ab_commits.py --stage embed --base a5430e9 --images 8192 --rounds 3

Writes ``benchmarks/results/ab-<stage>--<host>--cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import commit, machine, save, stats  # noqa: E402

# Run in a fresh interpreter whose sys.path starts with the commit's tree; prints the images/s of the stage.
CHILD = r"""
import json, sys, tempfile, time, shutil
sys.path.insert(0, sys.argv[1])
import pzscale
assert pzscale.__file__.startswith(sys.argv[1]), pzscale.__file__
from pzscale.cluster import connect
stage, data, n, shard_len, model = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
with connect(n_workers=2) as client, tempfile.TemporaryDirectory(dir=data) as tmp:
    if stage == "ingest":
        from pzscale.ingest import ingest
        started = time.perf_counter()
        ingest([f"{data}/synth"], f"{tmp}/catalog.zarr", shard_len=shard_len, client=client, progress=False)
    else:
        from pzscale.embed import embed
        shutil.copytree(f"{data}/catalog.zarr", f"{tmp}/catalog.zarr")
        embed(f"{tmp}/catalog.zarr", model, client=client, progress=False)  # loads the model on the workers
        shutil.rmtree(f"{tmp}/catalog.zarr")
        shutil.copytree(f"{data}/catalog.zarr", f"{tmp}/catalog.zarr")
        started = time.perf_counter()
        embed(f"{tmp}/catalog.zarr", model, client=client, progress=False)
    print(json.dumps({"images_per_s": n / (time.perf_counter() - started)}))
"""


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    return where


def run(tree: Path, stage: str, data: Path, n: int, shard_len: int, model: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), stage, str(data), str(n), str(shard_len), model],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def prepare(stage: str, data: Path, n: int, shard_len: int) -> str:
    """Inputs made once with this tree's pzscale: synthetic parquet (or bench_ingest's, when it made the same
    size already), and for embed a catalog and a model."""
    from pzscale.cluster import connect
    from pzscale.synth import synth

    made = HERE / "data" / f"synth-{n}"
    if made.is_dir():
        data.mkdir(parents=True, exist_ok=True)
        (data / "synth").symlink_to(made)
    else:
        synth(data / "synth", images=n, seed=0, rows_per_file=4096)
    if stage != "embed":
        return ""
    import torch

    from pzscale.ingest import ingest
    from pzscale.ml import models

    with connect(n_workers=2) as client:
        ingest([str(data / "synth")], str(data / "catalog.zarr"), shard_len=shard_len, client=client, progress=False)
    torch.manual_seed(0)
    card = models.ModelCard(name="ab-cnn", version="1", kind="builtin", architecture=models.BUILTIN_ARCHITECTURE,
                            embed_dim=128, image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    models.save_model(data / "model", card, models.builtin_backbone(128).eval())
    return str(data / "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["ingest", "embed"], default="ingest")
    parser.add_argument("--base", required=True, help="commit A (the reference)")
    parser.add_argument("--head", default="HEAD", help="commit B (default: HEAD)")
    parser.add_argument("--images", type=int, default=131072)
    parser.add_argument("--shard-len", type=int, default=None, help="default: 16384 (ingest), 2048 (embed)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--name", default=None, help="results file name (default: ab-<stage>)")
    args = parser.parse_args()
    shard_len = args.shard_len or (16384 if args.stage == "ingest" else 2048)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        trees = {"A": worktree(args.base, work / "a"), "B": worktree(args.head, work / "b")}
        try:
            model = prepare(args.stage, work / "data", args.images, shard_len)
            rounds = []
            for r in range(args.rounds):
                order = ("A", "B") if r % 2 == 0 else ("B", "A")
                figures = {v: run(trees[v], args.stage, work / "data", args.images, shard_len, model) for v in order}
                rounds.append({**figures, "ratio_b_over_a": figures["B"] / figures["A"]})
                print(f"round {r + 1}: A {figures['A']:,.0f} img/s, B {figures['B']:,.0f} img/s, "
                      f"B/A {figures['B'] / figures['A']:.3f}", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    ratios = [r["ratio_b_over_a"] for r in rounds]
    result = {"machine": machine(), "commit": commit(), "stage": args.stage, "images": args.images,
              "shard_len": shard_len, "workers": 2, "base": args.base, "head": args.head, "rounds": rounds,
              "ratio_b_over_a": stats(ratios)}
    path = save(args.name or f"ab-{args.stage}", result)
    print(f"B/A median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}) -> {path}")


if __name__ == "__main__":
    main()
