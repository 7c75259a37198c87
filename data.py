"""Data plumbing: Aurora-Bench / AURORA JSON files, image loading, and unlabelled frame pairs from videos.

Benchmark files (paper Sec. 5, Aurora-Bench from McGill-NLP/AURORA): a JSON list of dicts (JSON lines also accepted)
with `input` (source image path), `instruction` (AURORA's training files) or `prompt` (the released Aurora-Bench
test.json says `prompt`), `task` (subset name), and `output` (target image) only where a ground truth exists -- items
without it are kept for generation but flagged not scorable. Other fields (`mask`, `pos`, `neg`, `type`, our world's
`src_scene`/`action`, ...) are kept in `Item.extra`.

Image paths are relative. AURORA writes them from the repository root (`data/something/images/<id>/first.jpg`) while
the JSON files sit either at that root (test.json) or deeper (data/magicbrush/train.json). So the image root is, unless
given: the JSON's folder if the first item's input exists there, else the nearest parent folder where it exists, else
the JSON's folder (and the missing images are reported per item).

Video pairs (paper Sec. 3.2 / Algorithm 1): the paper picks key frames by optical-flow magnitude, the top K_f = 6 with
a minimum spacing of I_f = 20 frames. Our stand-in for flow magnitude is the mean absolute pixel difference between a
frame and the previous one (a synthetic video has no camera motion, so any pixel change is object motion). Each key
frame i gives the pair (frame i-1, frame i): the frame just before the change and the frame just after it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class Item:
    id: str  # the item's `id`, else "<task>-<index>"
    input_path: Path  # absolute path of the source image
    instruction: str  # the action text (`instruction` or `prompt` in the JSON)
    output_path: Path | None  # absolute path of the target image; None = not scorable (generation only)
    task: str  # subset name (Aurora-Bench: magicbrush, ag, something, ...; our world: world, world_comp)
    extra: dict = field(default_factory=dict)  # every other field of the JSON item, unchanged

    @property
    def scorable(self) -> bool:
        return self.output_path is not None


class BenchmarkError(UserError):
    pass


MAX_DATA_BYTES = 2**30  # a data JSON larger than this is refused before it is read (not a device or a pipe either)
MAX_ASPECT = 64  # images more elongated are refused: resizing the short side to 512 px would make the long side
# (a 1 x 1,000,000 PNG: 512,000,000 pixels) exhaust memory


def read_records(path) -> list:
    """A JSON list (or a single JSON object per line); errors name the file and line."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise BenchmarkError(f"{path}: not a regular file (a folder, device or pipe): expected a JSON data file")
    if path.is_file() and path.stat().st_size > MAX_DATA_BYTES:
        raise BenchmarkError(f"{path}: {path.stat().st_size / 2**30:.1f} GiB, more than the "
                             f"{MAX_DATA_BYTES / 2**30:.0f} GiB a data file may have")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BenchmarkError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}:{e.lineno}: malformed JSON at line {e.lineno}, column {e.colno}: "
                                 f"{e.msg}") from e
        if not isinstance(recs, list):
            raise BenchmarkError(f"{path}: expected a JSON list of items, got {type(recs).__name__}")
        return recs
    recs = []
    for lineno, line in enumerate(text.splitlines(), 1):  # JSON lines
        if line.strip():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{lineno}: malformed JSON at line {lineno}: {e.msg}") from e
    if len(recs) == 1 and isinstance(recs[0], dict) and "input" not in recs[0] and "image" not in recs[0]:
        raise BenchmarkError(f"{path}: expected a JSON list of items (or one item per line), got an object with "
                             f"keys {', '.join(map(str, list(recs[0])[:5]))}")
    return recs


def _image_root(json_path: Path, rel) -> Path | None:
    """The nearest folder (the JSON's, then its parents) where the relative path `rel` exists, else None."""
    here = json_path.parent
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        return here
    return next((root for root in (here, *here.parents) if (root / rel).exists()), None)


def _check_image(path: Path, verify: bool) -> str | None:
    if not path.is_file():
        return f"missing image file '{path}'"
    if verify:
        try:
            with Image.open(path) as im:  # the header, plus PNG chunk checksums: cheap
                im.verify()
        except Exception as e:  # PIL raises several types for corrupt files
            return f"unreadable image file '{path}' ({type(e).__name__})"
    return None


def load_benchmark(json_path, image_root=None, strict: bool = False, verify_images: bool = True,
                   log=None) -> list[Item]:
    """Read an Aurora-Bench / AURORA JSON file into Items, with paths resolved against image_root (see the module
    docstring for the default). Invalid items (not a dict, no `input`, no/empty instruction, missing or unreadable
    image) raise BenchmarkError when strict, else are skipped with one warning line (to `log`, default stderr)
    naming each item's index, id and the field or file."""
    json_path = Path(json_path)
    recs = read_records(json_path)
    first = next((r["input"] for r in recs if isinstance(r, dict) and isinstance(r.get("input"), str)), None)
    root = Path(image_root) if image_root is not None else (_image_root(json_path, first) or json_path.parent)
    items, problems = [], []
    for i, r in enumerate(recs):
        where = f"item {i}"
        if not isinstance(r, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        task = str(r.get("task", ""))
        iid = str(r["id"]) if r.get("id") is not None else f"{task or 'item'}-{i}"
        where = f"item {i} (id {iid})"
        instr = r.get("instruction", r.get("prompt"))
        if "input" not in r or not isinstance(r["input"], str) or not r["input"]:
            problems.append(f"{where}: missing field 'input'")
            continue
        if instr is None:
            problems.append(f"{where}: missing field 'instruction' (or 'prompt')")
            continue
        if not isinstance(instr, str) or not instr.strip():
            problems.append(f"{where}: empty instruction")
            continue
        try:
            instr.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"{where}: the instruction is not valid Unicode (a lone surrogate escape)")
            continue
        if "output" in r and r["output"] is not None and not (isinstance(r["output"], str) and r["output"]):
            problems.append(f"{where}: field 'output' must be an image path, got {r['output']!r}")
            continue
        if image_root is None and (mine := _image_root(json_path, r["input"])) not in (None, root):
            problems.append(f"{where}: its image is found under {mine}, the first item's under {root}: "
                            "ambiguous image root (pass image_root)")
            continue
        # absolute, normalised paths: one image has one name, whichever JSON file points at it
        inp = Path(os.path.abspath(root / r["input"]))
        out = Path(os.path.abspath(root / r["output"])) if isinstance(r.get("output"), str) and r["output"] else None
        bad = _check_image(inp, verify_images) or (_check_image(out, verify_images) if out is not None else None)
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        extra = {k: v for k, v in r.items() if k not in ("id", "input", "output", "instruction", "prompt", "task")}
        items.append(Item(iid, inp, instr.strip(), out, task, extra))
    if problems:
        msg = f"{json_path}: {len(problems)} of {len(recs)} items invalid: " + "; ".join(problems)
        if strict:
            raise BenchmarkError(msg)
        print("warning: skipped " + msg, file=log or sys.stderr)
    return items


def write_benchmark(items: list[Item], json_path, image_root=None) -> None:
    """Write Items as an Aurora-Bench JSON list; image paths relative to image_root (default: the JSON's folder),
    so load_benchmark(json_path) reads the same Items back."""
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), root.resolve())).as_posix()
    recs = []
    for it in items:
        d = dict(id=it.id, input=rel(it.input_path), instruction=it.instruction, task=it.task)
        if it.output_path is not None:
            d["output"] = rel(it.output_path)
        recs.append({**d, **it.extra})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(recs, indent=1))


def load_captions(path: str):
    """Image-caption pairs ([{"image", "caption"}], paths relative to the file) as Items with the caption as text."""
    root = os.path.dirname(os.path.abspath(path))
    items = []
    for i, r in enumerate(read_records(path)):
        if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not str(r.get("caption", "")).strip():
            raise UserError(f"{path}: item {i} needs non-empty 'image' and 'caption' fields")
        items.append(Item(id=r.get("id", f"cap-{i}"), input_path=os.path.join(root, r["image"]),
                          instruction=r["caption"], output_path=None, task="caption"))
    return items


def load_items(paths: str):
    """Items of one or more Aurora-Bench-style JSON files (comma-separated)."""
    items = []
    for p in [p for p in paths.split(",") if p]:
        items.extend(load_benchmark(p))
    if not items:
        raise UserError(f"{paths}: no valid items")
    return items


# -----------------------------------------------------------------------------
# images


def open_image(path_or_pil) -> Image.Image:
    """The one image loader of worldboot (load_image and preprocess_image use it): errors name the file."""
    if isinstance(path_or_pil, Image.Image):
        return path_or_pil
    path = str(path_or_pil)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            if max(im.size) > MAX_ASPECT * max(1, min(im.size)):  # from the header, before decoding
                raise UserError(f"{path}: {im.size[0]} x {im.size[1]} pixels, more elongated than {MAX_ASPECT}:1")
            im.load()  # decode now, so a truncated/corrupt file fails here with its name
            return im.copy()  # detached from the file handle
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image file {path}: {e}") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white (as HF's convert_to_rgb and Meta's
    _whiten_transparency do), so a transparent background does not turn black. 16-bit greyscale (PNG) is scaled
    to 8 bits (PIL's convert clips it, which turns almost every pixel white)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8), "L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def load_image(path, size: int | None = None) -> Image.Image:
    """Open an image as RGB (transparency composited onto white, as HF's Chameleon processor does); with `size`,
    resized and centre-cropped to size x size as preprocess_image does. Errors name the file."""
    img = to_rgb(open_image(path))
    return img if size is None else resize_crop(img, size)


# HF's ChameleonImageProcessor: rescale by 0.0078 then normalise with mean 1, std 1, i.e. x * 0.0078 - 1. So pixel 0
# -> -1 and pixel 255 -> 0.989 (not exactly 1: 0.0078 approximates 2/255 = 0.007843). Meta's reference tokenizer uses
# x / 255 * 2 - 1 instead; the difference is < 0.011 and we follow HF, which is what the HF-converted models saw in
# the parity tests of this repo. Resize: shortest side -> size with LANCZOS, long side int(size * long / short) (HF
# truncates; Meta rounds), then a centre crop with offsets (side - size) // 2.
HF_RESCALE = 0.0078


def resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Shortest side -> size (LANCZOS), then the centre size x size crop, as HF's ChameleonImageProcessor."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return img.crop((left, top, left + size, top + size))


def pad_square(img: Image.Image, colour: tuple) -> Image.Image:
    """Liquid's preprocessing before the resize: pad the short side to a square of `colour`, the image centred (the
    offset (long - short) // 2, as LLaVA's expand2square that Liquid uses)."""
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h),) * 2, colour)
    out.paste(img, ((h - w) // 2 if h > w else 0, (w - h) // 2 if w > h else 0))
    return out


def preprocess_image(path_or_pil, size: int = 512, pad=None) -> torch.Tensor:
    """Image file path or PIL image -> (3, size, size) float32 in [-1, 1), as HF's ChameleonImageProcessor; with
    `pad` (an RGB colour: Liquid) padded to a square first, so nothing is cropped."""
    img = to_rgb(open_image(path_or_pil))
    img = resize_crop(img if pad is None else pad_square(img, pad), size)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, size, size) in [0, 255]
    return x * HF_RESCALE - 1.0


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image: clamp, (x + 1) / 2 * 255, truncated to uint8 (Meta's reference)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2 * 255).permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(x.numpy().astype(np.uint8), "RGB")


# -----------------------------------------------------------------------------
# video pairs


@dataclass
class VideoPair:
    video: str  # the video's folder name
    src_index: int  # frame index of the source (the frame just before the change)
    tgt_index: int  # frame index of the key frame (src_index + 1)
    src_path: Path
    tgt_path: Path
    diff: float  # mean absolute pixel difference between the two, in [0, 1]


def list_frames(video_dir) -> list[Path]:
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise FileNotFoundError(f"video folder not found: '{video_dir}'")
    return sorted(p for p in video_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def frame_diffs(frames: list[Path], size: int | None = None) -> np.ndarray:
    """(n,) mean |frame_i - frame_{i-1}| in [0,1]; entry 0 is 0. Errors name the unreadable or mis-sized frame."""
    diffs, prev = np.zeros(len(frames), np.float64), None
    for i, f in enumerate(frames):
        x = np.asarray(load_image(f, size), np.float32) / 255.0  # (H, W, 3)
        if prev is not None:
            if x.shape != prev.shape:
                raise ValueError(f"frame '{f}' has shape {x.shape}, the previous frame {prev.shape}")
            diffs[i] = float(np.abs(x - prev).mean())
        prev = x
    return diffs


def select_keyframes(diffs, k: int = 6, spacing: int = 20, min_diff: float = 1e-3) -> list[int]:
    """Greedy top-k: frames by decreasing difference (ties: earlier first), a frame is kept if it changed
    (diff > min_diff) and is at least `spacing` frames from every frame kept so far. Returned in frame order."""
    order = sorted((i for i in range(1, len(diffs)) if diffs[i] > min_diff), key=lambda i: (-diffs[i], i))
    kept: list[int] = []
    for i in order:
        if len(kept) == k:
            break
        if all(abs(i - j) >= spacing for j in kept):
            kept.append(i)
    return sorted(kept)


def video_pairs(video_dir, k: int = 6, spacing: int = 20, min_diff: float = 1e-3,
                size: int | None = None) -> list[VideoPair]:
    """Unlabelled (frame before the change, key frame) pairs from one folder of frames (sorted by name).
    Defaults are the paper's K_f = 6, I_f = 20 (30 fps video); our 9-frame synthetic videos want spacing ~1
    (world.WorldConfig.video_k / video_spacing, stored in the data's manifest.json)."""
    frames = list_frames(video_dir)
    diffs = frame_diffs(frames, size)
    name = Path(video_dir).name
    return [VideoPair(name, i - 1, i, frames[i - 1], frames[i], float(diffs[i]))
            for i in select_keyframes(diffs, k, spacing, min_diff)]


def all_video_pairs(videos_root, **kw) -> list[VideoPair]:
    """video_pairs over every sub-folder of videos_root (sorted), e.g. out/data/videos."""
    root = Path(videos_root)
    return [p for d in sorted(x for x in root.iterdir() if x.is_dir()) for p in video_pairs(d, **kw)]
