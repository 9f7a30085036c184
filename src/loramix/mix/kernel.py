"""A small C kernel for the per-row mixture when rows differ: each row against its own adapters.

The eager forms of a ``rows`` plan (see :mod:`loramix.mix.ops`) either multiply every row by every
distinct adapter of the batch and mask (``dense``: U/K times the needed multiply-adds) or copy each
row's adapters into per-row tensors and use ``bmm`` (``gather``: K copies of every adapter streamed
from memory per call). In decode, with a handful of tokens per row, both cost more than the
arithmetic. This kernel (Punica's BGMV, written for a CPU) reads each row's adapters in place from
the mixer's slot tensors at their true ranks, ``h = w_j * x @ A_j.T`` adapter by adapter, then
``y += h @ B_j`` 64 outputs at a time: the minimum multiply-adds, each adapter read from memory once
per call, and nothing copied when a batch forms.

It is plain C compiled once with the system's C compiler into ``<cache>/kernels`` (on first use,
never at import) and called through ``ctypes`` with one struct pointer. Where no compiler works :func:`available` is
False, and for a dtype other than float32 or under autograd the mixer keeps its torch forms; tests
check the kernel against the float64 reference over the shape grid.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from loramix.config import cache_dir

__all__ = ["SlotBgmv", "available", "bgmv"]

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
typedef float v16 __attribute__((vector_size(64)));   /* 16 floats: one AVX-512 register, two AVX ones */

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

static float dot(const float *x, const float *a, int64_t n)
{
    v16 s0 = {0}, s1 = {0};
    int64_t m = 0;
    for (; m + 32 <= n; m += 32) { s0 += ld(x + m) * ld(a + m); s1 += ld(x + m + 16) * ld(a + m + 16); }
    s0 += s1;
    float s = 0.0f;
    for (int l = 0; l < 16; l++) s += s0[l];
    for (; m < n; m++) s += x[m] * a[m];
    return s;
}

/* y[q] += sum_{j, c < rank[s]} w[i, j] * (x[q] . A[s, c]) * B[s, c]     s = idx[i, j], q = (row i, token t)
   read straight from the mixer's slots, nothing copied per batch:
   x: (n_rows, n_tok, n_in); y: (n_rows, n_tok, n_out); a: (S, R, n_in); b: (S, R, n_out);
   idx: (n_rows, k) slot numbers; rank: (S,) true rank per slot (0: the adapter lacks this layer);
   uslots: (u_n,) the batch's distinct slots; h: scratch (n_rows * n_tok, k * R).
   Phase 1 goes adapter by adapter, so each A row is read once for all the rows that use it; phase 2
   goes 64 outputs at a time, so an adapter's share of that block, read once from memory, is then
   read from L1 by every row that uses it. */
struct slots {
    const float *a, *b;
    int64_t u_n, r, n_out, n_in, n_rows, k;
    const int64_t *idx, *rank, *uslots;
    const float *w;
    float *h;
};

void loramix_bgmv_slots(const struct slots *p, const float *x, float *y, int64_t n_tok, int n_threads)
{
    const float *a = p->a, *b = p->b, *w = p->w;
    const int64_t *idx = p->idx, *rank = p->rank, *uslots = p->uslots;
    float *h = p->h;
    int64_t u_n = p->u_n, r = p->r, n_out = p->n_out, n_in = p->n_in, n_rows = p->n_rows, k = p->k;
    int64_t kr = k * r, n_blocks = (n_out + 63) / 64;
    #pragma omp parallel num_threads(n_threads) if(n_threads > 1)
    {
        #pragma omp for schedule(dynamic, 1)
        for (int64_t ui = 0; ui < u_n; ui++) {
            int64_t s = uslots[ui], rs = rank[s];
            for (int64_t i = 0; i < n_rows; i++)
                for (int64_t j = 0; j < k; j++) {
                    float wj = w[i * k + j];
                    if (idx[i * k + j] != s || wj == 0.0f) continue;
                    for (int64_t t = 0; t < n_tok; t++) {
                        int64_t q = i * n_tok + t;
                        for (int64_t c = 0; c < rs; c++)
                            h[q * kr + j * r + c] = wj * dot(x + q * n_in, a + (s * r + c) * n_in, n_in);
                    }
                }
        }
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < n_blocks; blk++) {
            int64_t m0 = blk * 64, width = n_out - m0 < 64 ? n_out - m0 : 64;
            for (int64_t i = 0; i < n_rows; i++)
                for (int64_t t = 0; t < n_tok; t++) {
                    int64_t q = i * n_tok + t;
                    float tmp[64], *yq = y + q * n_out + m0, *dst = width == 64 ? yq : tmp;
                    if (width < 64) { memset(tmp, 0, sizeof tmp); memcpy(tmp, yq, width * sizeof(float)); }
                    v16 y0 = ld(dst), y1 = ld(dst + 16), y2 = ld(dst + 32), y3 = ld(dst + 48);
                    for (int64_t j = 0; j < k; j++) {
                        int64_t s = idx[i * k + j];
                        if (w[i * k + j] == 0.0f) continue;
                        const float *bj = b + s * r * n_out + m0;
                        for (int64_t c = 0; c < rank[s]; c++) {
                            const float *bp = bj + c * n_out;
                            v16 hp = {0}; hp += h[q * kr + j * r + c];
                            if (width == 64) {
                                y0 += hp * ld(bp); y1 += hp * ld(bp + 16); y2 += hp * ld(bp + 32); y3 += hp * ld(bp + 48);
                            } else {
                                float part[64] = {0};
                                memcpy(part, bp, width * sizeof(float));
                                y0 += hp * ld(part); y1 += hp * ld(part + 16); y2 += hp * ld(part + 32); y3 += hp * ld(part + 48);
                            }
                        }
                    }
                    st(dst, y0); st(dst + 16, y1); st(dst + 32, y2); st(dst + 48, y3);
                    if (width < 64) memcpy(yq, tmp, width * sizeof(float));
                }
        }
    }
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native is only reused on a like CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found: the mixer uses its torch forms")
        return None
    key = hashlib.sha256("\0".join([_SOURCE, cc, *_FLAGS, platform.machine(), _cpu_flags()]).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"bgmv-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "bgmv.c", Path(tmp) / "bgmv.so"
            src.write_text(_SOURCE)
            proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("compiling the mixer kernel failed (the mixer uses its torch forms): %s",
                            proc.stderr.strip()[-500:])
                return None
            os.replace(out, target)  # atomic: a concurrent process sees the whole file or none
    lib = ctypes.CDLL(str(target))
    fn = lib.loramix_bgmv_slots
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    fn.restype = None
    return lib


def available() -> bool:
    """Whether the compiled kernel can be used (compiles it on the first call)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _compile()
                except OSError as e:  # an unwritable cache, a broken compiler install
                    log.warning("the mixer kernel is unavailable (%s): the mixer uses its torch forms", e)
                    _lib = None
                _tried = True
    return _lib is not None


class _Slots(ctypes.Structure):  # struct slots in the C source
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("u_n", ctypes.c_int64), ("r", ctypes.c_int64),
                ("n_out", ctypes.c_int64), ("n_in", ctypes.c_int64), ("n_rows", ctypes.c_int64), ("k", ctypes.c_int64),
                ("idx", ctypes.c_void_p), ("rank", ctypes.c_void_p), ("uslots", ctypes.c_void_p),
                ("w", ctypes.c_void_p), ("h", ctypes.c_void_p)]


class SlotBgmv:
    """One batch's per-row mixture for one layer, read from the mixer's slot tensors in place: nothing is
    copied when a batch forms (a scheduler forms one whenever a row joins or leaves).

    lora_a: (S, R, n_in) and lora_b: (S, R, n_out) float32 CPU slot tensors (kept referenced: a later
    resize of the slots allocates new ones and these stay valid); idx: (B, K) slot numbers; w: (B, K)
    weights (0: unused); ranks: true rank per slot for this layer (0: the adapter lacks it). The slots
    it names must stay unchanged while it is used (the mixer pins a live batch's slots).
    """

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                 ranks: list[int]):
        assert _lib is not None, "call kernel.available() first"
        assert lora_a.is_contiguous() and lora_b.is_contiguous() and lora_a.dtype == lora_b.dtype == torch.float32
        self.a, self.b = lora_a, lora_b
        self.idx, self.w = idx.to(torch.int64).contiguous(), w.to(torch.float32).contiguous()
        self.rank = torch.tensor(ranks, dtype=torch.int64)  # (S,)
        self.uslots = torch.tensor(sorted({int(s) for s in self.idx.flatten().tolist()}), dtype=torch.int64)  # (U,)
        (self.nb, self.k), (_, self.r, self.n_out) = self.idx.shape, lora_b.shape
        self.n_in = lora_a.shape[2]
        self._h = torch.zeros(self.nb * self.k * self.r, dtype=torch.float32)  # (B*T, K*R) scratch
        self._batch = _Slots(self.a.data_ptr(), self.b.data_ptr(), len(self.uslots), self.r, self.n_out, self.n_in,
                             self.nb, self.k, self.idx.data_ptr(), self.rank.data_ptr(), self.uslots.data_ptr(),
                             self.w.data_ptr(), self._h.data_ptr())
        self._ref = ctypes.byref(self._batch)

    def run(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y[i] += sum_j w[i, j] * x[i] @ A[idx[i, j]].T @ B[idx[i, j]]`` in place (no checks: the mixer's
        layers guarantee x (B, T, n_in) and contiguous y (B, T, n_out), float32); returns ``y``."""
        nb, nt, _ = x.shape
        x = x.contiguous()
        if self._h.numel() < nb * nt * self.k * self.r:
            self._h = torch.zeros(nb * nt * self.k * self.r, dtype=torch.float32)
            self._batch.h = self._h.data_ptr()
        assert _lib is not None
        _lib.loramix_bgmv_slots(self._ref, x.data_ptr(), y.data_ptr(), nt, torch.get_num_threads())
        return y


def bgmv(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor,
         w: torch.Tensor) -> torch.Tensor:
    """One-shot, checked: ``y[i] += sum_j w[i, j] * x[i] @ a[idx[i, j]].T @ b[idx[i, j]]`` in place.

    y: (B, T, n_out) contiguous float32; x: (B, T, n_in) float32; a: (S, r, n_in); b: (S, r, n_out);
    idx: (B, K) int64 in [0, S); w: (B, K). Call :func:`available` first.
    """
    nb, nt, n_in = x.shape
    n_out = b.shape[2]
    if not (y.is_contiguous() and y.dtype == x.dtype == torch.float32 and y.shape == (nb, nt, n_out)
            and a.shape[2] == n_in and idx.shape[0] == nb and w.shape == idx.shape):
        raise ValueError(f"expected x (B, T, {a.shape[2]}) float32, contiguous y (B, T, {n_out}) float32 and idx, w "
                         f"(B, K); got x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} {y.dtype}, idx "
                         f"{tuple(idx.shape)}, w {tuple(w.shape)}")
    op = SlotBgmv(a.contiguous().float(), b.contiguous().float(), idx, w, [a.shape[1]] * a.shape[0])
    return op.run(y, x)
