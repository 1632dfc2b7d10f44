"""Time of one Inception Score evaluation (6,400 samples, the paper's protocol) on the chosen device.

Issue 4, target 4: under 5 s on an H100. One evaluation = 100 generator calls of 64 samples
(eval mode), the uint8 conversion, torch-fidelity's TF-ported Inception-v3 on all 6,400 images
(TF1 bilinear resize to 299 inside the network) and the 10-split score (numgan.metrics.Evaluator).
No pretrained weights exist offline, so the network is randomly initialised: the time does not
depend on the weights. Rows vary the inference batch size (the paper's 100, and 500) and the
precision of the Inception convolutions (numgan uses strict float32, like the TF graph; "tf32" shows
what TF32 would buy).

    python benchmarks/bench_inception.py --device cuda --record
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from numgan import metrics  # noqa: E402
from numgan.models import build_models  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-samples", type=int, default=6400)
    ap.add_argument("--batch-sizes", default="100,500")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    G, _ = build_models("dcgan4_nobn", 32)
    G = G.to(device).eval()
    model = metrics.make_inception(device, random_init=True)
    gen = torch.Generator(device=device).manual_seed(0)

    def sample_fn(n):
        return G(torch.randn(n, 256, generator=gen, device=device))

    def tf32_model(x):
        # what TF32 convolutions would give: the extractor without InceptionFeatures' strict-float32 guard
        pool, logits = model.extractor(x.to(device))
        return {"pool": pool, "logits_unbiased": logits}

    rows = []
    # the CPU has no TF32 and times one batch size only
    precisions = {"fp32": model, "tf32": tf32_model} if device.type == "cuda" else {"fp32": model}
    batch_sizes = list(map(int, args.batch_sizes.split(",")))
    if device.type == "cpu":
        batch_sizes = batch_sizes[:1]
    tf32_before = torch.backends.cudnn.allow_tf32
    for precision, net in precisions.items():
        torch.backends.cudnn.allow_tf32 = precision == "tf32" or tf32_before
        for bs in batch_sizes:
            ev = metrics.Evaluator(inception=True, fid=False, n_samples=args.n_samples, batch_size=bs,
                                   device=device, model=net)
            out = {}

            def run():
                with torch.no_grad():
                    out.update(ev.evaluate(sample_fn))

            sec = common.timeit(run, warmup=1, repeat=args.repeat, device=device)
            rows.append({"inception convs": precision, "inference batch": bs, "samples": args.n_samples,
                         "seconds": f"{sec:.2f}", "images/s": f"{args.n_samples / sec:.0f}",
                         "IS (random weights)": f"{out['is_mean']:.3f}"})
    torch.backends.cudnn.allow_tf32 = tf32_before
    text = (f"## Inception Score of {args.n_samples} samples (dcgan4_nobn generator)\n\n"
            f"{common.format_header(common.header(device))}\n\n{common.markdown_table(rows)}\n")
    common.report("inception", device, text, args.record)


if __name__ == "__main__":
    main()
