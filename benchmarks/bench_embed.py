"""Embedding and classification throughput of the embed and classify stages against a bare torch loop.

The ceiling runs the same model, batch size and torch threads over tensors preloaded in
memory (decoded, letterboxed, normalised beforehand); pzscale's ``embed`` stage reads the
catalog, decodes, letterboxes, runs the model and writes float16 embeddings, on a
LocalCluster of 1 and 2 worker processes (one torch thread each). Two models: the built-in
CNN at 64 px (decode-bound) and an open_clip ViT-B-16 at 224 px with random weights (the
Planktonzilla architecture; compute-bound). ``classify`` runs the built-in CNN with a linear head over
Planktonzilla's 602 classes (7-rank lineages): its ceiling is the same loop through the head, softmax and
top-k; the stage also derives per-rank predictions and writes them. Classify has a second ceiling
(issue 18), ``bare_classify_loops``: the same bytes decoded, letterboxed and classified (top-k) in a
plain loop, one process with one torch thread per worker. Writes
``benchmarks/results/embed--<host>--<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from distributed import Client, LocalCluster

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save, stats  # noqa: E402

from pzscale import catalog, images  # noqa: E402
from pzscale.classify import classify  # noqa: E402
from pzscale.cluster import WORKER_ENV, connect  # noqa: E402
from pzscale.embed import embed  # noqa: E402
from pzscale.ingest import ingest  # noqa: E402
from pzscale.ml.inference import autocast  # noqa: E402
from pzscale.ml.models import (  # noqa: E402
    LoadedModel,
    ModelCard,
    builtin_backbone,
    import_checkpoint,
    load_model,
    make_head,
    save_model,
)
from pzscale.ml.preprocess import prepare_batch  # noqa: E402
from pzscale.synth import synth  # noqa: E402

HERE = Path(__file__).parent
N_CLASSES = 602  # Planktonzilla's harmonised classes


def make_models(work: Path) -> dict[str, str]:
    torch.manual_seed(0)
    cnn = str(work / "cnn")
    save_model(cnn, ModelCard(name="bench-cnn", version="1", kind="builtin", architecture="pzcnn-small",
                              embed_dim=128, image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3), builtin_backbone(128))
    import open_clip

    vit = open_clip.create_model("ViT-B-16", pretrained=None)
    torch.save(vit.state_dict(), work / "vit.pt")
    import_checkpoint(work / "vit.pt", kind="open_clip", architecture="ViT-B-16", out_dir=work / "vit",
                      name="bench-vit-b-16", version="random")
    head_dir = classify_model(work / "cnn-head")
    return {"builtin-cnn-64": cnn, "open_clip-ViT-B-16-224": str(work / "vit"), "classify-builtin-cnn-64": head_dir}


def classify_model(out: Path) -> str:
    """The built-in 64 px CNN with a linear head over 602 classes with 7-rank lineages (random weights)."""
    classes = [f"Eukaryota;Phylum{i % 7};Class{i % 23};Order{i % 61};Family{i % 151};Genus{i % 307};Species{i}"
               for i in range(N_CLASSES)]
    save_model(str(out), ModelCard(name="bench-cnn-head", version="1", kind="builtin", architecture="pzcnn-small",
                                   embed_dim=128, image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3, classes=classes,
                                   head="linear"), builtin_backbone(128), make_head("linear", 128, N_CLASSES))
    return str(out)


def bare_loop(model_dir: str, pixels: list[np.ndarray], batch_size: int, threads: int, device: str,
              precision: str = "fp32", top_k: int = 0) -> float:
    """Images/s of the model alone on preloaded batches; with ``top_k``, through the head, softmax and top-k."""
    torch.set_num_threads(threads)
    model = load_model(model_dir, device=device)
    card = model.card
    batches = [prepare_batch(pixels[i:i + batch_size], size=card.image_size, mean=card.mean, std=card.std,
                             device=device)[0] for i in range(0, len(pixels), batch_size)]
    with torch.no_grad(), autocast(device, precision):
        run = (lambda x: torch.topk(model.logits(x).softmax(-1), top_k)) if top_k else model.embed  # noqa: E731
        run(batches[0])  # warm-up
        _sync(device)
        start = time.perf_counter()
        for x in batches:
            run(x)
        _sync(device)  # the timed region ends when the device has finished
    return len(pixels) / (time.perf_counter() - start)


def bare_classify_loop(model: str | LoadedModel, images_bytes: list[bytes], batch: int, *, top_k: int = 5,
                       threads: int = 1, device: str = "cpu", precision: str = "fp32") -> float:
    """Images/s of a bare classify loop that decodes: for each batch of encoded images, decode
    (``images.decode``, PIL), letterbox to the model's size and normalise (``prepare_batch``, as the
    stage does), backbone + head, softmax, top-k. ``model``: a model directory or a loaded model
    with a head; ``images_bytes``: encoded images already in memory (all decodable); ``threads``
    torch threads. One warm-up batch runs untimed first. The ceiling of the classify stage (issue 18).
    """
    torch.set_num_threads(threads)
    start, end = _timed_classify(model, images_bytes, batch, top_k, device, precision)
    return len(images_bytes) / (end - start)


def _timed_classify(model: str | LoadedModel, images_bytes: list[bytes], batch: int, top_k: int, device: str,
                    precision: str, before=None) -> tuple[float, float]:
    """(start, end) on the monotonic clock (shared by the processes of one host) of the timed loop
    of ``bare_classify_loop``; ``before()`` runs after the warm-up, just before the clock starts."""
    model = load_model(model, device=device) if isinstance(model, str | os.PathLike) else model
    card = model.card
    k = min(top_k, len(card.classes))

    def run(encoded: list[bytes]) -> None:
        x, _ = prepare_batch([images.decode(b) for b in encoded], size=card.image_size, mean=card.mean,
                             std=card.std, device=model.device)
        probs, order = torch.topk(model.logits(x).softmax(-1), k)
        probs.cpu().numpy(), order.cpu().numpy()

    with torch.no_grad(), autocast(model.device, precision):
        run(images_bytes[:batch])  # warm-up
        _sync(str(model.device))
        if before is not None:
            before()
        start = time.perf_counter()
        for i in range(0, len(images_bytes), batch):
            run(images_bytes[i:i + batch])
        _sync(str(model.device))  # the timed region ends when the device has finished
    return start, time.perf_counter()


def _classify_loop_process(model_dir: str, images_bytes: list[bytes], batch: int, top_k: int, device: str,
                           precision: str, barrier) -> tuple[float, float]:
    """One process of ``bare_classify_loops``, one torch thread: the span of its timed loop."""
    torch.set_num_threads(1)
    return _timed_classify(model_dir, images_bytes, batch, top_k, device, precision, before=barrier.wait)


def bare_classify_loops(model_dir: str, images_bytes: list[bytes], batch: int, processes: int, *, top_k: int = 5,
                        device: str = "cpu", precision: str = "fp32") -> float:
    """Images/s of ``processes`` bare classify loops side by side, one torch thread each, the images
    split evenly between them (as the stage's workers split the shards): all images over the time
    from the first loop's start to the last one's end, the loops released together after loading
    the model and a warm-up batch. With one process it runs here (``bare_classify_loop``).
    """
    if processes == 1:
        return bare_classify_loop(model_dir, images_bytes, batch, top_k=top_k, device=device, precision=precision)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # no fork after torch has started its threads
    with context.Manager() as manager, ProcessPoolExecutor(processes, mp_context=context) as pool:
        barrier = manager.Barrier(processes)
        parts = [images_bytes[i::processes] for i in range(processes)]
        spans = list(pool.map(_classify_loop_process, [model_dir] * processes, parts, [batch] * processes,
                              [top_k] * processes, [device] * processes, [precision] * processes,
                              [barrier] * processes))
    return len(images_bytes) / (max(end for _, end in spans) - min(start for start, _ in spans))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stage(url: str, model_dir: str, workers: int, batch_size: int, repeats: int, n: int, device: str,
          precision: str = "fp32") -> list[float]:
    rates = []
    # the cluster users get (pzscale.cluster.connect: WORKER_ENV's allocator settings)
    with connect(n_workers=workers, quiet=True) as client:
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(dir=HERE / "data") as tmp:
                copy = f"{tmp}/cat.zarr"
                shutil.copytree(url, copy)
                start = time.perf_counter()
                stage_fn = classify if ModelCard.load(model_dir).head else embed
                stage_fn(copy, model_dir, client=client, batch_size=batch_size, device=device, precision=precision,
                         progress=False)
                rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    # The bare loop runs in this process: start it again with the workers' allocator settings (glibc
    # reads them at process start), so that both sides of the ratio run under them.
    if any(os.environ.get(k) != v for k, v in WORKER_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **WORKER_ENV})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    # small shards so that both workers get the same number of shards (384 images -> 6 shards)
    parser.add_argument("--shard-len", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one worker per GPU: use --workers 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", nargs="+", default=["fp32"], help="fp32 bf16 fp16 (autocast)")
    parser.add_argument("--label", default="", help="saved as results/embed--<host>--<device>-<label>.json, "
                                                     "beside the other runs instead of over them")
    parser.add_argument("--models", nargs="+",
                        default=["builtin-cnn-64", "open_clip-ViT-B-16-224", "classify-builtin-cnn-64"])
    args = parser.parse_args()
    (HERE / "data").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=HERE / "data"))
    try:
        synth(work / "src", images=args.images, seed=3)
        url = str(work / "cat.zarr")
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \
                Client(c) as client:
            ingest([str(work / "src")], url, shard_len=args.shard_len, client=client, progress=False)
        group = catalog.open_group(url)
        ok = np.flatnonzero(group["status"][:] == "ok")
        encoded = [bytes(b) for b in group["image_bytes"].get_orthogonal_selection((ok,))]
        pixels = [images.decode(b) for b in encoded]
        n = catalog.n_rows_of(group)
        results: dict = {"metadata": {"machine": machine(args.device), "suite": "embed", "images": n,
                                      "decoded": len(ok), "batch_size": args.batch_size, "repeats": args.repeats,
                                      "device": _device_name(args.device), "shard_len": args.shard_len},
                         "results": {}, "summary": []}
        for label, model_dir in make_models(work).items():
            if label not in args.models:
                continue
            for precision in args.precision:
                key = label if precision == "fp32" else f"{label}-{precision}"
                res = results["results"][key] = {}
                for workers in args.workers:
                    top_k = 5 if label.startswith("classify") else 0
                    bare = [bare_loop(model_dir, pixels, args.batch_size, workers, args.device, precision, top_k)
                            for _ in range(args.repeats)]
                    piped = stage(url, model_dir, workers, args.batch_size, args.repeats, n, args.device, precision)
                    ratio = statistics.median(piped) / statistics.median(bare)
                    res[f"{workers}w"] = {"bare_loop_images_per_s": stats(bare), "pzscale_images_per_s": stats(piped),
                                          "ratio": ratio}
                    if top_k:  # issue 18's ceiling: a loop that decodes the same bytes, one process per worker
                        loop = [bare_classify_loops(model_dir, encoded, args.batch_size, workers, top_k=top_k,
                                                    device=args.device, precision=precision)
                                for _ in range(args.repeats)]
                        res[f"{workers}w"]["decode_loop_images_per_s"] = stats(loop)
                        res[f"{workers}w"]["classify_vs_decode_loop"] = (statistics.median(piped)
                                                                         / statistics.median(loop))
                    results["summary"].append({
                        "stage": "classify" if top_k else "embed", "model": key, "workers": workers, "images": n,
                        "device": args.device.split(":")[0], "images_per_s": statistics.median(piped),
                        "ceiling_ratio": ratio, "ceiling_target": 0.9, "precision": precision,
                        **({"classify_vs_decode_loop": res[f"{workers}w"]["classify_vs_decode_loop"],
                            "decode_loop_target": 0.8} if top_k else {})})
                    print(key, workers, json.dumps(res[f"{workers}w"]), flush=True)
        out = save("embed", results, f"{args.device}-{args.label}" if args.label else args.device)
        render_readme()
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"


def render_readme() -> None:
    """Rewrite the embed table in benchmarks/README.md from every embed JSON under results/."""
    rows = ["| machine | device | model | images (shard) | workers | bare torch loop img/s | pzscale stage img/s "
            "| ratio | decode loop img/s | stage / decode loop |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in sorted((HERE / "results").glob("embed--*.json")):
        data = json.loads(path.read_text())
        m = data["metadata"]
        for model, per_workers in data["results"].items():
            for workers, r in per_workers.items():
                rows.append(f"| {m['machine']['cpus']} CPU, {m['machine']['commit']} | {m['device']} | {model} "
                            f"| {m['images']:,} ({m['shard_len']:,}) | {workers[:-1]} "
                            f"| {r['bare_loop_images_per_s']['median']:,.1f} "
                            f"| {r['pzscale_images_per_s']['median']:,.1f} | {r['ratio']:.2f} "
                            + (f"| {r['decode_loop_images_per_s']['median']:,.1f} "
                               f"| {r['classify_vs_decode_loop']:.2f} |" if "decode_loop_images_per_s" in r
                               else "| | |"))
    readme = HERE / "README.md"
    text = readme.read_text()
    head, rest = text.split("<!-- embed:start -->", 1)
    _, tail = rest.split("<!-- embed:end -->", 1)
    readme.write_text(head + "<!-- embed:start -->\n" + "\n".join(rows) + "\n<!-- embed:end -->" + tail)


if __name__ == "__main__":
    main()
