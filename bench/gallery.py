"""Gallery search: FAISS exact (IndexFlatIP) against IVF (IndexIVFFlat) at 10k-1M vectors.

Synthetic clustered unit vectors (dim 512, one cluster per "SKU", 8 vectors per SKU around
its centre); queries are fresh draws around the centres. For each size, in one process:
build time, memory of the index (its serialised bytes), query time per query, and the IVF
recall@1 / recall@10 against the exact search (the share of the exact nearest vectors the IVF
search returns; rp2k_dist.evaluation.gallery.recall_against_exact does the same), at the
index settings ``rp2k gallery build --index ivf`` uses (nlist about 4 sqrt(N), nprobe 8) and
at nprobe 32. Ratios are IVF / exact, measured in the same run.

  python bench/gallery.py                       # 10k, 100k, 1M
  python bench/gallery.py --sizes 10000,100000 --queries 500
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import machine_info, print_machine, print_table
from rp2k_dist.evaluation.gallery import build_index


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    """``n`` unit vectors around random ``centres`` (rows of unit norm), float32."""
    out = np.empty((n, centres.shape[1]), np.float32)
    for start in range(0, n, 65536):  # chunks keep the temporary float64 small at 1M x 512
        m = min(65536, n - start)
        block = centres[rng.integers(0, len(centres), m)] + spread * rng.standard_normal((m, centres.shape[1]))
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall(truth: np.ndarray, found: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(t[:k]) & set(f[:k])) / k for t, f in zip(truth, found)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--spread", type=float, default=0.04, help="per-coordinate noise around a centre")
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads (0: its default)")
    args = parser.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print_machine(machine_info())
    print(f"faiss {faiss.__version__}, dim {args.dim}, {args.queries} queries, spread {args.spread}")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rng = np.random.default_rng(n)
        centres = rng.standard_normal((max(1, n // 8), args.dim))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        vectors = clustered(rng, centres, n, args.spread)
        queries = clustered(rng, centres, args.queries, args.spread)
        result = {}
        for kind in ("flat", "ivf"):
            start = time.perf_counter()
            index, _, nlist, nprobe = build_index(vectors, kind)
            built = time.perf_counter() - start
            memory = faiss.serialize_index(index).nbytes
            for probe in ([0] if kind == "flat" else [nprobe, 32]):
                if kind == "ivf":
                    index.nprobe = min(probe, nlist)
                start = time.perf_counter()
                _, found = index.search(queries, 10)
                searched = time.perf_counter() - start
                result[(kind, probe)] = (built, memory, searched, found, nlist)
        exact = result[("flat", 0)]
        for (kind, probe), (built, memory, searched, found, nlist) in result.items():
            rows.append([f"{n:,}", kind if kind == "flat" else f"ivf nlist {nlist} nprobe {probe}", round(built, 2),
                         round(built / exact[0], 2), round(memory / 2**20, 1), round(memory / exact[1], 3),
                         round(1000 * searched / args.queries, 3), round(searched / exact[2], 3),
                         recall(exact[3], found, 1), recall(exact[3], found, 10)])
        print_table(rows[-3:], ["vectors", "index", "build s", "x exact", "MiB", "x exact", "ms/query", "x exact",
                                "recall@1", "recall@10"])
        print(flush=True)
        del vectors, result


if __name__ == "__main__":
    main()
