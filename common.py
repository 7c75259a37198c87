"""What every script shares, below all of them (imports nothing of the project): the command-line parser with
per-flag checks, the user-error style, atomic writes and folder ownership.

- `parse_config(Config, argv)`: `--key=value` for every dataclass field; unknown or abbreviated flags fail, and every
  value is checked against the rule declared next to its field with `arg(default, rule)` (or in a `RULES` table of
  the class), one line naming the flag and the allowed range.
- `UserError`: a bad input (data, flag, checkpoint). `run(main)` prints it as one `error: ...` line and exits 2; no
  traceback unless `--debug=true` is given or WORLDBOOT_DEBUG=1.
- `atomic_write(path, ...)`, `atomic_dir(path)`: write a temporary file or folder, fsync, rename over the target:
  readers see the old or the new, whatever instant the writer is killed at.
- `interruptible()`: Ctrl-C, SIGTERM or SIGHUP sets a flag that a loop checks at its next step boundary.
- `compute_dtype(flag, device_type)`: the one place that decides whether a stage computes in bf16 (autocast) or fp32;
  `autocast(dtype, device_type)` is its context manager.
- `claim_dir(path, who)`: a folder we may write into (and delete what we wrote) carries a `.worldboot` marker,
  written when worldboot created it and naming the command; a non-empty folder without one belongs to someone else
  and is refused. Claiming also takes the folder's lock (`.worldboot.lock`, one writer per folder), held until the
  process ends. docs/reliability.md says what is refused and why.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import inspect
import json
import math
import multiprocessing.util
import os
import re
import shutil
import signal
import sys
import threading
import tokenize
from contextlib import ExitStack, contextmanager

DEBUG_ENV = "WORLDBOOT_DEBUG"
MARKER = ".worldboot"  # in a folder worldboot created: the only proof that the folder (and its .old/.tmp) is ours
LOCK = ".worldboot.lock"  # in a folder being written: the writer's PID and command
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # what Ctrl-C, kill / timeout / docker stop / SLURM and a closed
# terminal send: each saves at the next step boundary (interruptible)


class UserError(ValueError):
    """An expected error of the user's input: printed as one line naming the file / item / flag, no traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Flags: one parser for every script, a rule per field


def arg(default, rule):
    """A dataclass field with its allowed values, checked by parse_config. `rule` is a tuple of choices, a range
    ">0", ">=0", "0..1" (inclusive), "0..<1" (upper bound excluded), "required" (non-empty text), "text" (valid
    Unicode, not blank), "ints" + a range (comma-separated integers, each in the range: "ints>=0", "ints1..64"), or
    a function value -> error or None."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def check_value(value, rule) -> str | None:
    """None when `value` satisfies `rule` (see arg), else what is allowed."""
    if callable(rule):
        return rule(value)
    if isinstance(rule, tuple):
        return None if value in rule else "one of " + ", ".join(map(str, rule))
    if rule in ("required", "text"):
        ok = isinstance(value, str) and value.strip() and _unicode_ok(value)
        return None if ok else "a non-empty, valid Unicode text"
    if rule.startswith("ints"):
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        ok = parts and all(p.lstrip("-").isdigit() and check_value(int(p), rule[4:]) is None for p in parts)
        each = check_value(float("nan"), rule[4:])  # NaN fails every range: its message
        return None if ok else f"comma-separated integers, each {each}"
    if rule.startswith(">="):
        return None if value >= float(rule[2:]) else f">= {rule[2:]}"
    if rule.startswith(">"):
        return None if value > float(rule[1:]) else f"> {rule[1:]}"
    lo, hi = rule.split("..")
    if hi.startswith("<"):
        return None if float(lo) <= value < float(hi[1:]) else f"in [{lo}, {hi[1:]})"
    return None if float(lo) <= value <= float(hi) else f"in [{lo}, {hi}]"


def _unicode_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates (from JSON escapes or undecodable argv bytes)
        return False


def validate(cfg) -> None:
    """Check every field of a config dataclass instance against its rule (arg(), or the class's RULES table
    {field: rule}); UserError naming the first bad flag."""
    table = getattr(cfg, "RULES", {})
    for f in dataclasses.fields(cfg):
        rule = f.metadata.get("rule", table.get(f.name))
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name}={value}: must be a finite number")
        if rule is not None and (why := check_value(value, rule)):
            raise UserError(f"--{f.name}={value!r}: must be {why}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def field_help(cls) -> dict[str, str]:
    """{field: its comment in the class source}: the text after `#` on the field's line(s) and the comment-only
    lines right below it, up to a blank line, the next field or a `# ---` section line. One source: the comment a
    reader sees beside the field is the flag's --help. Fields of base classes come from their own source."""
    out = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        names = set(klass.__dict__.get("__annotations__", {}))
        lines = inspect.getsource(klass).splitlines()
        comments = {}  # source line (0-based) -> comment text, from the tokenizer (no '#' inside strings)
        for t in tokenize.generate_tokens(iter(line + "\n" for line in lines).__next__):
            if t.type == tokenize.COMMENT:
                comments[t.start[0] - 1] = t.string.lstrip("#").strip()
        current = None
        for i, line in enumerate(lines):
            m = re.match(r"^    (\w+)\s*:", line)
            if m and m.group(1) in names:
                current = m.group(1)
                out[current] = comments.get(i, "")
            elif current and line.strip() and not line.strip().startswith("# ---") and not re.match(r"^    \w", line):
                out[current] = (out[current] + " " + comments.get(i, "")).strip()  # its comment or code goes on
            else:
                current = None
    return out


def _rule_text(rule) -> str:
    """What a rule allows, for --help ("one of a, b", ">= 1", ...); '' when it is a function."""
    if rule is None or callable(rule):
        return ""
    if isinstance(rule, tuple):
        return "one of " + ", ".join(map(str, rule))
    if rule in ("required", "text"):
        return "non-empty text"
    return "comma-separated integers " + rule[4:] if rule.startswith("ints") else rule


def parse_config(cls, argv=None, description: str = "", defaults: dict | None = None, presets: dict | None = None,
                 exclude: tuple = ()):
    """--key=value overrides for any config dataclass; --help shows each field's source comment, its allowed values
    and its default (fields whose comment starts with "internal:" are accepted but not shown); unknown, abbreviated
    and `exclude`d keys (fields this script does not use: they keep their default) fail; every value is checked
    (validate). `defaults` replaces field defaults; `presets` ({name: defaults}) lets a `preset` field choose them
    (reproduce.py)."""
    parser = _Parser(description=description, allow_abbrev=False, usage="%(prog)s [--flag=value ...]")
    helps, table = field_help(cls), getattr(cls, "RULES", {})
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        default = (defaults or {}).get(f.name, default)
        kind = {"int": int, "float": float, "str": str, "bool": _bool}.get(str(f.type), str)
        bare = dict(nargs="?", const=True) if kind is _bool else {}  # `--flag` alone = `--flag=true`
        text = helps.get(f.name, "")
        rule = f.metadata.get("rule", table.get(f.name))
        allowed = _rule_text(rule)
        given = "required" if rule == "required" and not default else f"default: {default!r}"
        shown = argparse.SUPPRESS if text.startswith("internal:") else \
            f"{text} [{'allowed: ' + allowed + '; ' if allowed else ''}{given}]".replace("%", "%%")
        parser.add_argument(f"--{f.name}", type=kind, default=default, help=shown, **bare)
    parser.add_argument("--debug", type=_bool, nargs="?", const=True, default=False,
                        help="show the traceback of an error (or WORLDBOOT_DEBUG=1)")
    args = parser.parse_args(argv)
    if presets is not None:
        if args.preset not in presets:
            parser.error(f"--preset={args.preset!r}: must be one of {', '.join(sorted(presets))}")
        parser.set_defaults(**presets[args.preset])
        args = parser.parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    cfg = cls(**{k: v for k, v in vars(args).items() if k != "debug"},
              **{k: (defaults or {})[k] for k in exclude if k in (defaults or {})})
    try:
        validate(cfg)
    except UserError as e:
        parser.error(str(e))
    return cfg


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


@contextmanager
def interruptible(enabled: bool = True):
    """A list that Ctrl-C (SIGINT), SIGTERM and SIGHUP append to, so that a loop can stop at its next step boundary
    (after saving); a second signal acts at once (its previous handler). Off when not `enabled` (train: under DDP,
    where ranks would stop at different steps) and outside the main thread; a signal whose handler is not the
    default is left alone (SIGINT ignored in the background, SIGHUP ignored under nohup, a caller's own handler)."""
    flag: list = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    defaults = (signal.default_int_handler, signal.SIG_DFL)
    sigs = [getattr(signal, n) for n in STOP_SIGNALS if hasattr(signal, n)]
    previous = {sig: signal.getsignal(sig) for sig in sigs}
    sigs = [sig for sig in sigs if previous[sig] in defaults]

    def handler(sig, frame):
        flag.append(sig)
        print(f"\n{signal.Signals(sig).name}: saving at the end of this step, then stopping (send it again to stop "
              "at once, unsaved)", file=sys.stderr, flush=True)
        signal.signal(sig, previous[sig])

    for sig in sigs:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig in sigs:
            signal.signal(sig, previous[sig])


def run(main) -> None:
    """Call a script's main(); a UserError or an OS error (missing file, full disk) becomes one line and exit 2,
    Ctrl-C one line and exit 130. With --debug=true or WORLDBOOT_DEBUG=1 the traceback is shown."""
    debug = lambda: os.environ.get(DEBUG_ENV, "") not in ("", "0")  # parse_config sets it for --debug
    try:
        main()
    except KeyboardInterrupt as e:
        if debug():
            raise
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        sys.exit(130)
    except (UserError, OSError) as e:
        if debug():
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        release_locks()  # (also at exit: this is for a main() called in-process, as the tests do)


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic: bf16 where the hardware has it, fp32 master weights and optimizer state always

DTYPES = ("auto", "float32", "bfloat16")  # the --dtype choices of every script that computes


def native_bf16_cpu() -> bool:
    """Does this CPU multiply bf16 matrices natively (AVX512-BF16 or AMX)? Without it torch emulates bf16 GEMMs in
    fp32 and autocast only adds casts. On the 2-core AMD EPYC (avx512_bf16) bf16 matrix products at the tiny model's
    shapes ran 2.1-2.5x faster than fp32 (issue 14; bench.py --dtype_rows)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no detection, fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(flag: str, device_type: str) -> str:
    """"bfloat16" or "float32": what a stage computes in. "auto" = bf16 on CUDA and on CPUs with native bf16, else
    fp32; "float32" / "bfloat16" force it. Weights, gradients and optimizer state stay fp32 either way (autocast
    casts the inputs of matrix products only)."""
    if flag not in DTYPES:
        raise UserError(f"--dtype={flag!r}: must be one of {', '.join(DTYPES)}")
    if flag != "auto":
        return flag
    return "bfloat16" if device_type == "cuda" or native_bf16_cpu() else "float32"


class autocast:
    """A reusable context: torch.autocast to bf16 when `dtype` (a compute_dtype result) is "bfloat16", else nothing.
    (Attention under it on a CPU: model.causal_attention.)"""

    def __init__(self, dtype: str, device_type: str):
        self.dtype, self.device_type, self.stacks = dtype, device_type, []

    def __enter__(self):
        import torch

        stack = ExitStack()
        if self.dtype == "bfloat16":
            stack.enter_context(torch.autocast(self.device_type, dtype=torch.bfloat16))
        self.stacks.append(stack)
        return self

    def __exit__(self, *exc):
        return self.stacks.pop().__exit__(*exc)


# ----------------------------------------------------------------------------------------------------------------
# Files: atomic writes, JSON with the path in every error, folder ownership


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in `path` durable (POSIX: the directory entry is data of the folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, data) -> None:
    """Replace `path` by `data` (str, bytes, or a function that writes a given path) atomically and durably. The
    temporary file's name carries our name and PID, so it never replaces a file of the user's (`<path>.tmp`)."""
    path = os.fspath(path)
    tmp = f"{path}.worldboot-{os.getpid()}.tmp"
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "w" if isinstance(data, str) else "wb") as f:
                f.write(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):  # ours: a full disk gets its space back
            os.remove(tmp)
        raise _named(e, path) from None
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def append_line(path, line: str) -> None:
    """Append one line to a log file (metrics.jsonl); an error (a full disk) names the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise _named(e, path) from None


def _named(e: OSError, path) -> OSError:
    """An OSError that names a file ("No space left on device" names none by itself)."""
    path = os.fspath(path)
    if e.filename or path in str(e):
        return e
    return OSError(e.errno, f"{e.strerror}: {path}") if e.errno else OSError(f"{e}: {path}")


def is_ours(path) -> bool:
    """A folder that worldboot created: it holds our marker."""
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def _marker_text(who: str) -> str:
    """What the marker says: which part of worldboot created the folder, and the command line."""
    return f"written by worldboot ({who}): {' '.join(sys.argv)}\n"


def _mark(path, who: str) -> None:
    """Write the marker into a folder that worldboot has just created (naming the command that created it)."""
    with open(os.path.join(path, MARKER), "w") as f:
        f.write(_marker_text(who))


@contextmanager
def atomic_dir(path, who: str = "checkpoint"):
    """Write a folder atomically: yields an empty `<path>.tmp` (marked as ours) to write into; when the block ends,
    its files are fsynced and it replaces `path` (`path` -> `<path>.old`, `<path>.tmp` -> `path`, delete
    `<path>.old`). The previous folder stays until the new one is complete; a kill between the two renames is undone
    by recover_dir at the next write. A `<path>.old` or `<path>.tmp` without our marker is the user's: refused."""
    path = os.path.normpath(os.fspath(path))
    tmp, old = path + ".tmp", path + ".old"
    recover_dir(path)
    for other in (tmp, old):
        if os.path.lexists(other):
            raise UserError(f"{other} exists and was not written by worldboot (no {MARKER} marker): not replacing "
                            f"it; move it away to write {path}")
    os.makedirs(tmp)
    _mark(tmp, who)  # before anything else: a kill from here on leaves a .tmp that is provably ours
    try:
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, unfinished; the previous folder is untouched
        raise _named(e, tmp) from None
    if os.path.exists(path):
        if not is_ours(path):  # a checkpoint written before folders were marked: the caller chose to replace it
            _mark(path, who)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path) -> bool:
    """For a writer only (atomic_dir): undo an atomic_dir swap killed between its two renames (`<path>.old` is then
    complete, `path` missing) and delete what a killed write left behind. Only folders carrying our marker are
    renamed or deleted (and an empty `.tmp`: killed before its marker); a reader never calls this. True when
    `path` exists."""
    path = os.path.normpath(os.fspath(path))
    old, tmp = path + ".old", path + ".tmp"
    if not os.path.exists(path) and is_ours(old):
        os.rename(old, path)
    if is_ours(tmp):  # an unfinished write
        shutil.rmtree(tmp)
    elif os.path.isdir(tmp) and not os.listdir(tmp):
        os.rmdir(tmp)  # killed before its marker: empty, nothing of anyone's is lost
    if os.path.isdir(path) and is_ours(old):  # superseded by `path`
        shutil.rmtree(old)
    return os.path.isdir(path)


def read_json(path, what: str = "JSON"):
    """json.load with the file named in every error (missing, unreadable, not UTF-8, malformed)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed {what} at line {e.lineno}, column {e.colno}: {e.msg}") from None


def read_tensors(path) -> dict:
    """safetensors.torch.load_file with the file named in every error (missing, truncated, not safetensors)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise UserError(f"{path}: cannot read tensors ({e})") from None


class CheckpointError(UserError):
    """A checkpoint that does not fit the model: lists every missing / unexpected / mis-shaped key at once."""


def safetensors_files(path, prefix: str = "") -> tuple[list[str], str]:
    """The safetensors files of an HF-layout folder that hold keys starting with `prefix`: the shards listed in
    model.safetensors.index.json, or model.safetensors. Returns (file names in `path`, a description for errors)."""
    index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        weight_map = read_json(index, "shard index")["weight_map"]  # key -> shard file name
        files = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
        return files, f"{index} (shards {', '.join(files)})"
    if os.path.isfile(single):
        return ["model.safetensors"], single
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json exists")


def check_keys(expected: dict, found: dict, path, strict: bool = True):
    """Compare a model's {key: shape} with a checkpoint's {key: (file, shape)}; raise one CheckpointError listing
    every missing, unexpected (when strict) and mis-shaped key, so a bad checkpoint is diagnosed in one read."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected)) if strict else []
    mismatched = sorted(k for k in set(expected) & set(found) if expected[k] != found[k][1])
    if not (missing or unexpected or mismatched):
        return
    lines = [f"checkpoint {path} does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}):")
        lines += [f"    {k}  expected shape {list(expected[k])}" for k in missing]
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}):")
        lines += [f"    {k}  found shape {list(found[k][1])} in {found[k][0]}" for k in unexpected]
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        lines += [f"    {k}  expected {list(expected[k])}, found {list(found[k][1])} in {found[k][0]}"
                  for k in mismatched]
    raise CheckpointError("\n".join(lines))


def refuse_overwrite(path, force: bool, suffixes: tuple = ()) -> None:
    """Check a single output file up front (not a folder, so it carries no marker): one that exists is replaced only
    with --force=true (nothing tells whether worldboot wrote it); its folder must exist; `suffixes` are the file
    types the writer can make (e.g. a PNG grid)."""
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise UserError(f"{path} exists: not overwriting it (--force=true replaces it, or choose another --out)")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: --out names a file")
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        raise UserError(f"--out={path}: must end with {' or '.join(suffixes)} (the file type written)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"--out={path}: the folder {parent} does not exist")


def check_dir(path, force: bool | None = None, lock: bool = True) -> None:
    """What claim_dir refuses, checked without writing anything (a script calls it before its long work): a folder
    that is not ours, a path that is not a folder, a folder another live run holds the lock of."""
    path = os.fspath(path)
    if os.path.isdir(path) and not is_ours(path):
        there = [e for e in os.listdir(path) if not (e.startswith(MARKER) and e.endswith(".tmp"))]  # (a claim
        # killed half-way)
        if there and not force:
            how = "--force=true writes into it anyway, or choose" if force is not None else "choose"
            raise UserError(f"{path} exists and was not written by worldboot (no {MARKER} marker): not writing into "
                            f"it or deleting anything there ({how} another folder)")
    elif os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path} exists and is not a folder")
    pid, job, holder = _lock_pid(os.path.join(path, LOCK)) if lock else (None, None, None)
    if pid is not None and pid not in (os.getpid(), _job()) and _alive(pid) and not (job and job == _job()):
        raise UserError(f"{path} is being written by another run (PID {pid}: {holder}): one writer per folder; wait "
                        "for it, stop it, or choose another folder")


def claim_dir(path, who: str, force: bool | None = None, lock: bool = True) -> None:
    """Make `path` a folder that `who` may write into, and take its lock (lock_dir). A folder that exists and is not
    empty must carry our marker, written when worldboot created it; otherwise UserError, and nothing is written or
    deleted, unless `force` (the script's --force=true; None: it has none) claims it anyway. No file name makes a
    folder ours: a cache made before the marker existed is refused like any other folder. `lock` False: a folder
    that several runs share, each writing only into a sub-folder it claims itself (reproduce.py --replicate)."""
    check_dir(path, force, lock)
    os.makedirs(path, exist_ok=True)
    if not is_ours(path):
        atomic_write(os.path.join(path, MARKER), _marker_text(who))  # (atomic: jobs may claim one folder at once)
    if lock:
        lock_dir(path, who)


# One writer per folder: a lock file made with O_EXCL holds the writer's PID; a lock whose process is gone (killed)
# is stale, named and taken over. Held until the process ends (or common.run's main returns).
_HELD: dict = {}  # lock file -> our PID


def lock_dir(path, who: str) -> None:
    lock = os.path.join(os.path.abspath(os.fspath(path)), LOCK)
    holder = _lock_pid(lock)[0]
    if holder == os.getpid() and _HELD.get(lock) == os.getpid() or holder == _job():
        return  # this process holds it already (reproduce.py, then train.py, on the same folder), or its launcher
    for _ in range(3):  # a stale lock taken over, then retried
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            check_dir(path)  # a live holder: refused
            pid = _lock_pid(lock)[0]
            print(f"warning: {lock}: stale lock of PID {pid} (no longer running), taken over", file=sys.stderr)
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {_job()} {who}: {' '.join(sys.argv)}\n")
        _HELD[lock] = os.getpid()
        return
    raise UserError(f"{lock}: cannot take the lock (another run keeps taking it)")


def _lock_pid(lock) -> tuple:
    """(PID, job, command) of a lock's holder; (None, 0, "") when there is none."""
    try:
        with open(lock) as f:
            pid, job, holder = f.read().split(" ", 2)
        return int(pid), int(job), holder.strip()
    except (OSError, ValueError):  # gone, or half-written by a writer killed at that instant
        return None, 0, ""


def _job() -> int:
    """The ranks of one torchrun job are one writer (rank 0 writes, the others read its folder): they share the
    launching agent, their parent process, which may hold the lock itself (ranks.launch). 0 outside torchrun."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def release_locks() -> None:
    """Remove the locks this process holds (a lock inherited through fork() is the parent's: left alone). Called when
    common.run's main returns, at exit, and at the end of a multiprocessing worker (reproduce.py's pools), whose
    exit skips atexit."""
    for lock, pid in list(_HELD.items()):
        if pid == os.getpid() and _lock_pid(lock)[0] == pid:
            try:
                os.remove(lock)
            except OSError:
                pass
        _HELD.pop(lock, None)


atexit.register(release_locks)
multiprocessing.util.Finalize(None, release_locks, exitpriority=0)
