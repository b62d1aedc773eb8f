"""bench_train.py's tables: report() (the engines, ratios, targets and ceiling; also --report on a saved JSON,
old ones included) and report_breakdown() (--breakdown's per-part table), with the engines' labels."""
import os

import _common
import _rounds

LABEL = {"qlora_nf4": "qlora_native NF4", "peft_bnb": "PEFT+bnb NF4 (dq)", "peft_fp32": "PEFT fp32",
         # opt-in (--engines): bnb_4bit_compute_dtype=bfloat16 under torch.autocast(cpu, bfloat16)
         "peft_bnb_bf16": "PEFT+bnb NF4 (dq) bf16 autocast",
         # opt-in: qlora_native with compute_dtype="bfloat16" whatever --compute-dtype says, so one run
         # holds both modes and both peers: --engines qlora_nf4,qlora_nf4_bf16,peft_bnb,peft_bnb_bf16
         "qlora_nf4_bf16": "qlora_native NF4 bf16"}


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def report_breakdown(out):
    info, rows, meas = out["info"], out["parts"], out["info"].get("measured") or {}
    sg, bw = out.get("parts_sgemm_gflops") or meas.get("numpy_sgemm_gflops"), meas.get("read_bandwidth_gbps")
    step = out["step_s_median"]
    print()
    print(f"qlora_native training step by part: SmolLM2-135M batch {info['batch']} x {info['seq']}, r={info['r']}, "
          f"all-linear, gradient checkpointing, SIMD {info['simd']}, threads {info['threads']}; median of "
          f"{info['steps']} steps after a warm-up: {step * 1e3:.0f} ms/step "
          f"({info['batch'] * info['seq'] / step:.0f} tok/s, {out['flops']['total'] / step / 1e9:.0f} GFLOP/s effective)")
    print(f"machine: {_common.machine_line(info, meas)}")
    print(f"load average before/after: {info.get('loadavg_before')} / {info.get('loadavg_after')}")
    if out.get("sgemm_isa", "native") != "native":
        print(f"compute parts vs numpy sgemm at {out['sgemm_isa']} (capped like the peers): {fmt(sg, '.0f')} GFLOP/s, "
              f"OpenBLAS {(out.get('sgemm_isa_probe') or {}).get('openblas_core')}")
    print("| part | ms/step (range) | share | GFLOP | MB | rate | ideal ms | x ideal | excess ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = (f"{r['gflops']:.0f} GFLOP/s ({100 * r['gflops'] / sg:.0f}% sgemm)" if r["bound"] == "compute" and r["gflops"] and sg
                else f"{r['gbps']:.1f} GB/s ({100 * r['gbps'] / bw:.0f}% bw)" if r["bound"] == "memory" and r["gbps"] and bw
                else "-")
        lo, hi = r["seconds_range"]
        print(f"| {r['label']} | {r['seconds'] * 1e3:.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f}) | {100 * r['share']:.1f}% | "
              f"{r['flops'] / 1e9:.2f} | {r['bytes'] / 1e6:.0f} | {rate} | "
              f"{fmt(None if r['ideal_s'] is None else r['ideal_s'] * 1e3)} | {fmt(r['x_ideal'], '.1f')} | "
              f"{fmt(None if r['excess_s'] is None else r['excess_s'] * 1e3)} |")
    print("ideal = the part's FLOPs at the numpy sgemm rate (compute parts) or its least bytes at the read "
          "bandwidth (memory parts); x ideal = measured / ideal; rows sorted by excess = measured - ideal.")
    print("Attention FLOPs count the causal half (what the kernels compute); the optimizer counts 28 bytes and "
          "10 FLOPs per trainable parameter.")
    print("top op shapes of the last step (part, op, shape, calls, ms, rate):")
    for o in out["top_ops"]:
        print(f"  {o['part']:<14} {o['op']:<26} {'x'.join(str(v) for v in o['shape']):<16} {o['calls']:>4} "
              f"{o['seconds'] * 1e3:8.1f} ms  {fmt(o['gflops'])} GFLOP/s  {fmt(o['gbps'])} GB/s")


def report(out):
    """Prints the table of a result dict (also used by --report on a saved JSON)."""
    info, res, flops, sg = out["info"], out["results"], out["flops"], out["sgemm"]
    engines = out.get("engines") or list(res)
    sg_np = sg.get("numpy_gflops") if sg and "error" not in sg else None
    print()
    print(f"SmolLM2-135M LoRA training ({os.path.basename(info['gguf'])}): batch {info['batch']} x {info['seq']} "
          f"tokens, r={info['r']}, alpha {info['alpha']:g}, 7 targets, gradient checkpointing, AdamW, "
          f"threads {info['threads']}; warm-up 1 step + {info['steps']} timed")
    if info.get("prompt_frac"):
        print(f"labels -100 on the first {info['prompt_frac']:.0%} of every row (an SFT prompt) for every engine; "
              "qlora_native's lm_head runs on the labelled rows only (fewer FLOPs than the peers there)")
    if info.get("activation_memory_budget"):
        print(f"qlora_native activation_memory_budget {info['activation_memory_budget']:g}: its last layers keep their "
              "intermediates (less recompute than the peers: the ceiling's 'equal FLOPs' does not hold for it)")
    print(f"load average before/after: {info['loadavg_before']} / {info['loadavg_after']} ({info['cpus']} CPUs)")
    if info.get("cpu"):  # results saved before the machine line existed have no CPU fields
        print(f"machine: {_common.machine_line(info, info.get('measured'))}")
    if info.get("interleaved"):
        print(f"steps interleaved: {info['steps']} round(s), each engine one timed step per round in a varied order, "
              "the others waiting (each engine its own process, all alive together); paired = the per-round "
              "ratios of two engines' steps")
    elif "interleaved" in info:
        print("steps timed per engine, one engine after the other (--sequential)")
    hdr = (f"{'engine':<18} {'tok/s':>7} {'vs bnb':>7} {'vs fp32':>7} {'best':>6} {'peak RSS':>9} {'vs bnb':>7} "
           f"{'train pk':>8} {'load s':>7} {'GFLOP/s':>8} {'%sgemm':>7} {'loss0':>7} {'lossN':>7}")
    print(hdr)
    print("-" * len(hdr))
    bnb, fp = res.get("peft_bnb", {}), res.get("peft_fp32", {})
    for e in engines:
        r = res[e]
        if "error" in r:
            print(f"{LABEL[e]:<18} {r['error']}")
            continue
        pct = r["share_of_isa_sgemm"] if "sgemm_isa" in r else ratio(r["step_gflops"], sg_np)
        print(f"{LABEL[e]:<18} {r['tok_s']:>7.1f} {fmt(ratio(r['tok_s'], bnb.get('tok_s')), '.2f'):>7} "
              f"{fmt(ratio(r['tok_s'], fp.get('tok_s')), '.2f'):>7} {r['best_step_tok_s']:>6.1f} "
              f"{r['peak_rss_mib']:>8.0f}M {fmt(ratio(r['peak_rss_mib'], bnb.get('peak_rss_mib')), '.2f'):>7} "
              f"{fmt(r.get('train_peak_rss_mib'), '.0f'):>7}M {r['load_s']:>7.1f} {r['step_gflops']:>8.1f} "
              f"{'n/a' if pct is None else format(100 * pct, '.0f') + '%':>7} {r['losses'][0]:>7.3f} {r['losses'][-1]:>7.3f}")
    print("tok/s = batch*seq*steps / time of the timed steps; best = tok/s of the fastest step; peak RSS = the "
          "child's VmHWM over load + steps; train pk = VmHWM over the timed steps alone; vs = ratio to that "
          "engine (RSS: lower is better).")
    print(f"GFLOP/s = step FLOPs ({flops['total'] / 1e9:.1f} GFLOP) / mean step time; %sgemm = vs the numpy sgemm "
          f"rate below at the ISA the engine ran at (avx2: capped like the peers). {out['flop_formula']}.")
    for isa, p in (out.get("sgemm_by_isa") or ({None: sg} if sg else {})).items():  # old JSON: one probe
        head = ("machine sgemm (fp32, best of runs" + (f", {isa}, OpenBLAS {p.get('openblas_core')}" if isa else "")
                + (" (before / after the engines: " + " / ".join(f"{v:.1f}" for v in p["numpy_gflops_runs"]) + ")"
                   if p.get("numpy_gflops_runs") else "") + "): ")
        print(head + (p["error"] if "error" in p else "; ".join(
            f"{s['M']}x{s['K']}x{s['N']} numpy {s['numpy_gflops']:.1f}"
            + (f", qlora_native.ops.gemm_nt {s['ours_gflops']:.1f}" if "ours_gflops" in s else "") + " GFLOP/s"
            for s in p["shapes"])))
    rounds = info.get("rounds") or {}
    for isa, v in (rounds.get("sgemm_gflops") or {}).items():
        print(f"numpy sgemm ({isa}) after each round: " + " / ".join(f"{g:.1f}" for g in v) + " GFLOP/s")
    for isa, err in (rounds.get("sgemm_errors") or {}).items():
        print(f"numpy sgemm ({isa}) between rounds: {err}")
    q, qb = out.get("qlora_nf4_ratios") or {}, out.get("qlora_nf4_bf16_ratios") or {}
    pairs = [(a, b, d.get(k)) for a, b, d, k in (
        ("qlora_nf4", "peft_bnb", q, "paired_tok_s_vs_peft_bnb"), ("qlora_nf4", "peft_fp32", q, "paired_tok_s_vs_peft_fp32"),
        ("qlora_nf4_bf16", "peft_bnb", qb, "paired_tok_s_vs_peft_bnb"),
        ("qlora_nf4_bf16", "peft_bnb_bf16", qb, "paired_tok_s_vs_peft_bnb_bf16"),
        ("qlora_nf4_bf16", "qlora_nf4", qb, "paired_tok_s_vs_qlora_nf4")) if d.get(k)]
    if pairs:
        print("paired tok/s ratios, per round (median (min-max, n rounds)): "
              + "; ".join(f"{a} / {b} {_rounds.fmt_paired(p)}" for a, b, p in pairs)
              + (f"; by the steps' CPU seconds (at 1 thread: without the time a step was not scheduled): qlora_nf4 / peft_bnb "
                 f"{_rounds.fmt_paired(q['paired_cpu_tok_s_vs_peft_bnb'])}" if q.get("paired_cpu_tok_s_vs_peft_bnb") else ""))
    me = res.get("qlora_nf4", {})
    tr = ratio(me.get("tok_s"), bnb.get("tok_s"))
    tb = ratio(me.get("best_step_tok_s"), bnb.get("best_step_tok_s"))  # less sensitive to a shared machine
    rr = ratio(me.get("peak_rss_mib"), bnb.get("peak_rss_mib"))
    want = out["targets"]["tok_s_vs_peft_bnb"]
    print(f"target: qlora_native tokens/s >= {want:g}x PEFT+bnb: "
          + ("n/a" if tr is None else f"{tr:.2f}x {'MET' if tr >= want else 'NOT MET'} (all timed steps); "
             f"fastest step vs fastest step {tb:.2f}x {'MET' if tb >= want else 'NOT MET'}"
             + paired_verdict(q.get("paired_tok_s_vs_peft_bnb"), want)))
    c = out.get("ceiling") or {}
    if c.get("x_peer") is not None:
        print(f"ceiling: at equal FLOPs an engine at 100% of this ISA's sgemm ({c['isa']}, {c['sgemm_gflops']:.0f} "
              f"GFLOP/s) would be {c['x_peer']:.2f}x the peer (fastest steps {fmt(c['best_x_peer'], '.2f')}x; "
              f"peer {c['peer_gflops']:.0f} GFLOP/s effective)"
              + (f"; measured ours / peer paired per round {_rounds.fmt_paired(c['paired_ours_x_peer'])}"
                 if c.get("paired_ours_x_peer") else "")
              + (f"; ceiling per round (that round's sgemm / the peer's step) {_rounds.fmt_paired(c['rounds_x_peer'])}"
                 if c.get("rounds_x_peer") else ""))
    print(f"target: qlora_native peak RSS <= {out['targets']['peak_rss_vs_peft_bnb']:g}x PEFT+bnb: "
          + ("n/a" if rr is None else f"{rr:.2f}x {'MET' if rr <= out['targets']['peak_rss_vs_peft_bnb'] else 'NOT MET'}"))
    b16 = res.get("qlora_nf4_bf16", {})
    for key, peer in (("bf16_tok_s_vs_peft_bnb", "peft_bnb"), ("bf16_tok_s_vs_peft_bnb_bf16", "peft_bnb_bf16")):
        want = out["targets"].get(key)
        r = ratio(b16.get("tok_s"), res.get(peer, {}).get("tok_s"))
        if want is not None and r is not None:
            rb = ratio(b16.get("best_step_tok_s"), res[peer].get("best_step_tok_s"))
            print(f"target: qlora_native bf16 tokens/s >= {want:g}x {LABEL[peer]}: {r:.2f}x "
                  f"{'MET' if r >= want else 'NOT MET'} (all timed steps); fastest step vs fastest step "
                  f"{fmt(rb, '.2f')}x" + paired_verdict(qb.get("paired_tok_s_vs_" + peer), want))


def paired_verdict(p, want):
    """'; paired per round median X.XXx MET (min-max, n)' for a target line, '' without paired ratios."""
    if not p:
        return ""
    return (f"; paired per round median {p['median']:.2f}x {'MET' if p['median'] >= want else 'NOT MET'} "
            f"({p['min']:.2f}-{p['max']:.2f}, n={p['n']})")
