"""GPU benchmark: generated Triton kernels vs SDPA (dense) vs FlexAttention, at paper sizes.

For every pattern of ``examples/*.attn`` at its published defaults (bf16, ``D = 128``, ``B = 1``,
``H = 16`` unless the pattern fixes ``heads``): the median time of

* ``attnlang`` — the generated kernel (``backend="triton"``),
* ``flex`` — compiled FlexAttention with the plan's tables as a ``BlockMask`` in natural token
  order (``attnlang.runtime.flex.to_block_mask``: what a FlexAttention user would run),
* ``sdpa`` — dense ``scaled_dot_product_attention`` with no mask (FlashAttention): the baseline,

Routed patterns (``route``: MoBA, VMoBA, BiFormer, PBS) are timed end to end per call — routing
stage (Triton routing kernels), per-item planning and the kernel with per-call tables — since
that is what a call costs; their density comes from one call's selection, and the flex column is
not measured for them. The routing stage alone is also timed (one batch item, forward only), with
the Triton kernels and with the torch ops, and printed as a note under the table. ``pyramid``
patterns (PSA) run on their Triton kernels (``runtime/triton_pyramid.py``) and are timed end to
end the same way (level selection, pooling, attention); their density counts (query, pooled key)
pairs, the work a pooled key costs.

their TFLOP/s counted on the allowed pairs (``4 * B * H * pairs * D``; dense counts ``N^2``),
the speedup over dense, and the simulator's predicted speedup for the same plan and GPU. Prints
a Markdown table. Run on a CUDA machine, no edits needed::

    python bench/gpu.py                      # forward, every example
    python bench/gpu.py --backward           # forward + backward
    python bench/gpu.py --only swa nat       # a few patterns
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _require_cuda():
    try:
        import torch
    except ImportError:
        sys.exit("bench/gpu.py needs torch with CUDA (pip install torch triton); nothing was measured.")
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                 "nothing was measured. CPU numbers: see bench/ and docs/benchmarks.md.")
    return torch


def _patterns(only):
    """(file, pattern name, Pattern) for every example pattern without runtime inputs."""
    import attnlang

    out, skipped = [], []
    for path in sorted((ROOT / "examples").glob("*.attn")):
        module = attnlang.parse(path)
        for name in module.names:
            if only and name not in only and path.stem not in only:
                continue
            p = attnlang.resolve(path, name)
            (skipped if p.inputs else out).append((path.name, name, p))
    return out, [f"{f}:{n}" for f, n, _ in skipped]


def _target(torch) -> str:
    major, _ = torch.cuda.get_device_capability()
    return "b200" if major >= 10 else "h100" if major == 9 else "a100"


def _ms(t) -> str:
    """Seconds as milliseconds for the report; ``—`` when not measured."""
    return "—" if t is None else f"{t * 1e3:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="pattern or example file names to run")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (slow to compile)")
    args = ap.parse_args()
    torch = _require_cuda()
    import triton.testing

    from torch.nn.attention.flex_attention import flex_attention

    import attnlang
    from attnlang.pattern import Pyramid
    from attnlang.pyramid import pattern_content as pyramid_content
    from attnlang.runtime.call import check_call
    from attnlang.runtime.flex import to_block_mask
    from attnlang.runtime.routing import pattern_content
    from attnlang.runtime.triton_routing import pattern_content as kernel_content
    from attnlang.runtime.triton import load_module

    flex = torch.compile(flex_attention, dynamic=False)

    target = _target(torch)
    rows, notes = [], []
    patterns, skipped = _patterns(set(args.only or ()))
    if skipped:
        notes.append(f"skipped (runtime inputs): {', '.join(skipped)}")
    dev = torch.device("cuda")
    D = args.head_dim
    for fname, name, p in patterns:
        H = p.heads or args.heads
        N = p.n
        try:
            q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=args.backward)
                       for _ in range(3))
        except torch.OutOfMemoryError:
            notes.append(f"{name}: N = {N} does not fit in memory")
            continue
        do = torch.randn_like(q)
        routed = p.reads_content
        content = None
        if isinstance(p.attend, Pyramid):  # this call's level table (numpy, from the same Q/K)
            content = pyramid_content(p, q[0].detach().float().cpu().numpy(), k[0].detach().float().cpu().numpy())
            plan = attnlang.make_plan(p, content=content)
        elif routed:  # one call's per-head plan (its selection) gives the density
            call = check_call(p, q, k, v, None, {}, None)
            plan, content = call.plan(0), call.content(0)
        else:
            plan = attnlang.make_plan(p)
        try:
            from attnlang.simulate import simulate_plan

            report = simulate_plan(plan, target, head_dim=D, heads=H, content=content)
            sim, pairs = report.forward.predicted, report.allowed_pairs or None
        except Exception as e:
            notes.append(f"{name}: simulator: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            sim = None
            pairs = sum(plan.stats(plan.group_for_head(h).lo).get("allowed_pairs", 0) for h in range(H)) or None
        dense_flops = 4.0 * H * N * N * D * (3.5 if args.backward else 1.0)
        flops = dense_flops * (pairs / (H * N * N)) if pairs else None

        def bench(fn, backward=args.backward):
            def step():
                out = fn()
                if backward:
                    out.backward(do)
            try:
                step()  # compile / autotune outside the timing
                return triton.testing.do_bench(step) * 1e-3
            except Exception as e:  # report and keep going: one failure must not hide the rest
                notes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                return None

        # Plans, modules and block masks are built once, outside the timed region.
        t_sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        if routed:  # routing (or level selection) + planning + kernel: the whole per-call cost
            fn = attnlang.compile(p, backend="triton")
            t_ours = bench(lambda: fn(q, k, v))
            if not isinstance(p.attend, Pyramid):
                # The routing stage alone (its decisions come back to the host, so the timing syncs).
                qd, kd, scale = q[0].detach(), k[0].detach(), D ** -0.5
                t_kern = bench(lambda: kernel_content(p, qd, kd, scale), backward=False)
                t_torch = bench(lambda: pattern_content(p, qd, kd, scale), backward=False)
                notes.append(f"{name}: routing stage {_ms(t_kern)} ms with the Triton kernels, {_ms(t_torch)} ms "
                             "with torch ops (one batch item; part of the attnlang ms column)")
        else:
            module = load_module(plan, target)
            t_ours = bench(lambda: module.attention(q, k, v))
        t_flex = None
        if not args.no_flex and not routed:
            block_mask = to_block_mask(p, H=H).to(dev)
            t_flex = bench(lambda: flex(q, k, v, block_mask=block_mask))
        rows.append((fname, name, N, plan.block_m, plan.block_n, pairs / (H * N * N) if pairs else None,
                     t_ours, t_flex, t_sdpa, flops, dense_flops, sim))

    dev_name = torch.cuda.get_device_name()
    what = "forward + backward" if args.backward else "forward"
    print(f"## GPU benchmark: {dev_name}, bf16, D = {D}, B = 1, {what} (median of triton.testing.do_bench)\n")
    print("| example | pattern | N | tile | density | attnlang ms | TFLOP/s | flex ms | TFLOP/s | "
          "SDPA dense ms | TFLOP/s | attnlang vs dense | simulator predicts |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fname, name, N, bm, bn, dens, t_o, t_f, t_s, fl, dfl, sim in rows:
        def tf(f, t):
            return "—" if t is None or f is None else f"{f / t / 1e12:.0f}"
        speed = "—" if t_o is None or t_s is None else f"{t_s / t_o:.2f}x"
        print(f"| {fname} | {name} | {N} | {bm}x{bn} | {'—' if dens is None else f'{dens:.4f}'} | "
              f"{_ms(t_o)} | {tf(fl, t_o)} | {_ms(t_f)} | {tf(fl, t_f)} | {_ms(t_s)} | {tf(dfl, t_s)} | "
              f"{speed} | {'—' if sim is None else f'{sim:.2f}x'} |")
    for n in notes:
        print(f"\n- {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
