"""Time of one training iteration of an image GAN: the plain eager port against numgan's fast path.

Issue 4, target 1 (dcgan4_nobn, batch 64, H100): ConOpt at least 8x faster than the plain eager
baseline, SimGA and AltGA faster too, and ConOpt no more than 3.5x a SimGA iteration.

Variants, all on the same models, data and precision:
  plain        a self-contained "usual port": autograd.grad(create_graph=True), native convolutions,
               torch.optim.RMSprop, launched op by op (the baseline; kept as the reference)
  eager        numgan's step without the fast path (train(..., fast=False))
  graph        native convolutions, the step replayed from a CUDA graph (numgan.step.GanStep)
  adjoint-graph  convolutions whose derivatives of every order are cuDNN calls (numgan.conv) + graph
  fast         what numgan.train uses on CUDA: the graph, with im2col/GEMM convolutions (numgan.conv)
               for ConOpt (numgan.train.fast_conv_impl; SimGA and AltGA keep native convolutions), and D
               evaluated once on [real; fake] (numgan.step.GanStep's joint_d, for D without batch norm)
  fast-split-d the same with D called on the real and the fake batch separately: fewer FLOPs (the joint
               pass backpropagates L_G through zero real rows: ConOpt 171 vs 155 GFLOP), twice the D kernels
  fast-noalign the fast path with 3-channel layers' 75-wide column matrices unpadded (numgan.conv.ALIGN = 0)
  fast-unpaired the fast path with the GEMM layers' earlier form (numgan.conv.PAIR_COLUMNS = False): ConOpt's
               second pass adds each column matrix's two cotangents before col2im instead of inside it
  fast-native1 the fast path with stride-1 convolutions (the ResNets' 3x3 blocks) native, as before they became
               "adjoint" for ConOpt and smoothing (numgan.train.fast_conv_impl): for --arch resnet_cf
  (--variants also takes "adjoint" and "gemm": those convolutions without the graph)
For Fig. 10's configuration: --arch resnet_cf --image-size 64 --f-dim 128 --batch 128.
Each row is the median over --repeat timed blocks of --iters iterations (after --warmup iterations),
with the device synchronised around each block. The check column compares the fast path's parameters
with the eager step's after --check-iters iterations from the same start and the same batches
(relative difference; with --tf32 off this is float32 rounding only).

    python benchmarks/bench_step.py --device cuda --record        # writes benchmarks/results/step-<device>.md
"""
import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from numgan.activations import LeakyReLU  # noqa: E402
from numgan.data import ImageSampler  # noqa: E402
from numgan.models import LEAK, ResidualBlock, TFBatchNorm, build_models, set_conv_impl  # noqa: E402
from numgan.train import TrainConfig, build_training, fast_conv_impl, set_precision  # noqa: E402


def plain_port(G, D, method, sampler, z_dim, batch, lr=1e-4, gamma=10.0):
    """The baseline as a typical port writes it (one function per method, op by op)."""
    params_g, params_d = list(G.parameters()), list(D.parameters())
    # foreach=True: torch's default on CUDA, stated so that the CPU counts (count_kernels.py) match it
    if method == "altga":
        opt_d = torch.optim.RMSprop(params_d, lr=lr, alpha=0.9, eps=1e-10, foreach=True)
        opt_g = torch.optim.RMSprop(params_g, lr=lr, alpha=0.9, eps=1e-10, foreach=True)
    else:
        opt = torch.optim.RMSprop(params_g + params_d, lr=lr, alpha=0.9, eps=1e-10, foreach=True)
    dev = next(G.parameters()).device

    def losses():
        z = torch.randn(batch, z_dim, device=dev)
        d_fake = D(G(z))
        d_real = D(sampler())
        return (torch.nn.functional.softplus(-d_real).mean() + torch.nn.functional.softplus(d_fake).mean(),
                torch.nn.functional.softplus(-d_fake).mean())

    def step():
        if method == "altga":
            ld, _ = losses()
            opt_d.zero_grad(), ld.backward(), opt_d.step()
            z = torch.randn(batch, z_dim, device=dev)
            lg = torch.nn.functional.softplus(-D(G(z))).mean()
            opt_g.zero_grad(), lg.backward(), opt_g.step()
            return
        ld, lg = losses()
        gg = torch.autograd.grad(lg, params_g, create_graph=method == "conopt", retain_graph=True)
        gd = torch.autograd.grad(ld, params_d, create_graph=method == "conopt")
        grads = list(gg) + list(gd)
        if method == "conopt":
            reg = 0.5 * sum((g * g).sum() for g in grads)
            jg = torch.autograd.grad(reg, params_g + params_d)
            grads = [g.detach() + gamma * j for g, j in zip(grads, jg)]
        for p, g in zip(params_g + params_d, grads):
            p.grad = g.detach()
        opt.step()
        opt.zero_grad()

    return step


VARIANTS = {  # name -> (conv implementation, CUDA graph, joint D pass); None = the plain port;
    # impl None = numgan.train's choice (fast_conv_impl); joint None = GanStep's default (joint without batch norm)
    "plain": None, "eager": ("native", False, None), "graph": ("native", True, None),
    "adjoint-graph": ("adjoint", True, None), "fast": (None, True, None), "fast-split-d": (None, True, False),
    "adjoint": ("adjoint", False, None), "gemm": ("gemm", False, None), "eager-split-d": ("native", False, False),
    "fast-noalign": (None, True, None), "fast-native1": (None, True, None), "fast-unpaired": (None, True, None),
}
# stride-1 convolutions of a variant, where not numgan.train's (fast_conv_impl(method, strided=False))
UNSTRIDED = {"fast-native1": "native"}
# module settings a variant runs under (restored afterwards): "fast-noalign" stores 75-wide column matrices
# unpadded (numgan.conv.ALIGN = 0, misaligned rows for cuBLAS), to time what the padding gains; "fast-unpaired"
# runs the GEMM layers in their earlier form (numgan.conv.PAIR_COLUMNS = False: ConOpt's second pass sums each
# column matrix's two cotangents with a kernel of its own before col2im)
SETTINGS = {"fast-noalign": {"ALIGN": 0}, "fast-unpaired": {"PAIR_COLUMNS": False}}


@contextlib.contextmanager
def settings(variant):
    from numgan import conv
    saved = {k: getattr(conv, k) for k in SETTINGS.get(variant, {})}
    for k, v in SETTINGS.get(variant, {}).items():
        setattr(conv, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(conv, k, v)


class PlainResidualBlock(ResidualBlock):
    """numgan.models.ResidualBlock with torch's leaky ReLU (and its double backward), for the plain port."""

    def forward(self, h):
        r = self.conv_out(F.leaky_relu(self.conv_in(F.leaky_relu(h, LEAK)), LEAK))
        return h + (self.scale * r if self.scale != 1.0 else r)


def build(variant, method, arch, batch, images, device, seed=0, tf32=True, f_dim=64):
    """(step, G, D) of a variant; every variant starts from the same initialisation (seed)."""
    if VARIANTS[variant] is None:
        torch.manual_seed(seed)
        G, D = build_models(arch, images.shape[-1], z_dim=256, f_dim=f_dim, channels=images.shape[1])
        G, D = G.to(device), D.to(device)
        # the usual port's activation: torch's own, also inside the ResNet blocks (which call numgan's)
        for m in list(G.modules()) + list(D.modules()):
            if isinstance(m, LeakyReLU):
                m.__class__ = torch.nn.LeakyReLU
            if isinstance(m, ResidualBlock):
                m.__class__ = PlainResidualBlock
            if isinstance(m, TFBatchNorm):   # and torch's batch-norm derivatives
                m.closed_form = False
        return plain_port(G, D, method, ImageSampler(images, batch, device=device, seed=seed), 256, batch), G, D
    impl, graph, joint = VARIANTS[variant]
    cfg = TrainConfig(dataset="synthetic", arch=arch, method=method, batch_size=batch, image_size=images.shape[-1],
                      seed=seed, tf32=tf32, f_dim=f_dim)
    run = build_training(cfg, images, device, fast=graph, joint_d=joint)   # numgan.train's own construction
    if impl is not None:
        set_conv_impl(run.G, impl), set_conv_impl(run.D, impl)
    if variant in UNSTRIDED:
        for m in (run.G, run.D):
            set_conv_impl(m, fast_conv_impl(method), unstrided=UNSTRIDED[variant])
    return run.step, run.G, run.D


def check(method, arch, batch, images, device, iters, tf32=True, f_dim=64):
    """||fast - eager|| / ||eager - start|| over all parameters after ``iters`` iterations from the same
    start on the same batches."""
    ends, start = [], None
    for variant in ("eager", "fast"):
        step, G, D = build(variant, method, arch, batch, images, device, tf32=tf32, f_dim=f_dim)
        flat = lambda: torch.cat([p.detach().flatten() for p in list(G.parameters()) + list(D.parameters())])  # noqa: E731
        start = flat()
        for _ in range(iters):
            step()
        ends.append(flat())
    return float((ends[1] - ends[0]).norm() / (ends[0] - start).norm())


def flops_per_step(step):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="dcgan4_nobn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--f-dim", type=int, default=64, help="the architecture's width (Fig. 10's resnet_cf: 128)")
    ap.add_argument("--methods", default="simga,altga,conopt")
    ap.add_argument("--variants", default="plain,eager,graph,adjoint-graph,fast")
    ap.add_argument("--iters", type=int, default=50, help="iterations per timed block")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tf32", choices=("on", "off"), default="on")
    ap.add_argument("--blas", choices=("default", "cublas", "cublaslt"), default="default",
                    help="CUDA: torch.backends.cuda.preferred_blas_library for every variant (the GEMMs' kernels)")
    ap.add_argument("--check-iters", type=int, default=20, help="0 to skip the fast-vs-eager check")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/results/")
    args = ap.parse_args()
    device = torch.device(args.device)
    tf32_on = args.tf32 == "on"
    set_precision(device, tf32_on)   # the plain port too (build_training applies it for the numgan variants)
    if args.blas != "default" and device.type == "cuda":
        torch.backends.cuda.preferred_blas_library(args.blas)
    if device.type == "cpu":
        torch.set_num_threads(1)
    images = torch.randint(0, 256, (2048, 3, args.image_size, args.image_size), dtype=torch.uint8)
    rows, base = [], {}
    for method in args.methods.split(","):
        # counted on the eager step (a graph hides its ops), once per form of the D pass: the plain port and
        # fast-split-d call D twice, the other variants once on [real; fake] when D has no batch norm
        flops_of = {}
        for name in ("eager", "eager-split-d"):
            step = build(name, method, args.arch, args.batch, images, device, tf32=tf32_on, f_dim=args.f_dim)[0]
            step()
            flops_of[name] = flops_per_step(step)
        for variant in args.variants.split(","):
            flops = flops_of["eager-split-d" if variant in ("plain", "fast-split-d") else "eager"]
            with settings(variant):
                step, G, D = build(variant, method, args.arch, args.batch, images, device, tf32=tf32_on,
                                   f_dim=args.f_dim)
                for _ in range(args.warmup):
                    step()

                def block():
                    for _ in range(args.iters):
                        step()

                sec = common.timeit(block, warmup=0, repeat=args.repeat, device=device) / args.iters
            base.setdefault(method, {})[variant] = sec
            rows.append({"method": method, "variant": variant, "ms/iter": f"{sec * 1e3:.2f}",
                         "speed-up vs plain": f"{base[method].get('plain', float('nan')) / sec:.1f}x",
                         "TFLOP/s": f"{flops / sec / 1e12:.1f}" if flops else "",
                         "GFLOP/iter": f"{flops / 1e9:.0f}" if flops else ""})
            del step, G, D
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.check_iters and device.type == "cuda":
            rows[-1]["check (rel. diff fast vs eager)"] = f"{check(method, args.arch, args.batch, images, device, args.check_iters, tf32_on, args.f_dim):.1e}"
    ratio = {m: v.get("fast", float("nan")) / base["simga"].get("fast", float("nan")) for m, v in base.items()} \
        if "simga" in base else {}
    head = common.header(device)
    tf32 = args.tf32 if device.type == "cuda" else "n/a (CPU)"
    blas = "" if args.blas == "default" else f", BLAS {args.blas}"
    text = (f"## {args.arch}, batch {args.batch}, {args.image_size}x{args.image_size}, f {args.f_dim}, TF32 {tf32}{blas}\n\n{common.format_header(head)}\n\n"
            + common.markdown_table(rows) + "\n\n"
            + "fast-path time relative to fast SimGA: " + ", ".join(f"{m} {r:.2f}x" for m, r in ratio.items()) + "\n")
    common.report("step", device, text, args.record)


if __name__ == "__main__":
    main()
