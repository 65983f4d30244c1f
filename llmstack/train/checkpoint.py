"""Checkpoints that survive faults: temp dir, fsync, manifest, then rename, then the `latest` pointer.

Layout under `run.dir/checkpoints/`:
    step_<N>/              a complete checkpoint (DeepSpeed files + meta.json + rng_rank<R>.pt +
                           manifest.json, written last: every file's size and sha256)
    .tmp_step_<N>/         a checkpoint being written; ignored, and removed by the next save or run
    abandoned_<time>/      checkpoints set aside, never deleted: those after the step a run resumed
                           from (a rollback starts a new branch), or ones that failed verification
    latest                 text file naming the newest complete tag (DeepSpeed's convention,
                           so DeepSpeed's own tools read it too); replaced atomically
A directory is renamed to step_<N> only after every rank has written and fsynced its files, so
any step_<N> that exists is complete; `resume=auto` takes the newest step_<N> that verifies
against its manifest, saying why it skipped newer ones. `run.dir/run.lock` keeps a second run
off the same run directory (see runlock.py). meta.json is a `CheckpointMeta` (meta.py); reading a
checkpoint's weights outside training (consolidate, export, model.init) is weights.py.

Why sha256: it is in the standard library, `sha256sum` recomputes it for a copied checkpoint by
hand, and with the CPU's SHA instructions it runs at about 1 GB/s per core (0.9 GB/s measured on
an AMD EPYC core), near the speed the files are written and read; each rank hashes its share of
the files, so it adds a fraction of the save time. zlib's CRC-32 measured only ~1.5x faster and
has no such tool (and a 32-bit check is weak over hundreds of GB).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import RankError, UsageError
from llmstack.train import runlock
from llmstack.train.meta import CheckpointMeta

_STEP_RE = re.compile(r"^step_(\d+)$")
META = "meta.json"
MANIFEST = "manifest.json"
# meta.json's "checkpoint_format": 2 = the checkpoint has a manifest. Checkpoints written before
# (no key) are checked structurally instead (see `_check_legacy`).
FORMAT = 2
# A failed write with less free space than this on the filesystem is reported as a full disk
# (torch.save reports a short write as a RuntimeError without errno).
LOW_SPACE_BYTES = 16 << 20

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then the directories (deepest first).

    DeepSpeed closes its checkpoint files without fsync, so after a power loss a renamed
    step_<N>/ could hold empty or partial files. Each rank calls this after writing: on a local
    filesystem fsync flushes the file's pages whichever process wrote them, on a network
    filesystem it flushes this client's (the files this rank wrote); a file with nothing dirty
    costs a metadata round trip, so every rank simply syncs every file it sees.
    """
    dirs = []
    for d, _, files in os.walk(path):
        dirs.append(Path(d))
        for name in files:
            fd = os.open(Path(d) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _fsync_dir(d)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(out)


# PPO keeps two checkpoint roots, checkpoints/actor/ and checkpoints/critic/: the policy, which
# generate, export, eval and model.init want, is the actor.
POLICY_ROOT = "actor"
_noted: set[str] = set()  # the paths already said to resolve to an actor (say it once per process)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a user path: step_N/, a `latest` file, or a checkpoints/ or run dir.

    A PPO run directory, its checkpoints/ or checkpoints/latest (which PPO does not write) mean its
    actor's newest checkpoint, said on stderr."""
    p = Path(path)
    if p.name == "latest" and p.is_file():
        return p.parent / p.read_text().strip()
    if p.is_dir() and (p / META).is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file():
            return resolve(root / "latest")
        if steps := step_dirs(root):
            return steps[-1][1]
    base = p.parent if p.name == "latest" and not p.exists() else p
    for root in (base / POLICY_ROOT, base / "checkpoints" / POLICY_ROOT):
        if (root / "latest").is_file() or step_dirs(root):
            chosen = resolve(root)
            if str(p) not in _noted and env.is_main():
                _noted.add(str(p))
                critic = root.parent / "critic"
                print(f"note: {p} holds PPO checkpoints: using the actor's, {chosen}"
                      + (f" (the critic's are in {critic})" if critic.is_dir() else ""), file=sys.stderr, flush=True)
            return chosen
    if not p.exists():
        raise UsageError(f"checkpoint not found: {p}")
    raise UsageError(f"{p} is not a checkpoint (expected step_N/ with {META}, a latest file, or a run dir)")


def find_resume(root: Path) -> Path | None:
    """The newest checkpoint under root that verifies (see `verify`), or None."""
    return newest_verified(root)[0]


def newest_verified(root: Path, *, collective: bool = False) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """(the newest step_<N> under root that verifies or None, [(newer checkpoint, its problems)]).

    The highest step wins, not the `latest` pointer: it is written after the rename, so a crash
    in between leaves it one checkpoint behind. `collective`: every rank calls this and they
    share the hashing (rank 0's listing decides which directories are candidates).
    """
    names = [p.name for _, p in step_dirs(root)]
    if collective:
        names = env.broadcast_object(names)
    skipped = []
    for name in reversed(names):
        problems = verify(root / name, collective=collective)
        if not problems:
            _VERIFIED.add(str((root / name).resolve()))
            return root / name, skipped
        skipped.append((root / name, problems))
    return None, skipped


# Checkpoints this process has verified (resolved paths), so `load` does not hash them twice.
_VERIFIED: set[str] = set()


def _file_entry(path: Path) -> dict:
    with open(path, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _files(d: Path) -> list[tuple[str, int]]:
    """(path relative to d, size) of every file under d but the manifest, by name."""
    out = [(p.relative_to(d).as_posix(), p.stat().st_size) for p in d.rglob("*") if p.is_file()]
    return sorted((name, size) for name, size in out if name != MANIFEST)


def _share(entries: list[tuple[str, int]], world: int, rank: int) -> list[str]:
    """This rank's part of the files (name, size) when `world` ranks split the hashing: largest
    first, each to the rank with the fewest bytes so far (every rank computes the same split)."""
    load = [0] * world
    mine = []
    for name, size in sorted(entries, key=lambda e: (-e[1], e[0])):
        r = load.index(min(load))
        load[r] += size
        if r == rank:
            mine.append(name)
    return mine


def write_manifest(d: Path, files: dict | None = None) -> None:
    """Write d/manifest.json (fsynced): {relative path: {size, sha256}} of `files`, or of every file
    under d. It is the last file of a checkpoint: a directory whose files all match it is whole."""
    files = files if files is not None else {n: _file_entry(d / n) for n, _ in _files(d)}
    _write_atomic(d / MANIFEST, json.dumps({"format": FORMAT, "hash": "sha256", "files": dict(sorted(files.items()))},
                                           indent=1))


def verify(ckpt: Path, *, collective: bool = False, rng: bool = True) -> list[str]:
    """What is wrong with checkpoint directory `ckpt`, one line per problem naming the file
    (empty: it verifies). `collective`: every rank calls this with the same `ckpt`, each hashes
    its share of the files, and all get the same answer.

    With a manifest: every file it lists exists with its recorded size and sha256. Without one
    (checkpoints written before manifests existed): meta.json parses; the model state file and,
    under ZeRO, each saved rank's optimizer file exist; so do the RNG files of every rank when
    this run has as many ranks as the saved one; and every .pt file is a whole zip archive whose
    members match their CRC-32 (torch.save writes them), which catches truncation and bit flips
    in the tensors but not a file that was never written. `rng=False`: reading weights only, the
    RNG files of such a checkpoint are not required.
    """
    ckpt = Path(ckpt)
    world, rank = (env.world_size(), env.rank()) if collective else (1, 0)
    problems: list[str] = []
    manifest_file = ckpt / MANIFEST
    if manifest_file.is_file():
        try:
            files = json.loads(manifest_file.read_text())["files"]
            entries = [(name, int(e["size"])) for name, e in files.items()]
        except (ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{manifest_file} is unreadable (truncated or not written by llmstack)")
        else:
            for name in _share(entries, world, rank):
                problems += _check_file(ckpt / name, files[name])
    else:
        try:
            meta = CheckpointMeta.read(ckpt / META)
        except FileNotFoundError:
            meta, problems = None, [f"{ckpt / META} is missing: not a complete checkpoint"]
        except (ValueError, TypeError, OSError) as e:
            meta, problems = None, [f"{ckpt / META} is unreadable (truncated?): {e}"]
        if meta is not None and meta.checkpoint_format >= FORMAT:
            problems.append(f"{manifest_file} is missing (meta.json says the checkpoint was written with one)")
        elif meta is not None:
            problems += _check_legacy(ckpt, meta, world, rank, rng)
    if collective and world > 1:
        problems = [p for part in env.all_gather_object(problems) for p in part]
    return list(dict.fromkeys(problems))


def _check_file(path: Path, entry: dict) -> list[str]:
    if not path.is_file():
        return [f"{path} is missing"]
    size = path.stat().st_size
    if size != entry.get("size"):
        return [f"{path} is {size} bytes, the manifest records {entry.get('size')} (truncated or rewritten)"]
    if _file_entry(path)["sha256"] != entry.get("sha256"):
        return [f"{path} does not match its sha256 in the manifest (its contents changed after the save)"]
    return []


def _check_legacy(ckpt: Path, meta: CheckpointMeta, world: int, rank: int, rng: bool) -> list[str]:
    """The checks of a checkpoint without manifest (see `verify`); each rank tests its share of the .pt files."""
    problems = []
    names = {p.name for p in ckpt.iterdir()}
    saved_world = meta.world_size
    if not meta.universal:
        if not any(n.endswith("model_states.pt") for n in names):
            problems.append(f"{ckpt / 'mp_rank_00_model_states.pt'} is missing (no model state file)")
        for r in range(saved_world) if meta.zero_stage else ():
            if not any(re.fullmatch(rf"(bf16_)?zero_pp_rank_{r}_mp_rank_\d+_optim_states\.pt", n) for n in names):
                problems.append(f"{ckpt / f'zero_pp_rank_{r}_mp_rank_00_optim_states.pt'} is missing")
        if rng and saved_world == env.world_size():
            problems += [f"{ckpt / f'rng_rank{r}.pt'} is missing" for r in range(saved_world)
                         if f"rng_rank{r}.pt" not in names]
    pt = [(p.relative_to(ckpt).as_posix(), p.stat().st_size) for p in ckpt.rglob("*.pt") if p.is_file()]
    for name in _share(pt, world, rank):
        try:
            with zipfile.ZipFile(ckpt / name) as z:
                bad = z.testzip()
        except Exception as e:  # any failure to read the archive means a damaged file
            problems.append(f"{ckpt / name} is not a complete torch file (truncated?): {e}")
            continue
        if bad is not None:
            problems.append(f"{ckpt / name} is corrupt: its entry {bad} does not match its CRC-32")
    return problems


def check(ckpt: Path, *, collective: bool = False, rng: bool = True, what: str = "checkpoint") -> None:
    """Raise a UsageError naming every damaged file of `ckpt` unless it verifies (or did already
    in this process)."""
    key = str(Path(ckpt).resolve())
    if key in _VERIFIED:
        return
    problems = verify(Path(ckpt), collective=collective, rng=rng)
    if problems:
        raise UsageError(f"{what} {ckpt} is damaged: " + "; ".join(problems))
    _VERIFIED.add(key)


def save(engine, root: Path, step: int, meta: CheckpointMeta, client_state: dict, keep_last: int) -> Path:
    """Write checkpoint step_<step> atomically. Every rank calls this.

    Every rank writes its files into .tmp_step_<step>/ and fsyncs them; rank 0 writes meta.json,
    the ranks hash their shares of the files, rank 0 writes manifest.json last, sets aside any
    checkpoint after `step` (an abandoned branch: see `set_aside`), renames the directory to
    step_<step>, points `latest` at it, and removes older checkpoints beyond `keep_last`. A full
    disk ends the run (exit 2) with the temp dir removed and the earlier checkpoints untouched.
    """
    if not isinstance(meta, CheckpointMeta):
        raise TypeError(f"checkpoint meta must be a CheckpointMeta, not {type(meta).__name__}")
    tag = f"step_{step}"
    tmp, final = root / f".tmp_{tag}", root / tag
    if env.is_main():
        root.mkdir(parents=True, exist_ok=True)
        # leftovers of crashed saves, this step's or others' (the run lock keeps live runs out)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    env.barrier()
    try:
        ds.save_engine(engine, root, tmp.name, client_state)
        torch.save(rng_state(), tmp / f"rng_rank{env.rank()}.pt")
        fsync_tree(tmp)  # DeepSpeed does not fsync its files (see fsync_tree)
    except Exception as e:
        _raise_if_disk_full(e, root, tmp, step)
        raise
    env.barrier()
    try:
        if env.is_main():
            _write_atomic(tmp / META, meta.replace(checkpoint_format=FORMAT).to_json())
        entries = env.broadcast_object(_files(tmp) if env.is_main() else None)
        mine = {name: _file_entry(tmp / name) for name in _share(entries, env.world_size(), env.rank())}
        files = {k: v for part in env.all_gather_object(mine) for k, v in part.items()}
        if env.is_main():
            write_manifest(tmp, files)
            if later := [p for n, p in step_dirs(root) if n > step]:
                set_aside(root, later, f"this run saved step {step} after resuming from an earlier step")
            if final.exists():  # re-saving the same step (e.g. the final step after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            _write_atomic(root / "latest", tag)
            older = [p for n, p in step_dirs(root) if n < step]
            for old in older[:max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    except Exception as e:
        _raise_if_disk_full(e, root, tmp, step)
        raise
    env.barrier()
    return final


def _raise_if_disk_full(err: BaseException, root: Path, tmp: Path, step: int) -> None:
    """A save that failed for want of space: remove its temp dir and raise a RankError (exit 2 at
    once, also when only this rank met it) that says so. Other failures are left to the caller."""
    if not _disk_full(err, root):
        return
    removed = f"removed the incomplete {tmp.name}; " if tmp.exists() else ""
    shutil.rmtree(tmp, ignore_errors=True)
    (root / "latest.tmp").unlink(missing_ok=True)
    done = step_dirs(root)
    kept = (f"the newest complete checkpoint, {done[-1][1].name}, is intact" if done
            else "there is no earlier checkpoint")
    raise RankError(f"no space left on device while saving step {step} to {root}: {removed}{kept}. A save needs "
                    "room for one more checkpoint than train.keep_last; free space, then run again "
                    "(train.resume=auto continues from the newest checkpoint)") from None


def _disk_full(err: BaseException, where: Path) -> bool:
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    # torch.save reports a short write as "unexpected pos ..." / "file write failed", without errno
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return isinstance(err, (OSError, RuntimeError)) and st.f_bavail * st.f_frsize < LOW_SPACE_BYTES


def set_aside(root: Path, dirs: list[Path], why: str) -> Path:
    """Move checkpoint directories into root/abandoned_<time>/ instead of deleting them (rank 0),
    keep `latest` on the newest step_<N> left, and say so. Returns that folder."""
    dest = root / time.strftime("abandoned_%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        target, k = dest / d.name, 1
        while target.exists():
            target, k = dest / f"{d.name}.{k}", k + 1
        os.replace(d, target)
    _fsync_dir(dest)
    _fsync_dir(root)
    left = step_dirs(root)
    if left:
        _write_atomic(root / "latest", left[-1][1].name)
    else:
        (root / "latest").unlink(missing_ok=True)
    print(f"moved {', '.join(d.name for d in dirs)} aside to {dest}: {why}", flush=True)
    return dest


def run_dir_of(ckpt_root: Path) -> Path:
    """The run directory a checkpoint root belongs to: the parent of its `checkpoints` folder
    (run.dir/checkpoints, or PPO's run.dir/checkpoints/actor), else the root's parent."""
    for d in (ckpt_root, ckpt_root.parent):
        if d.name == "checkpoints":
            return d.parent
    return ckpt_root.parent


def start_run(resume: str, root: Path, run_dir: Path) -> Path | None:
    """Start a training run on run_dir: take its lock (`runlock.lock_run_dir`), pick the checkpoint to
    resume from, and set aside the checkpoints the run must not continue. Every rank calls this.

    `auto`: the newest checkpoint under root that verifies; newer ones that do not are named
    with their problems and set aside (none verifying while some exist is an error, not a fresh
    start). `none`: no checkpoint; existing ones are set aside. Otherwise a checkpoint path,
    which must verify (exit 2 naming the damaged files); checkpoints under root after its step
    are set aside, so a rollback's saves are never deleted by the keep_last cleanup and the next
    `auto` continues the new branch. Temp dirs of crashed saves are removed.
    """
    runlock.lock_run_dir(run_dir)
    if resume == "none":
        chosen, aside, why = None, [p for _, p in step_dirs(root)], "train.resume=none starts the run over"
    elif resume == "auto":
        chosen, skipped = newest_verified(root, collective=True)
        for p, problems in skipped:
            env.print0(f"skipping checkpoint {p}: " + "; ".join(problems))
        if chosen is None and skipped:
            raise UsageError(f"no checkpoint under {root} verifies (each is listed above with its problems); resume from "
                             "another one with train.resume=PATH, or start over with train.resume=none (the damaged "
                             "ones are then moved aside)")
        aside, why = [p for p, _ in skipped], "they failed verification (see above)"
    else:
        chosen = resolve(resume)
        check(chosen, collective=True, what=f"train.resume={resume}: checkpoint")
        step = read_meta(chosen).step
        aside = [p for n, p in step_dirs(root)
                 if isinstance(step, int) and n > step and p.resolve() != chosen.resolve()]
        why = f"this run continues from step {step} ({chosen}), a new branch"
    if env.is_main():
        for stale in root.glob(".tmp_step_*"):  # crashed saves (the lock keeps live runs out)
            shutil.rmtree(stale, ignore_errors=True)
        if aside:
            set_aside(root, aside, why)
    env.barrier()
    return chosen


def load(engine, ckpt: Path, *, load_optimizer: bool = True, restore_rng: bool = True) -> tuple[CheckpointMeta, dict]:
    """Restore engine (and this rank's RNG) from a checkpoint dir; returns (meta, client_state).

    Every rank calls this. The checkpoint is verified first (see `verify`) unless this process
    did already (`resume=auto` / `start_run`). The RNG states are per rank: restored when the run
    has the saved number of ranks (a missing file is then an error: the run would silently draw
    other dropout masks and samples than the saved one), skipped on another world size and for
    universal checkpoints (`reshape` does not carry them over).
    """
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    check(ckpt, collective=True)
    client = ds.load_engine(engine, ckpt.parent, ckpt.name, load_optimizer=load_optimizer,
                            universal=meta.universal)
    rng_file = ckpt / f"rng_rank{env.rank()}.pt"
    if restore_rng and not meta.universal and meta.world_size == env.world_size():
        if not rng_file.is_file():  # every rank verified above; this is the last line of defence
            raise RankError(f"cannot resume from {ckpt}: {rng_file} (this rank's RNG state) is missing")
        set_rng_state(ds.safe_load(rng_file, error=RankError))  # numpy arrays allowed, nothing that runs code
    return meta, client


def read_meta(ckpt: Path) -> CheckpointMeta:
    """A checkpoint's meta.json (a UsageError naming the file when it is missing, unreadable or
    not a JSON object)."""
    meta_file = Path(ckpt) / META
    if not meta_file.is_file():
        raise UsageError(f"{ckpt} is not a complete checkpoint (no {META})")
    try:
        return CheckpointMeta.read(meta_file)
    except json.JSONDecodeError as e:
        raise UsageError(f"{meta_file} is unreadable (truncated?): {e}") from None
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{meta_file} is not a checkpoint's metadata: {e}") from None


def reshape(ckpt: str | Path, out: str | Path | None = None) -> Path:
    """Make a checkpoint resumable on any number of processes (DeepSpeed universal format).

    Writes `<step_N>_universal/` beside the checkpoint (or `out`) atomically, with meta.json
    marked `universal`; resume from it with `train.resume=<that path>`. Per-rank RNG states are
    not carried over: they belong to the old ranks. An existing non-empty output directory is
    replaced only when reshape wrote it (`not_reshape_output`), else refused before any work; the
    old one is deleted only once the new one is in place (the --out rules of stages/export.py).
    """
    from llmstack.train.outputs import staged_output

    src = resolve(ckpt)
    meta = read_meta(src)
    if meta.universal:
        raise UsageError(f"{src} is already a universal checkpoint")
    if meta.zero_stage == 0:
        raise UsageError(f"{src} was written with ZeRO stage 0: it is not partitioned, every world size can load it")
    final = Path(out) if out else src.parent / f"{src.name}_universal"
    with staged_output(final, "checkpoint reshape", inputs=[src]) as tmp:
        check(src, rng=False)
        ds.to_universal(src, tmp)
        fsync_tree(tmp)
        _write_atomic(tmp / META, meta.replace(universal=True, source=str(src), checkpoint_format=FORMAT).to_json())
        write_manifest(tmp)
    _fsync_dir(final.parent)
    # DeepSpeed's pointer beside the output, as its converter writes it (there it named the temp dir)
    _write_atomic(final.parent / "latest_universal", final.name)
    return final


def not_reshape_output(d: Path) -> str | None:
    """Why the directory d is not one `reshape` wrote (None if it is): its meta.json marks a
    universal checkpoint and its manifest lists every file in it; anything else is not ours to replace."""
    d = Path(d)
    try:
        universal = CheckpointMeta.read(d / META).universal
        listed = set(json.loads((d / MANIFEST).read_text())["files"])
    except FileNotFoundError as e:
        return f"it has no {Path(e.filename).name}"
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"its {META} or {MANIFEST} is unreadable ({e})"
    if not universal:
        return "it is not a universal checkpoint"
    for p in sorted(d.rglob("*")):
        name = p.relative_to(d).as_posix()
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            return f"it holds {name}, which is not a plain file"
        if p.is_file() and name != MANIFEST and name not in listed:
            return f"it holds {name}, which its manifest does not list"
    return None
