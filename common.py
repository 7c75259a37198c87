"""What every script shares, below all of them (imports nothing of the project): the command-line parser with
per-flag checks, the user-error style, atomic writes and folder ownership.

- `parse_config(Config, argv)`: `--key=value` for every dataclass field; unknown or abbreviated flags fail, and every
  value is checked against the rule declared next to its field with `arg(default, rule)` (or in a `RULES` table of
  the class), one line naming the flag and the allowed range.
- `UserError`: a bad input (data, flag, checkpoint). `run(main)` prints it as one `error: ...` line and exits 2; no
  traceback unless `--debug=true` is given or WORLDBOOT_DEBUG=1.
- `atomic_write(path, ...)`, `atomic_dir(path)`: write a temporary file or folder, fsync, rename over the target:
  readers see the old or the new, whatever instant the writer is killed at.
- `interruptible()`: Ctrl-C sets a flag that a loop checks at its next step boundary.
- `compute_dtype(flag, device_type)`: the one place that decides whether a stage computes in bf16 (autocast) or fp32;
  `autocast(dtype, device_type)` is its context manager.
- `claim_dir(path, who)`: a folder we may write into (and delete what we wrote) carries a `.worldboot` marker;
  a non-empty folder without one belongs to someone else and is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import tokenize
from contextlib import ExitStack, contextmanager

DEBUG_ENV = "WORLDBOOT_DEBUG"
MARKER = ".worldboot"


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
    """A list that Ctrl-C (SIGINT) appends to, so that a loop can stop at its next step boundary (after saving); a
    second Ctrl-C interrupts at once. Off when not `enabled` (train: under DDP, where ranks would stop at different
    steps), outside the main thread, and where SIGINT is not at its default (e.g. ignored in the background)."""
    flag: list = []
    if (not enabled or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield flag
        return

    def handler(sig, frame):
        flag.append(sig)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


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
    """Replace `path` by `data` (str, bytes, or a function that writes a given path) atomically and durably."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    if callable(data):
        data(tmp)
    else:
        with open(tmp, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextmanager
def atomic_dir(path):
    """Write a folder atomically: yields an empty `<path>.tmp` to write into; when the block ends, its files are
    fsynced and it replaces `path` (`path` -> `<path>.old`, `<path>.tmp` -> `path`, delete `<path>.old`). The previous
    folder stays until the new one is complete; a kill between the two renames is undone by recover_dir."""
    path = os.path.normpath(os.fspath(path))
    tmp, old = path + ".tmp", path + ".old"
    recover_dir(path)
    shutil.rmtree(tmp, ignore_errors=True)  # of a write that was interrupted
    os.makedirs(tmp)
    yield tmp
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb+") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path) -> bool:
    """Undo an atomic_dir swap killed between its two renames (`<path>.old` is then complete, `path` missing) and
    delete what a killed write left behind. True when `path` exists."""
    path = os.path.normpath(os.fspath(path))
    old = path + ".old"
    if not os.path.exists(path) and os.path.isdir(old):
        try:
            os.rename(old, path)
        except FileNotFoundError:  # another process (a DDP rank) was first
            pass
    if os.path.isdir(path):
        for leftover in (old, path + ".tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        return True
    return False


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


def refuse_overwrite(path, force: bool) -> None:
    """A single output file (not a folder, so it carries no marker) that exists is replaced only with --force=true:
    nothing tells whether worldboot wrote it."""
    if os.path.exists(path) and not force:
        raise UserError(f"{path} exists: not overwriting it (--force=true replaces it, or choose another --out)")


def claim_dir(path, who: str, ours: tuple = ()) -> None:
    """Make `path` a folder that `who` may write into. A folder that exists and is not empty must carry our
    `.worldboot` marker (or one of the files named in `ours`, which only worldboot writes: folders written before
    the marker existed); otherwise UserError, and nothing is written or deleted."""
    path = os.fspath(path)
    marker = os.path.join(path, MARKER)
    if os.path.isdir(path) and not os.path.exists(marker):
        there = [e for e in os.listdir(path) if e != MARKER + ".tmp"]  # (a claim that was killed half-way)
        foreign = there and not any(os.path.exists(os.path.join(path, p)) for p in ours)
        if foreign:
            raise UserError(f"{path} exists and was not written by worldboot (no {MARKER} marker): not writing into "
                            "it or deleting anything there; choose another folder")
    elif os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path} exists and is not a folder")
    os.makedirs(path, exist_ok=True)
    if not os.path.exists(marker):
        atomic_write(marker, f"written by worldboot ({who})\n")
