"""Helpers of bench/gpu_check.sh, one subcommand each (see `--help`):

  install WHEELS   offline install of what this Python lacks from a wheelhouse built by `make gpu-wheels`:
                   `pip install --no-index --find-links WHEELS --no-deps NAME==VERSION ...` for the
                   distributions that are not installed (plus any installed one that a new package needs
                   in another version, if the wheelhouse has it); never touches torch. Then imports the
                   packages and lists requirements still unmet (a `pip check` of the wheelhouse packages).
  probe            kernel-level facts in one process, no launcher: bf16 / fp32 matmul peak, the SDPA
                   kernel that runs for causal and packed-document (boolean mask) batches, our GPT's
                   forward+backward MFU without optimizer (gpt2-124m incl. a packed-document batch,
                   gpt2-350m), KV-cache generation on the device. Writes OUT/probe.json.
  summary          one table from OUT/sections.tsv (written by gpu_check.sh), OUT/probe.json and the runs'
                   metrics.jsonl / run.json / eval JSON: section, status, seconds, key figure.

MFU follows DESIGN.md "Measuring speed": FLOPs/token = 6N + 12 L H Q T (GPT.flops_per_token), against the
vendor bf16 peak (H100/H200 SXM: 989 TFLOP/s) and against the bf16 matmul peak measured in the probe.
`--smoke` runs the same code on CPU with tiny sizes (to check the plumbing without a GPU).
"""

from __future__ import annotations

import argparse
import csv
import email.parser
import importlib
import importlib.metadata as md
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

VENDOR_BF16 = 989e12  # H100 / H200 SXM dense bf16 (DESIGN.md)
TARGET_MFU = {"gpt2_124m": 0.40, "gpt2_350m": 0.45}  # the targets, end to end through `llmstack pretrain`
# never installed or upgraded from the wheelhouse, whatever a requirement says
PROTECTED = {"torch", "triton", "numpy", "transformers", "tokenizers", "safetensors", "accelerate", "peft"}
IMPORT_CHECK = [("pydantic", True), ("deepspeed", True), ("yaml", True), ("datasets", False), ("zstandard", False),
                ("lm_eval", False), ("evaluate", False)]


def _packaging():
    """packaging's Requirement, InvalidRequirement and Version (pip's vendored copy if packaging is missing)."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.version import Version
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
            from pip._vendor.packaging.version import Version
        except ImportError:
            return None
    return Requirement, InvalidRequirement, Version


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------------------------------
# install
# --------------------------------------------------------------------------------------------------


def _wheel_info(path: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist lines) of a wheel file, read from its METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8", "replace"))
    return canon(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or []


def _requirements(lines: list[str], extras: set[str]):
    """The Requirement objects of Requires-Dist lines that apply here (markers evaluated, with extras)."""
    Requirement, InvalidRequirement, _ = _packaging()
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            yield req


def _installed() -> dict[str, tuple[str, list[str]]]:
    out = {}
    for d in md.distributions():
        name = d.metadata["Name"]
        if name:
            out.setdefault(canon(name), (d.version, d.requires or []))
    return out


def _unmet(names, wheels, installed, planned):
    """Requirements of `names` (and of their requested extras) that neither the installed set nor
    `planned` satisfies: [(package, Requirement, the version there or None)]."""
    Version = _packaging()[2]

    out, todo, seen = [], [(n, frozenset()) for n in names], set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        lines = wheels[name][1] if name in planned else installed.get(name, (None, []))[1]
        for req in _requirements(lines, set(extras)):
            dep = canon(req.name)
            have = wheels[dep][0] if dep in planned else installed.get(dep, (None,))[0]
            if have is None:
                out.append((name, req, None))
            elif not req.specifier.contains(Version(have), prereleases=True):
                out.append((name, req, have))
            if have is not None and req.extras:
                todo.append((dep, frozenset(req.extras)))
    return out


def cmd_install(args) -> int:
    pk = _packaging()
    if pk is None:
        print("install: neither packaging nor pip importable: requirement versions are not checked")
    wheel_dir = Path(args.wheels)
    files = sorted(wheel_dir.glob("*.whl"))
    if not files:
        print(f"install: no wheels in {wheel_dir}/ (build them with `make gpu-wheels` and carry the folder)")
        return 2
    wheels = {}  # name -> (version, requires, file)
    for f in files:
        name, version, requires = _wheel_info(f)
        wheels[name] = (version, requires, f)
    installed = _installed()
    plan = {n for n in wheels if n not in installed and n not in PROTECTED}
    # upgrade (or downgrade) an installed package only when a package being installed needs it
    while pk is not None:
        Version = pk[2]
        extra = set()
        for _, req, have in _unmet(plan, {n: (v, r) for n, (v, r, _) in wheels.items()}, installed, plan):
            dep = canon(req.name)
            if have is not None and dep in wheels and dep not in plan and dep not in PROTECTED \
                    and req.specifier.contains(Version(wheels[dep][0]), prereleases=True):
                extra.add(dep)
        if not extra:
            break
        plan |= extra
    present = sorted(n for n in wheels if n not in plan)
    other = [f"{n} {installed[n][0]} (wheel {wheels[n][0]})" for n in present
             if n in installed and installed[n][0] != wheels[n][0]]
    print(f"install: {len(files)} wheels in {wheel_dir}/; already installed: {len(present)}"
          + (f"; kept at another version: {', '.join(other)}" if other else ""))
    specs = [f"{n}=={wheels[n][0]}" for n in sorted(plan)]
    print(f"install: to install ({len(specs)}): {' '.join(specs) if specs else 'nothing'}")
    rc = 0
    if specs and not args.dry_run:
        rc = _pip_install(wheel_dir, specs, [wheels[n][2] for n in sorted(plan)], args.target)
    # what the packages of the wheelhouse still lack (e.g. scikit-learn / scipy, left out on purpose)
    installed = _installed()
    names = [n for n in wheels if n in installed]
    unmet = _unmet(names, {n: (v, r) for n, (v, r, _) in wheels.items()}, installed, set()) if pk else []
    for pkg, req, have in unmet:
        print(f"install: unmet: {pkg} requires {req} ({canon(req.name)} {have or 'missing'})")
    print(f"install: {len(unmet) if pk else 'unchecked'} unmet requirements of the wheelhouse packages")
    # import what the project needs, each in a fresh interpreter (a broken package must not hide the others)
    failed_core = False
    env = dict(os.environ)
    if args.target and Path(args.target).is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.target, env.get("PYTHONPATH")]))
    procs = [(mod, core, subprocess.Popen(
        [sys.executable, "-c", f"import {mod}, sys; print(getattr({mod}, '__version__', '?'))"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)) for mod, core in IMPORT_CHECK]
    for mod, core, proc in procs:  # all at once: each import costs seconds (torch under deepspeed, lm_eval)
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += "\ntimed out after 180s"
        if proc.returncode == 0:
            print(f"install: import {mod}: ok {(stdout.strip().splitlines() or ['?'])[-1]}")
        else:
            last = (stderr.strip().splitlines() or ["?"])[-1][:200]
            print(f"install: import {mod}: FAILED{' (needed by every stage)' if core else ''}: {last}")
            failed_core |= core
    return 1 if (rc or failed_core) else 0


def _pip_install(wheel_dir: Path, specs: list[str], files: list[Path], target: str | None) -> int:
    """pip, offline and without resolving; with --break-system-packages on an externally managed
    Python; without pip, the wheels are unpacked into `target` (gpu_check.sh puts it on PYTHONPATH)."""
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheel_dir), "--no-deps",
            "--disable-pip-version-check", "--no-warn-script-location", "--quiet"]
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        t = time.time()
        p = subprocess.run(base + specs, capture_output=True, text=True)
        if p.returncode and "externally-managed" in (p.stderr + p.stdout):
            print("install: externally managed Python: again with --break-system-packages")
            p = subprocess.run(base + ["--break-system-packages"] + specs, capture_output=True, text=True)
        if p.returncode == 0:
            print(f"install: pip installed {len(specs)} packages in {time.time() - t:.1f}s")
            return 0
        print(f"install: pip failed (rc {p.returncode}): {(p.stderr or p.stdout).strip()[-1500:]}")
    if not target:
        print("install: no pip" if not has_pip else "install: pip failed", "and no --target to unpack into")
        return 1
    dest = Path(target)
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        with zipfile.ZipFile(f) as z:
            z.extractall(dest)
    print(f"install: unpacked {len(files)} wheels into {dest} (to be put on PYTHONPATH)")
    importlib.invalidate_caches()
    sys.path.insert(0, str(dest))
    return 0


# --------------------------------------------------------------------------------------------------
# probe
# --------------------------------------------------------------------------------------------------


def _version_str(v) -> str:
    return ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


class Probe:
    def __init__(self, out: Path, smoke: bool, deadline: float):
        import torch

        self.torch = torch
        self.out, self.smoke, self.deadline = out, smoke, deadline
        self.dev = torch.device("cpu" if smoke else "cuda")
        self.R: dict = {"mode": "cpu-smoke" if smoke else "gpu"}
        self.tiny = dict(n_layer=2, n_head=2, d_model=64) if smoke else {}  # smoke: smaller than gpt2-tiny

    def rec(self, key, value):
        self.R[key] = value
        print(f"[probe] {key}: {json.dumps(value, default=str)}", flush=True)
        (self.out / "probe.json").write_text(json.dumps(self.R, indent=1, default=str))

    def section(self, name, fn):
        left = self.deadline - time.time()
        if left < 5:
            self.rec(name + ".skipped", f"probe deadline ({left:.0f}s left)")
            return
        t = time.time()
        try:
            fn()
        except Exception as e:  # record and go on with the next section
            self.rec(name + ".error", f"{type(e).__name__}: {str(e)[:400]}")
            traceback.print_exc(limit=4)
        finally:
            if self.dev.type == "cuda":
                self.torch.cuda.empty_cache()
            print(f"[probe] -- {name}: {time.time() - t:.1f}s", flush=True)

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def bench(self, fn, iters=10, warm=3) -> float:
        """Milliseconds per call (CUDA events on the GPU, wall clock on CPU)."""
        torch = self.torch
        for _ in range(warm):
            fn()
        self.sync()
        if self.dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(iters):
                fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e) / iters
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters

    # -- sections ---------------------------------------------------------------------------------
    def env(self):
        torch = self.torch
        info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
        if self.dev.type == "cuda":
            p = torch.cuda.get_device_properties(0)
            info |= {"device": p.name, "capability": f"{p.major}.{p.minor}", "memory_GiB": round(p.total_memory / 2**30, 1),
                     "sms": p.multi_processor_count, "cudnn": torch.backends.cudnn.version(),
                     "nccl": _version_str(torch.cuda.nccl.version())}
        else:
            info |= {"device": "cpu", "threads": torch.get_num_threads()}
        for mod in ("triton", "transformers", "deepspeed", "pydantic"):
            try:
                info[mod] = md.version(mod)
            except md.PackageNotFoundError:
                info[mod] = None
        self.rec("env", info)

    def matmul(self):
        torch = self.torch
        n = 512 if self.smoke else 8192
        out = {}
        for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            a, b = torch.randn(n, n, device=self.dev, dtype=dtype), torch.randn(n, n, device=self.dev, dtype=dtype)
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
            try:
                ms = self.bench(lambda: a @ b, iters=3 if self.smoke else (20 if label == "bf16" else 5))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
            tf = 2 * n**3 / (ms * 1e-3) / 1e12
            out[f"{label}_tflops"] = float(f"{tf:.3g}") if self.smoke else round(tf, 1)
        if not self.smoke:
            out["bf16_of_vendor_989"] = round(out["bf16_tflops"] * 1e12 / VENDOR_BF16, 3)
        out["n"] = n
        self.rec("matmul", out)

    def _doc_mask(self, B, T, mean_len=600):
        """(B, T) segment ids and (B, T) positions of packed documents, as
        data_pipeline.stream.Loader builds them; document lengths ~ exponential(mean_len), at least 8."""
        torch = self.torch
        g = torch.Generator().manual_seed(0)
        seg = torch.empty(B, T, dtype=torch.long)
        pos = torch.empty(B, T, dtype=torch.long)
        for b in range(B):
            t, d = 0, 0
            while t < T:
                n = max(8, int(torch.empty(1).exponential_(1 / mean_len, generator=g).item()))
                seg[b, t:t + n] = d
                pos[b, t:t + n] = torch.arange(min(n, T - t))
                t, d = t + n, d + 1
        return seg.to(self.dev), pos.to(self.dev)

    def _kernels(self, fn) -> list[str]:
        """The SDPA implementations (aten ops) that run in fn(), forward and backward."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            self.sync()
        names = {e.name for e in prof.events()}
        return sorted(n.removeprefix("aten::") for n in names
                      if n.startswith("aten::_scaled_dot_product") or n in ("aten::_flash_attention_forward",
                                                                            "aten::_efficient_attention_forward"))

    @staticmethod
    def _backend(kernels: list[str]) -> str:
        fwd = [k for k in kernels if not k.endswith("_backward")]
        for key, name in (("cudnn", "cudnn"), ("flash_attention_for_cpu", "flash (cpu)"), ("flash", "flash"),
                          ("efficient", "mem-efficient"), ("math", "math"), ("overrideable", "overrideable")):
            if any(key in k for k in fwd):
                return name
        return "math (no fused kernel)" if not fwd else fwd[0]

    def sdpa(self):
        torch = self.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from llmstack.models import layers

        H, D = 12, 64  # gpt2-124m heads
        shapes = [(2, 128)] if self.smoke else [(16, 1024), (4, 4096)]
        out = {}
        for B, T in shapes:
            seg, _ = self._doc_mask(B, T, mean_len=40 if self.smoke else 600)
            mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device=self.dev).tril())[:, None]
            q, k, v = (torch.randn(B, H, T, D, device=self.dev, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            row = {"doc_mask_density": round(mask.float().mean().item(), 3)}
            modes = (("causal", dict(causal=True)),
                     ("packed_docs", dict(causal=True, mask=layers.SegmentPlan(seg))),  # FlexAttention on CUDA
                     ("packed_docs_gather", dict(causal=True, mask=layers.SegmentPlan(seg, use_flex=False))),
                     ("packed_docs_dense_reference", dict(causal=True, mask=mask)))
            for mode, kw in modes:
                def step():
                    layers.attention(q, k, v, **kw).sum().backward()
                kernels = self._kernels(step)
                allowed = {}
                for be in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
                    if not hasattr(SDPBackend, be) or not isinstance(kw.get("mask"), (type(None), torch.Tensor)):
                        continue
                    try:
                        with sdpa_kernel([getattr(SDPBackend, be)]), torch.no_grad():
                            layers.attention(q, k, v, **kw)
                        allowed[be.removesuffix("_ATTENTION").lower()] = "ok"
                    except Exception as e:
                        allowed[be.removesuffix("_ATTENTION").lower()] = "no: " + str(e).split("\n")[0][:60]
                row[mode] = {"chosen": self._backend(kernels), "kernels": kernels, "backends": allowed,
                             "fwd_bwd_ms": round(self.bench(step, iters=2 if self.smoke else 10), 3)}
                q.grad = k.grad = v.grad = None
            out[f"B{B}_T{T}_H{H}_D{D}_bf16"] = row
            self.rec("sdpa", out)
            del mask, seg, q, k, v

    def _model(self, preset: str, V: int, **overrides):
        torch = self.torch
        from llmstack.models.gpt import GPT, gpt_config_from_preset

        torch.manual_seed(0)
        m = GPT(gpt_config_from_preset(preset, V, dropout=0.0, attn_dropout=0.0, **overrides))
        m.init_weights()
        return m.to(self.dev, torch.bfloat16)  # DeepSpeed's bf16 mode holds the module in bf16 like this

    def model_mfu(self):
        torch = self.torch
        peak = self.R.get("matmul", {}).get("bf16_tflops")
        runs = ([("gpt2-tiny", 2, 64, 512, False), ("gpt2-tiny", 2, 64, 512, True)] if self.smoke else
                [("gpt2-124m", 16, 1024, 32768, False), ("gpt2-124m", 16, 1024, 32768, True),
                 ("gpt2-350m", 8, 1024, 32768, False)])
        out = {}
        for preset, B, T, V, docs in runs:
            if time.time() > self.deadline - 10:
                out[f"{preset}{'_packed_docs' if docs else ''}"] = "skipped (probe deadline)"
                continue
            m = self._model(preset, V, **self.tiny).train()
            x = torch.randint(0, V, (B, T), device=self.dev)
            extra = {}
            if docs:
                seg, pos = self._doc_mask(B, T, mean_len=40 if self.smoke else 600)
                extra = {"segment_ids": seg, "position_ids": pos}

            def step():
                m(x, labels=x, **extra).backward()
            t = time.time()
            step()
            self.sync()
            first = time.time() - t
            kernels = self._kernels(step)
            if self.dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = self.bench(step, iters=2 if self.smoke else 10, warm=1 if self.smoke else 2)
            fpt = m.flops_per_token(T)
            tps = B * T / (ms / 1e3)
            row = {"B": B, "T": T, "V": V, "fwd_bwd_ms": round(ms, 2), "tokens_per_s": round(tps),
                   "GFLOP_per_token": round(fpt / 1e9, 4), "sdpa": self._backend(kernels), "first_step_s": round(first, 2)}
            if self.dev.type == "cuda":
                row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
                row["mfu_vs_989"] = round(tps * fpt / VENDOR_BF16, 4)
            if peak:
                row["mfu_vs_measured"] = round(tps * fpt / (peak * 1e12), 4)
            out[f"{preset}{'_packed_docs' if docs else ''}"] = row
            self.rec("model_fwd_bwd_bf16", out)
            del m, x, extra

    def generate(self):
        torch = self.torch
        from llmstack.generate import generate

        preset, V = ("gpt2-tiny", 512) if self.smoke else ("gpt2-124m", 32768)
        m = self._model(preset, V, **self.tiny).eval()
        g = torch.Generator().manual_seed(0)
        Bn, new = (4, 8) if self.smoke else (16, 128)
        prompts = [torch.randint(0, V, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(Bn)]
        generate(m, prompts, max_new_tokens=2)  # warm-up
        self.sync()
        t = time.perf_counter()
        toks = generate(m, prompts, max_new_tokens=new)
        self.sync()
        dt = time.perf_counter() - t
        out = {"model": f"{preset} bf16 (random weights)", "batch": Bn, "new_tokens": new,
               "tokens_per_s": round(sum(map(len, toks)) / dt), "ms_per_step": round(dt / new * 1e3, 2)}
        # the KV cache gives what recomputing the whole sequence gives (fp32, greedy)
        tm = self._model("gpt2-tiny", 512).float().eval()
        ps = [[1, 2, 3, 4, 5], [7, 8]]
        out["cache_equals_no_cache"] = (generate(tm, ps, max_new_tokens=12) ==
                                        generate(tm, ps, max_new_tokens=12, use_cache=False))
        self.rec("generate", out)


def cmd_probe(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(f"probe: torch {torch.__version__} sees no CUDA device (use --smoke on CPU)")
        return 2
    p = Probe(out, args.smoke, time.time() + args.deadline_s)
    for name in ("env", "matmul", "sdpa", "model_mfu", "generate"):
        p.section(name, getattr(p, name))
    errors = [k for k in p.R if k.endswith(".error")]
    print(f"probe: done, {len(errors)} errors" + (f" ({', '.join(errors)})" if errors else ""))
    return 1 if errors else 0


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _si(x: float) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g}{unit}"
    return f"{x:.3g}"


def _pretrain_figure(run: Path, matmul: dict, smoke: bool) -> tuple[str, float | None]:
    """(key figure, MFU vs 989 or None) of a pretraining run: losses, median tokens/s of the logged
    windows after the first (start-up, warm-up), MFU from run.json's FLOPs/token against the vendor
    bf16 peak (GPU, bf16 runs) and against the probe's matmul peak of the run's precision."""
    recs = [r for r in _jsonl(run / "metrics.jsonl") if "tokens_per_s" in r]
    if not recs:
        return "no metrics.jsonl lines", None
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    precision = "bf16"
    try:
        import yaml

        precision = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("precision", precision)
    except Exception:  # no config.yaml (killed early) or no yaml: assume bf16
        pass
    steady = recs[1:] or recs
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    fig = f"loss {recs[0]['loss']:.3f}->{recs[-1]['loss']:.3f}, {_si(tps)} tok/s"
    mfu = None
    fpt = info.get("flops_per_token")
    if fpt:
        if not smoke and precision == "bf16":
            mfu = tps * fpt / VENDOR_BF16
            fig += f", MFU {100 * mfu:.1f}%"
        key = "fp32" if precision == "fp32" else "bf16"
        if matmul.get(f"{key}_tflops"):
            fig += f" ({100 * tps * fpt / (matmul[f'{key}_tflops'] * 1e12):.1f}% of measured {key} matmul peak)"
    params = info.get("params")
    if params:
        fig += f", {_si(params)} params"
    return fig, mfu


def cmd_summary(args) -> int:
    out, work = Path(args.out), Path(args.work)
    rows = []
    if (out / "sections.tsv").is_file():
        with open(out / "sections.tsv") as f:
            rows = [r for r in csv.reader(f, delimiter="\t") if r]
    probe = json.loads((out / "probe.json").read_text()) if (out / "probe.json").is_file() else {}
    measured = probe.get("matmul", {}).get("bf16_tflops")
    table, bad = [], 0
    for name, status, seconds, note in (r + [""] * (4 - len(r)) for r in rows):
        fig = ""
        try:
            if status == "SKIP":
                pass
            elif name == "probe" and probe:
                mm = probe.get("matmul", {})
                parts = []
                if mm:
                    parts.append(f"matmul bf16 {mm.get('bf16_tflops')} / fp32 {mm.get('fp32_tflops')} TFLOP/s")
                sdpa = [f"{shape.split('_H')[0]} {row['causal']['chosen']} / {row['packed_docs']['chosen']}"
                        for shape, row in probe.get("sdpa", {}).items()]
                if sdpa:
                    parts.append("SDPA causal / packed-docs: " + ", ".join(sdpa))
                for key, row in probe.get("model_fwd_bwd_bf16", {}).items():
                    if isinstance(row, dict) and "mfu_vs_989" in row:
                        parts.append(f"{key} fwd+bwd MFU {100 * row['mfu_vs_989']:.1f}%")
                    elif isinstance(row, dict) and "mfu_vs_measured" in row:
                        parts.append(f"{key} fwd+bwd {100 * row['mfu_vs_measured']:.1f}% of measured bf16 peak")
                g = probe.get("generate", {})
                if g:
                    parts.append(f"generate {_si(g['tokens_per_s'])} tok/s, cache==no-cache {g['cache_equals_no_cache']}")
                errs = [k for k in probe if k.endswith(".error")]
                if errs:
                    parts.append("errors: " + ", ".join(errs))
                fig = "; ".join(parts)
            elif name.startswith(("tiny_", "gpt2_")):
                fig, mfu = _pretrain_figure(work / "runs" / name, probe.get("matmul", {}), args.smoke)
                if status != "OK" and mfu is None and fig.startswith("no metrics"):
                    fig = ""
                if name in TARGET_MFU and status == "OK":
                    if args.smoke:
                        fig += f" [target {100 * TARGET_MFU[name]:.0f}%: n/a on CPU]"
                    elif mfu is not None:
                        ok = mfu >= TARGET_MFU[name]
                        fig += f" [target >= {100 * TARGET_MFU[name]:.0f}%: {'met' if ok else 'MISSED'}]"
                        if not ok:
                            status = "LOW"
            elif name == "ppo":
                recs = [r for r in _jsonl(work / "runs" / "ppo" / "metrics.jsonl") if "reward" in r]
                if recs:
                    r = recs[-1]
                    fig = (f"{len(recs)} steps, reward {recs[0]['reward']:.3f}->{r['reward']:.3f}, kl {r.get('kl', 0):.4f}, "
                           f"step split generate/score/train {r.get('time_generate', 0):.2f}/{r.get('time_score', 0):.2f}/"
                           f"{r.get('time_train', 0):.2f}s, rollout {_si(r.get('gen_tokens_per_s', 0))} tok/s")
            elif name == "eval" and (out / "eval.json").is_file():
                d = json.loads((out / "eval.json").read_text())
                parts = []
                for task, m in (d.get("tasks") or {}).items():
                    if "perplexity" in m:
                        parts.append(f"{task} ppl {m['perplexity']:.1f}")
                    elif "acc" in m:
                        parts.append(f"{task} acc {m['acc']:.3f} (n={m.get('n_samples')})")
                tp = d.get("throughput") or {}
                if tp.get("tokens_per_s"):
                    parts.append(f"{_si(tp['tokens_per_s'])} tok/s")
                fig = ", ".join(parts)
            elif name == "tokenizer" and (out / "logs" / "tokenizer.log").is_file():
                m = re.search(r"^tokenizer: .*$", (out / "logs" / "tokenizer.log").read_text(), re.M)
                fig = m.group(0).removeprefix("tokenizer: ") if m else ""
            elif name == "generate" and (out / "logs" / "generate.log").is_file():
                text = (out / "logs" / "generate.log").read_text()
                outs = re.findall(r"^--- prompt: .*\n(.*)$", text, re.M)
                fig = f"{len(outs)} continuations, first: {outs[0][:48]!r}" if outs else ""
            elif name == "setup" and (out / "logs" / "setup.log").is_file():
                text = (out / "logs" / "setup.log").read_text()
                m = re.search(r"to install \((\d+)\)", text)
                imports = re.findall(r"import (\w+): (ok [^\s]*|FAILED)", text)
                fig = (f"{m.group(1)} wheels to install; " if m else "") + \
                      ", ".join(f"{mod} {st.removeprefix('ok ')}" for mod, st in imports)
        except Exception as e:  # a summary must not fail on one odd artifact
            fig = f"(no figure: {type(e).__name__}: {e})"
        fig = "; ".join(x for x in (fig, note) if x)
        bad += status not in ("OK",)
        table.append((name, status, f"{seconds}s" if seconds else "", fig))
    w = max([len(r[0]) for r in table] + [7])
    print(f"{'section':<{w}}  {'status':<6}  {'time':>5}  key figure")
    print(f"{'-' * w}  ------  -----  ----------")
    for name, status, sec, fig in table:
        print(f"{name:<{w}}  {status:<6}  {sec:>5}  {fig}")
    print(f"{len(table) - bad}/{len(table)} sections OK"
          + ("" if args.smoke else f"; MFU = tokens/s x FLOPs/token / 989 TFLOP/s (H100 SXM bf16), "
                                   f"measured bf16 matmul peak {measured} TFLOP/s"))
    return 0 if bad == 0 else 3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install", help="offline install of the missing packages from a wheelhouse")
    p.add_argument("wheels", help="the folder `make gpu-wheels` fills")
    p.add_argument("--dry-run", action="store_true", help="print the plan and check imports, install nothing")
    p.add_argument("--target", help="without pip: unpack the wheels here (then put it on PYTHONPATH)")
    p = sub.add_parser("probe", help="kernel-level checks; writes OUT/probe.json")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    p.add_argument("--deadline-s", type=float, default=150, help="skip the remaining sections after this long")
    p = sub.add_parser("summary", help="the table of gpu_check.sh")
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True, help="the folder holding runs/<section>/")
    p.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd != "install":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
    return {"install": cmd_install, "probe": cmd_probe, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
