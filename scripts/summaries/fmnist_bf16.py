"""Paired fp32 vs bf16 table for the shipped config (issue 11): fp32 rows from results/fmnist (run
nosam_main), bf16 rows from runs/fmnist/final/bf16_* (scripts/run_fmnist.sh bf16_clean bf16_bpda);
writes results/fmnist/bf16/{rows.jsonl.gz,summary.md}.
Run from the repository root: python scripts/summaries/fmnist_bf16.py"""
import glob
import gzip
import json

from pursamere_fast.attacks.stats import format_accuracy, paired_robust, wilson_interval

fp32 = {}
with gzip.open("results/fmnist/rows.jsonl.gz", "rt") as f:
    for line in f:
        r = json.loads(line)
        if r.get("run") == "nosam_main" and r["defence"] == "pursamere":
            fp32[(r["attack"], r["index"])] = r
bf16 = {}
rows = []
for path in sorted(glob.glob("runs/fmnist/final/bf16_*/rows*.jsonl")):
    if "rank" not in path and glob.glob(path.replace("rows.jsonl", "rows.rank*.jsonl")):
        continue
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        key = (r["attack"], r["index"])
        if key not in bf16:
            bf16[key] = r
            rows.append(r)
with gzip.open("results/fmnist/bf16/rows.jsonl.gz", "wt") as f:
    for r in sorted(rows, key=lambda r: (r["attack"], r["index"])):
        f.write(json.dumps(r, sort_keys=True) + "\n")
out = ["| attack (linf 8/255) | n (paired) | fp32 accuracy % [95% CI] | bf16 accuracy % [95% CI] "
       "| only fp32 right | only bf16 right | McNemar p |",
       "| --- | --- | --- | --- | --- | --- | --- |"]


def ci(k, n):
    return format_accuracy(k / n, wilson_interval(k, n))


for attack in ("clean", "gpgd-linf-eps0.0313725-s20", "bpda-linf-eps0.0313725-s20"):
    keys = sorted(k for k in bf16 if k[0] == attack and k in fp32)
    if not keys:
        continue
    p = paired_robust({k: fp32[k]["robust_correct"] for k in keys}, {k: bf16[k]["robust_correct"] for k in keys})
    n = p["n"]
    out.append(f"| {attack} | {n} | {ci(p['a'], n)} | {ci(p['b'], n)} | {p['a_only']} | {p['b_only']} | {p['p']:.3g} |")
open("results/fmnist/bf16/summary.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
