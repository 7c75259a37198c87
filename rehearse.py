"""
The full-scale rehearsal and the GPU check: harness, not method (the paper's Sec. 3-4 at the scale of its App. H).

(default)    the README's full-scale commands, read out of README.md (the ```bash block under the "<!-- full-scale:"
    line), run end to end on a CPU once with MODEL=anole and once with MODEL=liquid, each against a checkpoint of
    that shape built with transformers (real widths, heads, vocabulary and 512 px VQ; 1 layer, random weights), with
    each stage's peak RSS and seconds per step, and training-step memory probes over depth and sequence length.
    JSON -> --out (default <dir>/rehearsal.json). The folder --dir is claimed (common.claim_dir): a rerun deletes
    only what a rehearsal wrote there (its runs/), and a folder that worldboot did not write is refused.
--gpu_check  one time-limited command for a GPU machine: (a) ours vs transformers in bf16 (bench.py: train step tok/s
    and MFU, decode tok/s at batch 1 and 8, best-of-8 cost), (b) the 7B preset's decode with random weights,
    (c) a short reproduce.py --preset=gpu. Each part in its own subprocess and time limit. JSON -> --out.

Usage:
  python rehearse.py --models=anole --threads=2   # Anole: ~45 min on 2 busy cores, 8.8 GB RAM
  python rehearse.py --threads=2                  # Anole and Liquid (Liquid at this size: not run yet)
  python rehearse.py --size=small --threads=1     # both layouts in miniature, ~2 min (the slow test)
  python rehearse.py --gpu_check --device=cuda --dtype=bfloat16 --out=out/gpu_check.json   # < 8 min on one H100
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import train
import world
from bench import _cpu_name, _proc_kb, peak_mib
from common import UserError, arg, atomic_write, claim_dir, parse_config, read_json, run
from data import Item, write_benchmark
from model import Chameleon, ChameleonConfig, apply_lora
from tokenizer import ImageTokenizer, TextTokenizer, VQConfig, hf_to_ours
from train import TrainConfig, sequence_nll
from train_dynamics import DM_PROMPT
from train_world import WM_PROMPT

# size -> HF ChameleonConfig widths, VQConfig.chameleon() overrides and the image side. "full" is Anole-7B in all but
# depth (4096 wide, 32 heads, 11,008 SwiGLU, 65,536 ids, 512 px -> 1,024 codes of 8,192); "small" keeps its id
# layout and a vocabulary large enough for train.sequence_nll's loss-positions path, at CI size.
REHEARSAL_SIZES = {
    "full": dict(hidden_size=4096, num_attention_heads=32, intermediate_size=11008, vocab_size=65536, vq={},
                 image_size=512),
    "small": dict(hidden_size=128, num_attention_heads=4, intermediate_size=352, vocab_size=16384,
                  vq=dict(resolution=64, base_channels=32, embed_dim=32, latent_channels=64), image_size=64),
}
# size -> build_liquid's widths. "full" is Liquid_V1_7B (google/gemma-7b) in all but depth (28 layers): 3072 wide,
# 16 heads of 256 (q_proj 3072 -> 4096) with 16 KV heads, GeGLU 24,576, Gemma's 256,000 text ids + 8,192 image ids;
# "small" is the same layout at CI size, with head_dim apart from hidden / heads and one KV head (MQA).
LIQUID_SIZES = {
    "full": dict(hidden=3072, heads=16, kv_heads=16, head_dim=256, inner=24576, n_text=256000),
    "small": dict(hidden=128, heads=4, kv_heads=1, head_dim=48, inner=352, n_text=8192),
}
FAMILIES = ("anole", "liquid")
GPU_PARTS = ("a", "b", "c")
REHEARSAL_STAGES = ("build", "convert", "dm", "bootstrap", "wm", "search", "eval", "probes")


def _scaling_ok(v: str):
    for spec in [x for x in v.split(",") if x]:
        f = spec.split(":")
        vq = len(f) == 2 and f[0] == "vq" and f[1].isdigit()
        if not vq and (len(f) not in (3, 4) or f[0] not in ("dm", "wm") or not (f[1].isdigit() and f[2].isdigit())
                       or f[3:] not in ([], ["full"])):
            return f"entries task:layers:tokens[:full] (task dm or wm) or vq:images, not {spec!r}"
    return None


@dataclass
class RehearseConfig:
    dir: str = "out/rehearsal"  # the rehearsal's working folder (checkpoints, data, runs); claimed with a marker
    models: str = arg("anole,liquid", lambda v: None if v and set(v.split(",")) <= set(FAMILIES) else
                      f"a comma-separated subset of {FAMILIES}")  # the base models rehearsed, each in <dir>/<name>
    size: str = arg("full", tuple(sorted(REHEARSAL_SIZES)))  # full: the real widths, heads, vocabulary and VQ
    # (512 px) of Anole-7B and Liquid_V1_7B; small: the same layouts in miniature
    layers: int = arg(1, ">=1")  # transformer layers of the built checkpoint
    steps: int = arg(3, ">=1")  # optimizer steps of the DM and WM fine-tuning
    scaling: str = arg("dm:1:2100,dm:2:2100,dm:4:2100,dm:1:1050,dm:1:2100:full,wm:1:2100,wm:1:2100:full,vq:4",
                       _scaling_ok)  # memory probes: a training step task:layers:tokens[:full] (full = logits at
    # every position) or VQ encode + decode of a batch, vq:images ('' = none)
    from_stage: str = arg("", ("", *REHEARSAL_STAGES))  # continue a rehearsal at this stage (of every model),
    # keeping the earlier stages' files and numbers
    threads: int = arg(torch.get_num_threads(), ">=1")  # torch threads of every stage
    seed: int = arg(0, ">=0")  # random weights and data
    out: str = ""  # results JSON (default: <dir>/rehearsal.json; --gpu_check: out/gpu_check.json)
    # --- GPU check (one command; each part in its own time-limited subprocess)
    gpu_check: bool = False  # run the GPU check instead of the rehearsal
    device: str = "cuda"  # --gpu_check: where parts a-c run (cpu: a dry run with --quick)
    dtype: str = "bfloat16"  # --gpu_check: float32 or bfloat16
    quick: bool = False  # --gpu_check: micro sizes that take seconds (a CPU dry run)
    peak_flops: float = arg(989e12, ">0")  # --gpu_check: accelerator peak FLOP/s for MFU
    gpu_parts: str = arg("a,b,c", lambda v: None if set(v.split(",")) <= set(GPU_PARTS) else f"a subset of {GPU_PARTS}")
    # a: ours vs HF (bf16 train step, MFU, decode, best-of-8); b: 7B preset decode; c: a short reproduce.py --preset=gpu
    part_limits: str = arg("170,100,180", lambda v: None if len(v.split(",")) == len(GPU_PARTS) else
                           f"{len(GPU_PARTS)} comma-separated seconds, one per part")  # seconds allowed to parts a-c
    build: bool = False  # internal: the build stage (a subprocess of the rehearsal)
    probe: str = ""  # internal: one scaling probe (a subprocess of the rehearsal)


def parse_args(argv=None) -> RehearseConfig:
    return parse_config(RehearseConfig, argv, description=__doc__.split("\n\n")[0].strip())



# -----------------------------------------------------------------------------------------------------------------
# rehearsal: the README's full-scale commands, read out of README.md and run as written but for step counts, data
# size and one process instead of torchrun's eight, against an Anole- and a Liquid-shaped checkpoint with random
# weights and fewer layers, on a CPU. Each stage is a subprocess; its peak RSS comes from os.wait4 (the child's own
# ru_maxrss), its seconds per step from the run's metrics.jsonl.

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
BLOCK_MARKER = "<!-- full-scale:"  # the comment line above the README's ```bash block of full-scale commands
STAGE_OF = {"tokenizer.py": "convert", "train_dynamics.py": "dm", "bootstrap.py": "bootstrap", "train_world.py": "wm",
            "search.py": "search", "eval.py": "eval"}


def readme_block(path: str = README) -> list[tuple[int, str]]:
    """The README's full-scale block: (line number, logical line) after the marker, backslash continuations joined."""
    lines = open(path, encoding="utf-8").read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(BLOCK_MARKER)), None)
    if start is None or start + 1 >= len(lines) or lines[start + 1].strip() != "```bash":
        raise UserError(f"{path}: no '{BLOCK_MARKER} ...' line followed by a ```bash block (the full-scale commands)")
    out, part, first = [], "", 0
    for n, line in enumerate(lines[start + 2:], start + 3):
        if line.strip() == "```":
            if part:
                raise UserError(f"{path}:{first}: the last command ends in a backslash")
            return out
        first = first if part else n
        if line.rstrip().endswith("\\"):
            part += line.rstrip()[:-1] + " "
        else:
            out.append((first, part + line))
            part = ""
    raise UserError(f"{path}:{start + 2}: the full-scale ```bash block is never closed")


def readme_commands(model: str, overrides: dict, path: str = README) -> list[tuple[str, list[str]]]:
    """(stage, [script, flags...]) for each command of the README's block with $MODEL = `model`: `python X.py` and
    `torchrun --nproc_per_node=N X.py` both become one process, and overrides[stage] is appended (a flag given twice
    takes its last value). Anything else is a UserError naming the line."""
    names, out = set(), []
    for n, line in readme_block(path):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise UserError(f"{path}:{n}: cannot split {line.strip()!r}: {e}") from None
        if len(words) == 1 and re.fullmatch(r"[A-Z_]+=[\w.-]*", words[0]):  # MODEL=anole: each family's own value
            names.add(words[0].split("=")[0])
            continue
        if words[:1] == ["torchrun"] and len(words) > 1 and words[1].startswith("--nproc_per_node="):
            words = words[2:]
        elif words[:1] == ["python"]:
            words = words[1:]
        else:
            raise UserError(f"{path}:{n}: not a `python X.py` or `torchrun --nproc_per_node=N X.py` command: {line!r}")
        if not words or words[0] not in STAGE_OF:
            raise UserError(f"{path}:{n}: the rehearsal knows no script {words[:1]} (known: {', '.join(STAGE_OF)})")
        flags = []
        for w in words[1:]:
            w = w.replace("$MODEL", model) if "MODEL" in names else w
            if "$" in w or not w.startswith("--"):
                raise UserError(f"{path}:{n}: {w!r} is not a --flag=value the rehearsal understands")
            flags.append(w)
        out.append((STAGE_OF[words[0]], [words[0], *flags, *overrides.get(STAGE_OF[words[0]], [])]))
    return out


def rehearsal_overrides(args) -> dict:
    """What the rehearsal changes in the README's commands, per stage: 3 steps of batch 2 in 2 micro-steps, 2
    candidates in search and eval, and the size's image side."""
    size = [f"--image_size={REHEARSAL_SIZES[args.size]['image_size']}"]
    fit = [*size, "--epochs=0", f"--steps={args.steps}", "--batch_size=2", "--grad_accum=2"]
    return dict(convert=[], dm=fit, wm=fit, bootstrap=size, search=[*size, "--n=2"], eval=[*size, "--n=2"])


def rehearsal_data(root: str, size: int, n_train: int = 2, n_test: int = 2, n_videos: int = 2):
    """Aurora-Bench-format train/test JSON, short videos of world scenes rendered at `size` px, and the README's
    search image aurora/example.jpg (a test input)."""
    rng = random.Random(0)

    def save(scene, rel):
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        world.render(scene, size).save(os.path.join(root, rel))
        return Path(os.path.join(root, rel))

    def step(scene):  # (action text, next scene); a scene with no applicable action is kept as is
        a = world.sample_action(scene, rng)
        return (world.describe(a, rng), world.apply(scene, a, rng)) if a is not None else ("", scene)

    for split, n, tasks in (("train", n_train, ["something", "ag"]), ("test", n_test, ["magicbrush", "something"])):
        items = []
        for i in range(n):
            src = world.sample_scene(rng)
            text, tgt = step(src)
            items.append(Item(f"{split}-{i}", save(src, f"aurora/images/{split}-{i}-in.png"), text,
                              save(tgt, f"aurora/images/{split}-{i}-out.png"), tasks[i % len(tasks)]))
        write_benchmark(items, os.path.join(root, "aurora", f"{split}.json"))
    save(world.sample_scene(rng), "aurora/example.jpg")
    for v in range(n_videos):  # 3 frames: a scene and two actions (one key frame each at --spacing=20)
        frames = [world.sample_scene(rng)]
        frames += [step(frames[-1])[1] for _ in range(2)]
        for j, f in enumerate(frames):
            save(f, f"videos/v{v}/{j:03d}.png")


def liquid_tokenizer(n_text: int) -> Tokenizer:
    """A tokenizer.json in Liquid's layout with exactly n_text ids: Gemma's specials <pad> 0, <eos> 1, <bos> 2,
    <unk> 3, Liquid's <boi>, <eoi>, <unconditional>, the 256 byte-level symbols, then filler tokens (no merges: text
    is spelled byte by byte). Liquid's image ids follow, unnamed (code + n_text)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<boi>", "<eoi>", "<unconditional>"]
    names = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    names += [f"<filler{i}>" for i in range(n_text - len(names))]
    tok = Tokenizer(models.BPE(vocab={n: i for i, n in enumerate(names)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size(with_added_tokens=True) == n_text
    return tok


def build_liquid(folder, hidden: int, heads: int, kv_heads: int, head_dim: int, inner: int, n_text: int, vq: VQConfig,
                 layers: int = 1, tied: bool = True, dtype=torch.float32, seed: int = 0, shards: int = 1):
    """A Liquid-shaped folder built with transformers (no download): a GemmaForCausalLM with random weights whose
    vocabulary is n_text text ids + vq.num_embeddings image ids, its tokenizer.json, and the Chameleon-format
    vqgan.ckpt (a random VQGAN, tensors under state_dict). config.json carries vq_config only when the VQGAN is not
    Chameleon's (a real Liquid folder has none). Returns the transformers model."""
    os.makedirs(folder, exist_ok=True)
    liquid_tokenizer(n_text).save(os.path.join(folder, "tokenizer.json"))
    cfg = transformers.GemmaConfig(
        vocab_size=n_text + vq.num_embeddings, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=8192,
        tie_word_embeddings=tied, bos_token_id=2, eos_token_id=1, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = transformers.GemmaForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norms start at 0 (a scale of 1): randomise them so that they are exercised
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    hf = hf.to(dtype)
    n_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    hf.save_pretrained(folder, max_shard_size=max(n_bytes // shards, 1 << 10) if shards > 1 else "1000GB")
    if vq.to_dict() != VQConfig.chameleon().to_dict():
        conf = read_json(os.path.join(folder, "config.json"))
        atomic_write(os.path.join(folder, "config.json"), json.dumps({**conf, "vq_config": vq.to_dict()}, indent=1))
    sd = dict(ImageTokenizer(vq, with_decoder=True).state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(1)  # a training checkpoint's extra; the converter drops it
    torch.save({"state_dict": sd}, os.path.join(folder, "vqgan.ckpt"))
    return hf


def rehearsal_build(args):
    """Stage 1 of a family: the data, then its folder <dir>/<family>: Anole's (a sharded bf16
    ChameleonForConditionalGeneration, a Chameleon-layout tokenizer.json and an original-layout vqgan.ckpt whose
    encoder is the checkpoint's) or Liquid's (rehearse.build_liquid at LIQUID_SIZES)."""
    root, s, family = args.dir, REHEARSAL_SIZES[args.size], args.models
    folder = os.path.join(root, family)
    rehearsal_data(root, s["image_size"])
    vq = VQConfig.from_dict({**VQConfig.chameleon().to_dict(), **s["vq"]})
    if family == "liquid":
        hf = build_liquid(folder, **LIQUID_SIZES[args.size], vq=vq, layers=args.layers, dtype=torch.bfloat16,
                          seed=args.seed, shards=4)  # Liquid ships 4 bf16 shards
    else:
        os.makedirs(folder, exist_ok=True)
        texts = [it["instruction"] for split in ("train", "test")
                 for it in read_json(os.path.join(root, "aurora", f"{split}.json"))]
        # Chameleon's id layout: <s> 0, <pad> 1, </s> 2, <unk> 3, image codes 4..8195, <eoss> 8196, <racm3:break> 8197
        tok = TextTokenizer.train((texts + [DM_PROMPT, WM_PROMPT]) * 4, vocab_size=8198 + 256 + 200,
                                  n_image_codes=8192)
        tok.save(os.path.join(folder, "tokenizer.json"))
        hf_vq = {k: v for k, v in vq.to_dict().items()
                 if k not in ("out_channels", "decoder_num_res_blocks", "beta", "recon_loss")}  # not HF fields
        cfg = transformers.ChameleonConfig(
            vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
            num_hidden_layers=args.layers, num_attention_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_attention_heads"], max_position_embeddings=4096,
            vocabulary_map=tok.tok.get_vocab(with_added_tokens=True), vq_config=hf_vq,
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        torch.manual_seed(args.seed)
        hf = transformers.ChameleonForConditionalGeneration(cfg).to(torch.bfloat16)  # Anole ships bf16
        n_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        hf.save_pretrained(folder, max_shard_size=max(n_bytes // 3, 1 << 20))  # three shards + index, like Anole's
        ours = ImageTokenizer(vq, with_decoder=True)  # random decoder; encoder and codebook from the HF checkpoint
        enc = {hf_to_ours(k): v.float() for k, v in hf.state_dict().items() if k.startswith("model.vqmodel.")}
        ours.load_state_dict(enc, strict=False)
        sd = dict(ours.state_dict())
        sd["loss.discriminator.main.0.weight"] = torch.zeros(1)  # a training checkpoint's extra; the converter drops it
        torch.save({"state_dict": sd}, os.path.join(folder, "vqgan.ckpt"))
    print(f"built {folder}: {sum(p.numel() for p in hf.parameters()):,} parameters")


def run_measured(name: str, argv: list[str], cwd: str, threads: int, log_dir: str | None, timeout: float | None = None):
    """Run `python <argv>` in cwd with `threads` torch threads; returns {stage, command, seconds, rc, peak_rss_gib}.
    The peak is the child's own high-water RSS (os.wait4), so stages do not mix. Output goes to log_dir/<name>.log
    (None: to our stdout). On timeout the child's whole process group is killed and rc is "timeout"."""
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, argv[0]), *argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    t = time.time()
    logf = None
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        logf = open(os.path.join(log_dir, f"{name}.log"), "w")
    p = subprocess.Popen(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT if logf else None, env=env,
                         start_new_session=True)  # its own process group: a timeout kills its workers too
    timed_out = False
    while True:  # os.wait4, not Popen.wait: it returns the child's resource usage
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.time() - t > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            _, status, ru = os.wait4(p.pid, 0)
            timed_out = True
            break
        time.sleep(0.2)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    if logf:
        logf.close()
    return dict(stage=name, command="python " + " ".join(argv), seconds=round(time.time() - t, 1),
                rc="timeout" if timed_out else p.returncode, peak_rss_gib=round(ru.ru_maxrss / 2**20, 2))


def step_seconds(metrics_path: str) -> list[float]:
    """Seconds of each optimizer step from a run's metrics.jsonl (its `time` is cumulative since the loop began)."""
    times = [json.loads(line)["time"] for line in open(metrics_path)]
    return [round(b - a, 2) for a, b in zip([0.0] + times, times)]


def probe_config(family: str, size: str, n_layer: int, **kw) -> ChameleonConfig:
    """Our config of a rehearsal checkpoint, for the probes (which need no checkpoint on disk)."""
    if family == "liquid":
        s = LIQUID_SIZES[size]
        V = s["n_text"] + 8192
        return ChameleonConfig(vocab_size=V, n_layer=n_layer, n_head=s["heads"], n_kv_head=s["kv_heads"],
                               n_embd=s["hidden"], head_size=s["head_dim"], n_inner=s["inner"], max_seq_len=8192,
                               norm_eps=1e-6, image_token_start=s["n_text"], image_token_end=V, qk_norm=False,
                               gemma_norm=True, embed_scale=True, mlp_act="gelu_tanh", tie_embeddings=True, **kw)
    s = REHEARSAL_SIZES[size]
    return ChameleonConfig.preset("chameleon-7b", vq=None, n_layer=n_layer, n_embd=s["hidden_size"],
                                  n_head=s["num_attention_heads"], n_kv_head=s["num_attention_heads"],
                                  n_inner=s["intermediate_size"], vocab_size=s["vocab_size"], **kw)


def rehearsal_probe(args):
    """One fine-tuning step of the rehearsal's model on one sequence, in a fresh process: random bf16 weights, LoRA
    r=16 on all seven linear layers, gradient checkpointing, the loss of a DM (the last 10 tokens) or a WM (the last
    1,024 image tokens). Prints PROBE {json}: weights RSS, the step's peak RSS growth (peak_mib) and its seconds."""
    if args.probe.startswith("vq:"):
        return vq_probe(args)
    task, n_layer, T, *full = args.probe.split(":")
    n_layer, T = int(n_layer), int(T)
    if full:
        train.SPARSE_LOGITS_MIN_VOCAB = 1 << 62  # the old path: logits at every position
    torch.set_num_threads(args.threads)
    cfg = probe_config(args.models, args.size, n_layer, gradient_checkpointing=True, mask_image_logits=task == "dm")
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)  # what from_pretrained(dtype=bf16) gives, without a checkpoint
    try:
        model = Chameleon(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model._init_rope()  # fp32 RoPE tables, as from_pretrained builds them
    apply_lora(model, 16, 32.0, 0.05, TrainConfig.lora_targets)
    ids = torch.randint(8198, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(args.seed))
    w = torch.zeros(1, T)
    w[:, -(10 if task == "dm" else 1025):-1 if task == "wm" else None] = 1.0  # the WM's target ends with EOI
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        (sequence_nll(model, ids, w).sum() / w[:, 1:].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    step()  # warm-up: AdamW state, allocator
    first = time.perf_counter() - t
    weights = _proc_kb("VmRSS") / 2**20
    t = time.perf_counter()
    peak = peak_mib(step, "cpu")
    print("PROBE " + json.dumps(dict(probe=args.probe, rss_before_gib=round(weights, 2),
                                     step_peak_gib=round(peak / 1024, 3), s_step=round(time.perf_counter() - t, 2),
                                     s_first_step=round(first, 2))), flush=True)


@torch.no_grad()
def vq_probe(args):
    """VQ encode and decode of a batch of images at the rehearsal's size with the family's VQGAN as the scripts load
    it (what every script does per image, on the CPU: train.load_tokenizers keeps it there)."""
    torch.set_num_threads(args.threads)
    n, px = int(args.probe.split(":")[1]), REHEARSAL_SIZES[args.size]["image_size"]
    folder = os.path.join(args.dir, args.models)
    vq = ImageTokenizer.from_pretrained(folder, os.path.join(folder, "vqgan_decoder.safetensors")).eval()
    x = torch.rand(n, 3, px, px, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
    codes = vq.encode(x[:1])  # warm-up
    res = {"probe": args.probe, "rss_before_gib": round(_proc_kb("VmRSS") / 2**20, 2)}
    for name, job in (("encode", lambda: vq.encode(x)), ("decode", lambda: vq.decode(codes.expand(n, -1)))):
        t = time.perf_counter()
        res[f"{name}_peak_gib"] = round(peak_mib(job, "cpu") / 1024, 3)
        res[f"{name}_s_per_image"] = round((time.perf_counter() - t) / n, 2)
    print("PROBE " + json.dumps(res), flush=True)


def rehearse(args) -> dict:
    """For each family: build its checkpoint, run every full-scale command of the README against it, probe memory
    scaling; write --out (JSON)."""
    root = os.path.abspath(args.dir)
    out = args.out or os.path.join(root, "rehearsal.json")
    families = args.models.split(",")
    for family in families:  # the README's block must read before anything is built
        readme_commands(family, rehearsal_overrides(args))
    claim_dir(root, "rehearse.py")  # refuses a folder worldboot did not write, before anything is deleted
    rec = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), size=args.size, layers=args.layers, models=families,
               shapes=dict(anole=REHEARSAL_SIZES[args.size], liquid=LIQUID_SIZES[args.size]), steps=args.steps,
               threads=args.threads, torch=torch.__version__, cpu=_cpu_name(),
               mem_total_gib=round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1), stages=[],
               probes=[])
    skip = REHEARSAL_STAGES[:REHEARSAL_STAGES.index(args.from_stage)] if args.from_stage else ()
    if skip:  # keep the numbers of the stages already run
        done = read_json(out, "rehearsal record")["stages"] if os.path.exists(out) else []
        rec["stages"] = [r for r in done if r["stage"] in skip and r.get("model") in families]
    logs = os.path.join(root, "logs")
    for family in families:
        if not skip:  # a rerun starts its fine-tuning afresh; runs/ is ours: root carries our marker (claim_dir)
            shutil.rmtree(os.path.join(root, "runs", family), ignore_errors=True)
        me = [os.path.basename(__file__), f"--dir={root}", f"--size={args.size}", f"--threads={args.threads}",
              f"--seed={args.seed}", f"--models={family}"]
        todo = [("build", [*me, "--build", f"--layers={args.layers}"])]
        todo += readme_commands(family, rehearsal_overrides(args))
        for name, argv in todo:
            if name in skip:
                continue
            print(f"rehearsal: {family} {name}: python {' '.join(argv)}", flush=True)
            r = {"model": family, **run_measured(f"{family}_{name}", argv, root, args.threads, logs), "stage": name}
            log = os.path.join(logs, f"{family}_{name}.log")
            if name in ("dm", "wm") and r["rc"] == 0:
                r["s_per_step"] = step_seconds(os.path.join(root, "runs", family, name, "metrics.jsonl"))
            print(f"  -> rc {r['rc']}, {r['seconds']} s, peak RSS {r['peak_rss_gib']} GiB"
                  + (f", s/step {r['s_per_step']}" if "s_per_step" in r else ""), flush=True)
            rec["stages"].append(r)
            atomic_write(out, json.dumps(rec, indent=1))
            if r["rc"] != 0:
                raise RuntimeError(f"rehearsal stage {family} {name} failed (rc {r['rc']}); its log: {log}\n"
                                   + open(log).read()[-3000:])
        for spec in [x for x in args.scaling.split(",") if x]:
            print(f"rehearsal: {family} probe {spec}", flush=True)
            name = f"{family}_probe_{spec.replace(':', '_')}"
            r = run_measured(name, [*me, f"--probe={spec}"], root, args.threads, logs)
            text = open(os.path.join(logs, f"{name}.log")).read()
            got = [json.loads(x[len("PROBE "):]) for x in text.splitlines() if x.startswith("PROBE ")]
            if r["rc"] != 0 or not got:
                raise RuntimeError(f"probe {family} {spec} failed (rc {r['rc']}):\n{text[-3000:]}")
            rec["probes"].append({"model": family, **got[0], "peak_rss_gib": r["peak_rss_gib"]})
            print(f"  -> {rec['probes'][-1]}", flush=True)
            atomic_write(out, json.dumps(rec, indent=1))
    print(rehearsal_table(rec), flush=True)
    print(f"rehearsal results -> {out}")
    return rec


def rehearsal_table(rec: dict) -> str:
    lines = [f"rehearsal ({rec['size']}, {rec['layers']} layer(s), {rec['threads']} thread(s), {rec['cpu']}):", "",
             "| model | stage | seconds | peak RSS GiB | s/step |", "|---|---|---|---|---|"]
    for r in rec["stages"]:
        lines.append(f"| {r.get('model', 'anole')} | {r['stage']} | {r['seconds']} | {r['peak_rss_gib']} | "
                     f"{', '.join(map(str, r.get('s_per_step', []))) or '-'} |")
    if rec["probes"]:
        lines += ["", "| model | probe (task:layers:tokens) | RSS before GiB | step peak growth GiB | s/step |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['model']} | {p['probe']} | {p['rss_before_gib']} | {p['step_peak_gib']} | {p['s_step']} |"
                  for p in rec["probes"] if "step_peak_gib" in p]
        lines += [f"| {p['model']} | {p['probe']} (per batch; s per image) | {p['rss_before_gib']} | encode "
                  f"{p['encode_peak_gib']}, decode {p['decode_peak_gib']} | encode {p['encode_s_per_image']}, "
                  f"decode {p['decode_s_per_image']} |" for p in rec["probes"] if "encode_peak_gib" in p]
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------------
# GPU check: one command for whenever a GPU is at hand. Each part runs in its own subprocess with a time limit (its
# process group is killed when it runs over), and the JSON is rewritten after every part, so a broken or slow part
# costs only itself.

# reproduce.py --preset=gpu cut to a few minutes: a tenth of the data, a tenth of the steps (same model and batch)
GPU_REPRODUCE = ["--preset=gpu", "--n_train=2000", "--n_videos=200", "--n_val=64", "--n_test=70",
                 "--n_comp=35", "--n_captions=4000", "--vq_images=2000", "--vq_warmup=300", "--vq_steps=300",
                 "--pretrain_steps=300", "--ft_steps=200", "--boot_k=500"]
# the same flags on a CPU dry run (--quick): sizes that take seconds
QUICK_REPRODUCE = ["--preset=smoke", "--n_train=32", "--n_videos=4", "--n_val=8", "--n_test=8",
                   "--n_comp=4", "--n_captions=32", "--vq_images=64", "--vq_warmup=4", "--vq_steps=4",
                   "--pretrain_steps=2", "--ft_steps=2", "--boot_k=8", "--search_n=1,2", "--jobs=1"]


def gpu_check_parts(args, tmp: str) -> dict:
    """part -> (argv of a `python` subprocess, what it writes, time limit in seconds)."""
    dev = [f"--device={args.device}", f"--dtype={args.dtype}", f"--threads={args.threads}", f"--seed={args.seed}"]
    if args.quick:  # CPU dry run: the micro config, a shrunken preset, the smoke pipeline
        a = ["--config=micro", "--quick", "--batches=1,2", "--best_of=2", "--train_batch=2", "--train_len=16",
             "--no_memory"]
        b = ["--quick", "--batches=1,2", "--preset_shrink"]
        c = QUICK_REPRODUCE
    else:
        a = ["--config=large", "--decode_lens=128", "--batches=1,8", "--best_of=8", "--reps=2", "--train_batch=8",
             "--train_len=1024", "--no_memory", f"--peak_flops={args.peak_flops}"]
        b = ["--decode_lens=256", "--batches=1,8", "--reps=2"]
        c = GPU_REPRODUCE
    limits = [float(x) for x in args.part_limits.split(",")]
    return {
        "a": (["bench.py", *dev, *a, f"--results={tmp}/a.jsonl"], f"{tmp}/a.jsonl", limits[0]),
        "b": (["bench.py", *dev, *b, "--config=", "--preset=chameleon-7b", f"--results={tmp}/b.jsonl"],
              f"{tmp}/b.jsonl", limits[1]),
        "c": (["reproduce.py", *c, f"--device={args.device}", f"--out={tmp}/repro"], f"{tmp}/repro/report.md",
              limits[2]),
    }


def gpu_check_summary(part: str, path: str) -> dict:
    """The numbers a part wrote, in the JSON's words."""
    if part == "c":
        report = open(path).read()
        return {"report_md": report[report.index("## Setup"):] if "## Setup" in report else report}
    rec = json.loads(open(path).read().splitlines()[-1])
    out = {k: rec[k] for k in ("device", "dtype", "torch", "transformers", "hf_attn", "reps", "wall_s")}
    if part == "b":
        out["preset_tok_s"] = rec["preset"]
        return out
    (name, c), = rec["configs"].items()
    out["config"] = {"name": name, **{k: c["config"][k] for k in ("n_embd", "n_layer", "n_head", "vocab_size")}}
    for r in c["rows"]:
        row = {k: r[k] for k in ("s_ours", "s_ref", "ratio") if k in r}
        row.update({k: r[k] for k in ("tok_s_ours", "tok_s_ref", "mfu_ours", "mfu_ref", "cost_vs_1_ours",
                                      "cost_vs_1_ref") if k in r})
        out[r["row"]] = row
    return out


def gpu_check(args) -> dict:
    out = args.out or "out/gpu_check.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() \
        else args.device
    rec = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), command="python rehearse.py " + " ".join(sys.argv[1:]),
               device=device, torch=torch.__version__, peak_flops=args.peak_flops, parts={})
    t0 = time.time()
    here = os.path.dirname(os.path.abspath(__file__))
    for part, (argv, result, limit) in gpu_check_parts(args, tmp).items():
        if part not in args.gpu_parts.split(","):
            continue
        print(f"gpu_check: part {part} (limit {limit:.0f} s): python {' '.join(argv)}", flush=True)
        r = run_measured(part, argv, here, args.threads, None, timeout=limit)
        try:
            if r["rc"] != 0:
                raise RuntimeError(f"exit status {r['rc']}")
            r["results"] = gpu_check_summary(part, result)
            r["status"] = "ok"
        except Exception as e:  # one broken part must not lose the others
            r["status"] = f"failed: {type(e).__name__}: {e}"
        rec["parts"][part] = r
        rec["wall_s"] = round(time.time() - t0, 1)
        atomic_write(out, json.dumps(rec, indent=1))
        print(f"gpu_check: part {part}: {r['status']} in {r['seconds']} s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    rec["table_md"] = gpu_check_table(rec)
    atomic_write(out, json.dumps(rec, indent=1))
    print(rec["table_md"] + f"\n\ngpu_check: {rec['wall_s']} s; results -> {out}", flush=True)
    return rec


def gpu_check_table(rec: dict) -> str:
    """Markdown rows of parts a and b for the README (part c: its report_md)."""
    lines = [f"{rec['device']}, torch {rec['torch']}", "", "| measurement | ours | reference (HF) | ratio |",
             "|---|---|---|---|"]
    res = rec["parts"].get("a", {}).get("results", {})
    for row, r in res.items():
        if not isinstance(r, dict) or "s_ours" not in r:
            continue
        if "tok_s_ours" in r:
            lines.append(f"| {row} tok/s | {r['tok_s_ours']:,.0f} | {r['tok_s_ref']:,.0f} | {r['ratio']:.2f}x |")
            if "mfu_ours" in r:
                lines.append(f"| {row} MFU | {r['mfu_ours']:.1%} | {r['mfu_ref']:.1%} | |")
        else:
            lines.append(f"| {row} seconds | {r['s_ours']:.3f} | {r['s_ref']:.3f} | {r['ratio']:.2f}x |")
            if "cost_vs_1_ours" in r:
                lines.append(f"| {row} / best-of-1 cost | {r['cost_vs_1_ours']:.2f}x | {r['cost_vs_1_ref']:.2f}x | |")
    for name, rows in rec["parts"].get("b", {}).get("results", {}).get("preset_tok_s", {}).items():
        lines += [f"| {name} {row} tok/s (ours, random weights) | {v:,.1f} | - | |" for row, v in rows.items()]
    for part, r in rec["parts"].items():
        lines.append(f"| part {part} | {r['status']} | {r['seconds']} s | |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.build:
        return rehearsal_build(args)
    if args.probe:
        return rehearsal_probe(args)
    if args.gpu_check:
        return gpu_check(args)
    return rehearse(args)


if __name__ == "__main__":
    run(main)
