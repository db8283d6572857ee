"""Project the measured per-stage rates to the full Planktonzilla-17M collection.

Reads the ``summary`` of every result file under ``results/`` (one entry per stage, worker
count, input size and device), and for each stage takes the rate measured at the largest
input with the most workers on each device. Assumptions, stated in the output:

- a stage's rate grows linearly with workers from the measured per-worker rate times the
  measured 1 -> 2 worker scaling efficiency (one task per 16,384-image shard gives 1,062
  tasks, so up to ~1,000 workers stay busy; object-storage bandwidth is not modelled);
- CPU workers are one core each, as here; GPU figures are per GPU;
- stages whose cost is not linear in N (near-duplicate candidate generation) are
  extrapolated with the growth exponent measured over their input sizes (``bench_near.py``: up to
  4.2M hashes in one process, ``--in-process``, or on 2 workers), credited with more workers linearly.

Published anchors are quoted beside the projection, never mixed into it. Writes
``results/projection.json`` and the projection table in README.md. Run after the suites.
"""

from __future__ import annotations

import json

from common import RESULTS, label, load, machine, replace_block

N_PLANKTONZILLA = 17_400_000
WORKER_COUNTS = (2, 32, 256)
ANCHORS = [
    ("embed ViT-B/16", "clip-retrieval: ~1,100 img/s per A100 (8xA100 node, batch 512) -> 4.4 GPU-h for 17.4M"),
    ("embed ViT-L/14", "clip-retrieval: 312 img/s per A100 -> 15.5 GPU-h for 17.4M"),
    ("pipeline", "NeMo Curator: >= 900 img/s per 8-GPU node (ViT-L/14 + filters) -> 5.4 h for 17.4M"),
    ("dedup", "fastdup: ~4M img/h on 32 CPU cores -> 4.4 h for 17.4M"),
    ("ingest", "img2dataset: ~100 img/s per core with resize (download-bound)"),
]


# the scale run's stages under the names the other suites give them, so the million-image rates take their place
SCALE_STAGES = {"ingest": ("ingest", None), "dedup": ("dedup end to end (hash pass + exact + near)", None),
                "split": ("split", None), "classify": ("classify", "classify-builtin-cnn-64"),
                "env": ("env join", None), "abundance": ("abundance", None)}


def summaries() -> list[dict]:
    out = []
    for suite in ("ingest", "dedup", "embed", "env", "kmeans", "scale", "near", "near-cpu"):
        for data in load(suite):
            entries = data.get("summary", [])
            if suite == "scale":
                run = data["runs"][str(max(int(n) for n in data["runs"]))]
                entries = [{"stage": name, "model": model, "workers": 2, "images": run["images"], "device": "cpu",
                            "images_per_s": run["stages"][key]["images_per_s"]}
                           for key, (name, model) in SCALE_STAGES.items() if key in run["stages"]]
            elif suite == "near":  # measured up to 16.8M hashes: extrapolated the last 4% with its exponent
                largest = max(data["runs"], key=lambda r: r["hashes"])
                entries = [{"stage": "near-dup candidates", "workers": 2, "images": largest["hashes"], "device": "cpu",
                            "images_per_s": largest["hashes"] / largest["seconds"], "seconds": largest["seconds"],
                            "growth_exponent": data["summary"]["near_exponent"]}]
            elif suite == "near-cpu":  # one process's CPU seconds (``bench_near.py --in-process``): one worker
                largest = max(data["runs"], key=lambda r: r["hashes"])
                entries = [{"stage": "near-dup candidates", "workers": 1, "images": largest["hashes"], "device": "cpu",
                            "images_per_s": largest["hashes"] / largest["seconds"], "seconds": largest["seconds"],
                            "growth_exponent": data["exponent"]}]
            for entry in entries:
                out.append({**entry, "suite": suite, "commit": data["metadata"]["machine"]["commit"],
                            "cpus": data["metadata"]["machine"]["cpus"],
                            "device_name": data["metadata"]["machine"].get("device_name")})
    return out


def best_entries(entries: list[dict]) -> dict[tuple, dict]:
    """Per (stage, device): the entry at the largest input with the most workers, plus the
    1-worker rate at that size for the scaling efficiency."""
    chosen: dict[tuple, dict] = {}
    for e in entries:
        key = (e["stage"], e.get("model"), e.get("device", "cpu"))
        rank = (e["images"], e["workers"])
        if key not in chosen or rank >= (chosen[key]["images"], chosen[key]["workers"]):
            chosen[key] = e
    for key, e in chosen.items():
        one = [x for x in entries if (x["stage"], x.get("model"), x.get("device", "cpu")) == key
               and x["images"] == e["images"]
               and x["workers"] == 1]
        e["scaling"] = (e["images_per_s"] / (e["workers"] * one[-1]["images_per_s"])) if one and e["workers"] > 1 \
            else 1.0
    return chosen


def project(e: dict) -> dict:
    per_worker = e["images_per_s"] / e["workers"]
    rows = {}
    for w in WORKER_COUNTS if e.get("device", "cpu") == "cpu" else (1, 8, 64):
        if e.get("growth_exponent"):
            # cost grows faster than N (more look-alike pairs): extrapolate the measured time with the
            # measured exponent, and credit more workers only with the measured 2-worker parallelism
            seconds = e["seconds"] * (N_PLANKTONZILLA / e["images"]) ** e["growth_exponent"]
            seconds *= e["workers"] / w
        else:
            efficiency = 1.0 if w == 1 else e["scaling"]
            seconds = N_PLANKTONZILLA / (per_worker * w * efficiency)
        rows[str(w)] = {"images_per_s": N_PLANKTONZILLA / seconds, "wall_hours": seconds / 3600,
                        "worker_hours": seconds * w / 3600}
    return {"stage": e["stage"], "model": e.get("model"), "device": e.get("device", "cpu"),
            "device_name": e.get("device_name"),
            "measured": {k: e[k] for k in ("images", "workers", "images_per_s", "commit", "growth_exponent")
                         if k in e},
            "scaling_1_to_2": e["scaling"], "projection": rows}


def suite_tables() -> None:
    """The dedup and env tables of README.md, from the newest result of each suite."""
    for data in load("dedup")[-1:]:
        m, runs = data["metadata"], data["scaling"]["real_phash"]["runs"]
        (n, small), (n4, large) = sorted(runs.items(), key=lambda kv: int(kv[0]))
        peer, e2e = data["peer_on_encodings"], data["end_to_end"]
        replace_block("dedup", [
            "| machine | candidates at N (s) | at 4N (s) | time 4N/N | imagededup on encodings at "
            f"{peer['target_hashes']:,} (s) | pzscale (s) | speed-up | end to end {e2e['images']:,} images: "
            "imagededup (s) | pzscale 2 workers (s) | pzscale 1 worker (s) | near recall imagededup / pzscale "
            "| pair precision imagededup / pzscale |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {label(m)} | {small['seconds']:.2f} ({int(n):,}) | {large['seconds']:.2f} ({int(n4):,}) "
            f"| {large['seconds'] / small['seconds']:.1f} | {peer['imagededup_s_at_target_extrapolated']:,.0f} "
            f"(extrapolated N^{peer['imagededup_growth_exponent']:.1f}) | {peer['pzscale_s_at_target_measured']:.1f} "
            f"| {peer['speedup_at_target']:.0f}x | {e2e['imagededup_s']:.1f} | {e2e['pzscale_s']:.1f} "
            f"| {e2e['pzscale_1_worker_s']:.1f} "
            f"| {e2e['recall_near_imagededup']:.2f} / {e2e['recall_near_pzscale']:.2f} "
            f"| {e2e['pair_precision_imagededup']:.2f} / {e2e['pair_precision_pzscale_groups']:.2f} |"])
    for data in load("env")[-1:]:
        r = data["results"]
        replace_block("env", [
            "| machine | points | bare xarray .sel (pts/s) | pzscale kernel (pts/s) | kernel / bare | "
            "stage, 2 workers (pts/s) | stage / bare | per-point loop (pts/s) | kernel / loop |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {label(data['metadata'])} | {data['metadata']['points']:,} "
            f"| {r['bare_xarray_sel_points_per_s']['median']:,.0f} "
            f"| {r['pzscale_kernel_in_memory_points_per_s']['median']:,.0f} "
            f"| {r['ratios']['kernel_in_memory_vs_bare_xarray']:.2f} "
            f"| {r['pzscale_stage_2_workers_points_per_s']['median']:,.0f} | {r['ratios']['stage_vs_bare_xarray']:.2f} "
            f"| {r['per_point_loop_points_per_s']['median']:,.0f} | {r['ratios']['kernel_in_memory_vs_loop']:,.0f} |"])


def main() -> None:
    suite_tables()
    chosen = best_entries(summaries())
    projections = [project(e) for _, e in sorted(chosen.items())]
    out = {"metadata": {"machine": machine(), "images": N_PLANKTONZILLA, "worker_counts": list(WORKER_COUNTS),
                        "assumptions": __doc__.split("Assumptions, stated in the output:")[1].split("Published")[0]
                        .strip()},
           "projections": projections, "anchors": [{"what": a, "figure": f} for a, f in ANCHORS]}
    path = RESULTS / "projection.json"
    path.write_text(json.dumps(out, indent=1))
    lines = ["| stage | device | measured img/s (workers, images) | 1->2 scaling | "
             + " | ".join(f"{w} workers: wall h (worker-h)" for w in WORKER_COUNTS) + " |",
             "|---|---|---:|---:|" + "---:|" * len(WORKER_COUNTS)]
    for p in projections:
        m = p["measured"]
        cells = [f"{r['wall_hours']:,.2f} ({r['worker_hours']:,.1f})" for r in p["projection"].values()]
        heads = list(p["projection"])
        stage = f"{p['stage']} ({p['model']})" if p["model"] else p["stage"]
        lines.append(f"| {stage} | {p['device_name'] or p['device']} | {m['images_per_s']:,.1f} "
                     f"({m['workers']} w, {m['images']:,}) | {p['scaling_1_to_2']:.2f} | "
                     + " | ".join(f"{h} w: {c}" for h, c in zip(heads, cells, strict=True)) + " |")
    lines += ["", "Anchors (published, other hardware; not pzscale measurements):", ""]
    lines += [f"- {a}: {f}" for a, f in ANCHORS]
    replace_block("projection", lines)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
