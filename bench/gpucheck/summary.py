"""``summary.md`` of a GPU check: ``results.json`` made readable, rewritten after every stage.

What a reader of a returned check wants first comes first: the stage table, then the first
stage's figures — ``graphs`` against eager per kernel choice, where the eager step syncs with the
host, its kernels per phase — then Inductor's variants, then whatever failed, with its failing
tests or the end of its output.
"""

from __future__ import annotations

from .compile_cache import PREFIX

PHASES = ("act", "wm_update", "imagine", "ac_update")


def cache_note(rec: dict) -> str:
    r, p = rec["restore"], rec.get("pack")
    note = (f"restored {r['files']} files ({r['mib']} MiB) from {rec['archive']}" if r["restored"] else r["note"])
    if p:
        note += (f"; packed {p['files']} files ({p['raw_mib']} MiB, {p['mib']} MiB compressed) to "
                 f"{p.get('archive', PREFIX + '*.tar.gz')}" + (f", {p['left_out']} left out (over budget)"
                                                              if p["left_out"] else ""))
    return note


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary(res: dict) -> str:
    st = res["stages"]
    env = st.get("env", {}).get("result") or {}
    head = (f"Started {res['started']}, updated {res.get('updated')}: {res.get('elapsed_s')} s of a "
            f"{res['budget_s']} s budget{'' if res['finished'] else ' (**not finished**)'}.  "
            f"Commit {env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}; torch {env.get('torch')}, "
            f"triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}; "
            f"{env.get('sms', '-')} SMs, {env.get('memory_gib', '-')} GiB; {env.get('cpu_cores')} CPU cores.")
    out = [f"# GPU check ({res['mode']}): {env.get('gpu') or env.get('device_name', '?')}", "", head, "",
           f"Command: `{res['command']}`", "", "| stage | status | seconds | cap | note |", "|---|---|---:|---:|---|"]
    out += [f"| {n} | {r['status']} | {r.get('seconds', '')} | {r['cap_s']} | {r.get('note') or ''} |"
            for n, r in st.items()]
    if res.get("compile_cache"):
        out += ["", f"Compile cache: {cache_note(res['compile_cache'])}."]
    parts = ((st.get("graphs") or {}).get("result") or {}).get("parts") or {}
    if parts:
        out += first_stage(parts)
    out += inductor((st.get("inductor") or {}).get("result") or {})
    out += failures(st)
    return "\n".join(out) + "\n"


def first_stage(parts: dict) -> list[str]:
    """The graphs table (per kernel choice), the probe's syncs, kernels per phase, the profiler's tables."""
    out = ["", "## graphs against eager (the first stage)", "",
           "Alternated steps, each phase timed between device synchronisations (whole steps: one "
           "synchronisation per step).", "",
           "| kernels | eager ms/step | graphs ms/step | speed-up | whole step eager / graphs | "
           + " | ".join(f"{p} eager / graphs" for p in PHASES)
           + " | capture s per graph | cold → captured s | replay vs eager | draws differ |",
           "|---|---:|---:|---:|---:|" + "---:|" * len(PHASES) + "---|---:|---|---|"]
    tables = []
    for name, p in parts.items():
        r = p.get("record") or {}
        if name == "probe":
            continue
        t, b, eq = r.get("timing") or {}, r.get("graphs_build") or {}, r.get("equality") or {}
        if t:
            (ve, e), (vg, g) = list(t["backends"].items())
            w = t["whole_step_ms"]
            cells = [_ms(e["step_ms"]), _ms(g["step_ms"]), f"{e['step_ms'] / g['step_ms']:.2f}x",
                     f"{_ms(w[ve])} / {_ms(w[vg])}"]
            cells += [f"{_ms(e['phases_ms'][q])} / {_ms(g['phases_ms'][q])}" for q in PHASES]
            tables.append(_profile_tables(r))
        else:
            cells = ["-"] * (4 + len(PHASES))
        caps = ", ".join(f"{k} {_ms(v['capture_s'])}" for k, v in (b.get("graphs") or {}).items()) or "-"
        cmp = eq.get("replay_vs_eager") or {}
        same = ("-" if not cmp else f"{'ok' if cmp['ok'] else 'DIFFERS'}: {cmp['action_mismatch']:.2%} actions, "
                f"states {cmp['states_rel_err']:.1e}" + (", bitwise" if cmp.get("bitwise_equal") else ""))
        out.append(f"| {name.split(':')[-1]} | " + " | ".join(cells) + f" | {caps} | {_ms(b.get('to_captured_s'))} | "
                   f"{same} | {eq.get('replays_draw_differently', '-')} |")
    out += probe_tables(parts)
    tables = [x for x in tables if x]
    if tables:
        out += ["", "<details><summary>the profiler's per-phase tables</summary>", "", *tables, "</details>"]
    return out


def probe_tables(parts: dict) -> list[str]:
    r = (parts.get("probe") or {}).get("record") or {}
    out = []
    syncs, err = r.get("syncs"), r.get("sync_error_step")
    if syncs:
        out += ["", f"### Host syncs of one eager step ({syncs['detector']})", "",
                f"Captured phases, where a sync breaks the capture: {', '.join(syncs['strict_phases'])}; inherent: "
                + "; ".join(f"{k} ({v})" for k, v in syncs["allowed"].items()) + ".", "",
                "| phase | syncs | sites (innermost first) |", "|---|---:|---|"]
        out += [f"| {ph} | {v['count']} | " + "<br>".join(f"`{s}` ×{n}" for s, n in v["sites"].items()) + " |"
                for ph, v in syncs["phases"].items()] or ["| (none) | 0 | |"]
    if err:
        raised = err.get("raised")
        out += ["", "With `set_sync_debug_mode(\"error\")` in the captured phases: " + (
            f"raised in {raised['phase']} at `{raised['site'][0] if raised['site'] else '?'}` ({raised['message']})."
            if raised else "the step ran through.")]
    profiles = {"eager:ref": r.get("profile")} | {
        n: (p.get("record") or {}).get("profile_graphs")
        for n, p in parts.items() if n != "probe"}
    profiles = {k: v for k, v in profiles.items() if v}
    if profiles:
        names = list(profiles)
        phases = sorted({ph for v in profiles.values() for ph in v["phases"]}, key=_phase_order)
        out += ["", "### Kernels per phase (one profiled step; kernel ms = GPU time summed over its kernels)", "",
                "| phase | " + " | ".join(f"{n} kernels | {n} kernel ms | {n} host ops" for n in names) + " |",
                "|---|" + "---:|" * (3 * len(names))]
        for ph in phases + ["step"]:
            cells = []
            for n in names:
                v = profiles[n]["total"] if ph == "step" else profiles[n]["phases"].get(ph)
                cells += ["-"] * 3 if v is None else [f"{v['kernels']:,}", f"{v['kernel_ms']:.2f}", f"{v['cpu_ops']:,}"]
            out.append(f"| {ph} | " + " | ".join(cells) + " |")
        eager_kernels = profiles.get("eager:ref", {}).get("total", {}).get("kernels")
        if eager_kernels and any(v["total"]["kernels"] == 0 for v in profiles.values()):
            out += ["", "A replayed step with no kernels seen: the profiler did not trace the kernels of graphs "
                    "captured before it started (CUPTI); the timings above still hold."]
    return out


def _phase_order(name: str) -> int:
    order = ("act", "env", "replay_sample", "wm_update", "imagine", "ac_update")
    return order.index(name) if name in order else len(order)


def _profile_tables(r: dict) -> str:
    from matwm_fast.tools.profile import format_tables

    t = r["timing"]
    report = {"backends": t["backends"], "flops_per_step": t.get("flops_per_step", {}), "budget": t["budget"],
              "preset": r.get("preset"), "device_name": r.get("device"), "interleaved": True,
              "matmul_peak_flops_per_s": None}
    try:
        return format_tables(report, markdown=True)
    except (KeyError, TypeError, ZeroDivisionError):  # a partial record: the table above has what there is
        return ""


def inductor(res: dict) -> list[str]:
    if not res.get("variants"):
        return []
    out = ["", "## Inductor (last, with the time left)", "",
           "| variant | status | kernels | amp | ms/step | median | imagine ms | wm_update ms | ac_update ms | "
           "imagined steps/s | peak MiB | warm-up s | process s |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v, r in res["variants"].items():
        f = r.get("figures")
        if not f:
            out.append(f"| {v} | {r['status']} | {r.get('message', '')} |" + " |" * 10)
            continue
        out.append(f"| {v} | ok | {f['runtime']['kernels']} | {f['runtime']['amp']} | {f['step_ms']:.2f} | "
                   f"{f['step_ms_median']:.2f} | {f['phases_ms']['imagine']:.2f} | {f['phases_ms']['wm_update']:.2f} | "
                   f"{f['phases_ms']['ac_update']:.2f} | {f['imagined_steps_per_s']:,.0f} | "
                   f"{f['peak_memory_mib']:,.0f} | {f['warmup_s']:.1f} | {r['seconds']:.0f} |")
    firsts = [f"- `{v}`: " + ", ".join(f"{k} {x:.1f}" for k, x in r["figures"]["first_step_s"].items())
              for v, r in res["variants"].items() if (r.get("figures") or {}).get("first_step_s")]
    if firsts:
        out += ["", "Seconds of each phase of the first training step (compilation):", ""] + firsts
    if res.get("tables_md"):
        out += ["", "<details><summary>per-phase tables</summary>", "", res["tables_md"], "</details>"]
    return out


def failures(st: dict) -> list[str]:
    """What went wrong: failing tests, errors of the first stage's parts, each failed command's tail."""
    out = []
    for name, r in st.items():
        if r["status"] in ("ok", "skipped", "pending"):
            continue
        res = r.get("result") or {}
        subs = [x for x in (res.get("parts") or res.get("variants") or res).values() if isinstance(x, dict)]
        out += ["", f"## {name}: {r['status']}", ""]
        out += [f"- `{f['test']}`: {f['message']}" for x in [res, *subs] for f in x.get("failures", [])]
        out += [f"- {x.get('note', '')}" for x in subs if x.get("status") not in (None, "ok") and x.get("note")]
        out += [f"- `{e['piece']}`: {e['error'].splitlines()[0][:300]}" for x in subs
                for e in (x.get("record") or {}).get("errors", [])]
        out += [f"```\n{x['tail'][-1500:]}\n```" for x in [res, *subs] if x.get("tail")]
    return out
