"""What the MoG Triton kernels compile to on an H100, without a GPU (issue 4, target 2).

numgan.mog_triton's four kernels are compiled ahead of time for sm_90a (Triton bundles ptxas, cuobjdump
and nvdisasm, so no GPU or CUDA toolkit is needed), and for each one this prints what the compiler made
of it: registers per thread, bytes of register spills (stores / loads, from ``ptxas -v``), shared memory,
and static counts of SASS instructions: all of them, FFMA (float32 multiply-adds: the arithmetic of the
"ieee" products), SHFL (warp shuffles: row reductions), LDS / STS (shared-memory loads / stores: the
layout conversions around each ``tl.dot``) and BAR (barriers).

These are counts in the binary, not executed instructions and not times; but each kernel's work is one
loop over row tiles, whose body dominates the binary, so a change that removes products or spills shows
up here before it can be timed. Times are benchmarks/bench_mog.py's, on a GPU.

    python benchmarks/sass_mog_triton.py                          # the default float32 setting
    python benchmarks/sass_mog_triton.py --against dda02e1        # and the kernels of an earlier commit
    python benchmarks/sass_mog_triton.py --configs ieee:16:4 ieee:16:8 tf32:32:4 --record
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

KERNELS = ("_grad_kernel", "_hvp_real_kernel", "_hvp_fake_kernel", "_hvp_g_kernel")
F, I, PTR = "fp32", "i32", "*fp32"
SIGNATURES = {   # argument types, and the constexprs besides T and PREC, as numgan.mog_triton._launch passes them
    "_grad_kernel": (dict(P=PTR, XR=PTR, Z=PTR, OUT=PTR, LOSS=PTR, S=I, B=I, rows_per_prog=I, inv_b=F),
                     dict(RELOAD=False)),
    "_hvp_real_kernel": (dict(P=PTR, U=PTR, XR=PTR, OUT=PTR, S=I, B=I, rows_per_prog=I, inv_b=F), dict(RELOAD=False)),
    "_hvp_fake_kernel": (dict(P=PTR, U=PTR, Z=PTR, OUT=PTR, DXT=PTR, GL=PTR, S=I, B=I, rows_per_prog=I, inv_b=F,
                              gam=F, X=PTR, MS=PTR, lr=F, decay=F, omd=F, eps=F), dict(FINAL=True, OPT=True)),
    "_hvp_g_kernel": (dict(P=PTR, U=PTR, Z=PTR, OUT=PTR, DXT=PTR, GL=PTR, S=I, B=I, rows_per_prog=I, gam=F, X=PTR,
                           MS=PTR, lr=F, decay=F, omd=F, eps=F), dict(FINAL=True, RELOAD=False, OPT=True)),
}


def load_module(rev):
    """numgan.mog_triton as in the working tree (rev None) or as committed at ``rev``."""
    if rev is None:
        from numgan import mog_triton
        return mog_triton
    return common.module_at(rev)


def tool(name):
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: this Triton install has no bundled NVIDIA tools")
    return str(path)


def analyse(mod, kernel, precision, tile, num_warps):
    """One kernel compiled for sm_90a with the alignment facts of a launch at S = 256, B = 512: a row of the
    table."""
    from numgan._triton import compile_offline

    args, consts = SIGNATURES[kernel]
    # as launched at S = 256, B = 512, one program per seed: pointers, S, B and rows_per_prog are multiples of 16
    aligned = [n for n, t in args.items() if t.startswith("*") or n in ("S", "B", "rows_per_prog")]
    compiled = compile_offline(getattr(mod, kernel), args, dict(consts, T=tile, PREC=precision), num_warps=num_warps,
                               aligned=aligned)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        log = subprocess.run([tool("ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                             capture_output=True, text=True).stderr
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"REG:(\d+)", usage)
    instr = [l.split("*/", 1)[1] for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", l)]

    def count(op):
        return sum(1 for l in instr if re.match(rf"\s*(@!?U?P\w+\s+)?{op}\b", l))

    return {"regs": int(regs.group(1)) if regs else None,
            "spill st/ld (B)": f"{spill.group(1)}/{spill.group(2)}" if spill else "?",
            "smem (B)": compiled.metadata.shared, "SASS": len(instr), "FFMA": count("FFMA"), "SHFL": count("SHFL"),
            "LDS": count("LDS"), "STS": count("STS"), "BAR": count("BAR")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=["ieee:16:4"],
                    help="precision:tile:num_warps (default: the float32 default of mog_triton.direction)")
    ap.add_argument("--against", help="also compile the kernels of numgan/mog_triton.py at this git revision")
    ap.add_argument("--against-file", help="also compile the kernels of this copy of numgan/mog_triton.py")
    ap.add_argument("--kernels", nargs="*", default=list(KERNELS), choices=KERNELS)
    ap.add_argument("--record", action="store_true", help="append to benchmarks/results/sass_mog_triton-cpu.md")
    a = ap.parse_args()
    from numgan import mog_triton
    if not mog_triton.available():
        raise SystemExit("needs Triton (it ships with the Linux CUDA wheels of torch)")
    if mog_triton.interpreted():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    mods = [("working tree" if common.git_commit().endswith("dirty") else common.git_commit(), load_module(None))]
    if a.against:
        mods.append((a.against, load_module(a.against)))
    if a.against_file:
        path = Path(a.against_file)
        if not path.is_file():
            raise SystemExit(f"--against-file {path}: no such file")
        mods.append((path.name, common.module_from_source(path.read_text(), f"mog_triton_{path.stem}")))
    rows = []
    for cfg in a.configs:
        precision, tile, warps = cfg.split(":")
        for label, mod in mods:
            for k in a.kernels:
                rows.append({"kernels": label, "precision:tile:warps": cfg, "kernel": k,
                             **analyse(mod, k, precision, int(tile), int(warps))})
    text = (f"## MoG Triton kernels compiled for sm_90a (H100), static counts; no GPU involved\n\n"
            f"{common.header_text('cpu')}\n\n{common.markdown_table(rows)}\n")
    common.report("sass_mog_triton", "cpu", text, a.record)


if __name__ == "__main__":
    main()
