"""Stage 2 on its own: the tokenizers of the synthetic world, trained from scratch (paper Sec. 3: Chameleon reads
and writes VQ image tokens and BPE text tokens; ours are small versions of both).

- the VQGAN (tokenizer.train_vqgan) on freshly rendered world scenes, checked on the validation split's images: how
  well it reconstructs them, and whether the world's judge still reads every scene back from the reconstruction;
- the byte-level BPE (tokenizer.TextTokenizer.train) on the captions, the train instructions and the prompt
  templates (not the videos' hidden actions: the "unlabelled" videos must stay unlabelled).

reproduce.py calls the same functions (train_vq, check_vq, train_bpe) and caches their results in out/stages/.

Run:  python train_tokenizer.py --data=out/data --out=out/tok   (writes out/tok/vq/ and out/tok/tokenizer.json)
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass

import torch

import world
from common import DTYPES, UserError, arg, claim_dir, compute_dtype, parse_config, run
from data import load_captions, load_items, preprocess_image, to_pil
from ranks import ONE_CHUNK, Chunks
from tokenizer import TextTokenizer, VQConfig, codebook_usage, train_vqgan
from train import CAPTION_PROMPT, DRAW_PROMPT
from train_dynamics import DM_PROMPT
from train_world import WM_PROMPT


@dataclass
class TokenizerConfig:
    data: str = arg("out/data", "required")  # world.py's output folder (train/val/captions .json)
    out: str = arg("out/tok", "required")  # writes vq/ (the VQGAN) and tokenizer.json (the BPE) here
    vq_downsample: int = arg(4, (2, 4, 8, 16))  # 32x32 images -> (32 / this)^2 tokens (reproduce.py --vq_downsample)
    vq_codes: int = arg(128, ">=2")  # codebook size
    vq_warmup: int = arg(800, ">=0")  # steps as a plain autoencoder before the codebook is switched on (k-means init)
    vq_steps: int = arg(800, ">=1")  # steps with the quantiser
    vq_batch: int = arg(32, ">=1")  # batch size
    vq_images: int = arg(4000, ">=1")  # rendered scenes the VQGAN trains on
    bpe_vocab: int = arg(1024, ">=1")  # text vocabulary (specials + image codes + 256 bytes + merges)
    seed: int = arg(0, ">=0")  # the VQGAN's training images, initialisation and batches
    nuisance: float = arg(0.0, "0..1")  # the world's video-like frames (world.py --nuisance): the VQGAN trains on such
    # frames and its check allows their camera shift
    threads: int = arg(1, ">=1")  # torch intra-op CPU threads (the VQGAN's bits depend on it; reproduce.py --threads)
    device: str = arg("cpu", ("cpu", "cuda"))  # where the VQGAN trains
    dtype: str = arg("auto", DTYPES)  # the VQGAN's arithmetic (common.compute_dtype: bf16 autocast where native)


def world_paths(data_dir: str) -> dict:
    """The files of a world.py data folder that the tokenizers read."""
    return {n: os.path.join(data_dir, n + ".json") for n in ("train", "val", "captions")}


def train_vq(cfg, device, log=print, seed: int = 0, progress: bool = True, chunks: Chunks = ONE_CHUNK):
    """The VQGAN of the synthetic world, trained (check it with check_vq). `cfg`: a TokenizerConfig (or reproduce's
    ReproConfig: the same vq_* fields). `seed`: the training images and the VQGAN's initialisation and batches
    (reproduce.py: the replicate). It reads no file of the world's data, so it can train while the data is built.
    `chunks`: one rank's part of a step's gradient (ranks.launch runs this per rank; reproduce.py --foundation_ranks).
    Returns (ImageTokenizer on the CPU, results: seconds, final reconstruction loss)."""
    # The VQGAN sees freshly rendered world scenes with 4-8 objects: denser than the task scenes (2-4 objects), so
    # objects are not a rare sliver of pixels next to the background. In a video-like world (--nuisance) they are
    # video-like frames too.
    rng = random.Random(12345 + seed)
    images = torch.stack([preprocess_image(world.nuisance_frame(world.render(world.sample_scene(
        rng, min_objects=4, max_objects=8)), cfg.nuisance, f"vq-{i}"), 32) for i in range(cfg.vq_images)])
    levels = int(math.log2(cfg.vq_downsample)) + 1
    vcfg = dataclasses.replace(VQConfig.world(), num_embeddings=cfg.vq_codes, recon_loss="mse",
                               channel_multiplier=(1, 1, 2, 2, 4)[:levels])
    log = log if chunks.rank == 0 else (lambda s: None)
    log(f"tokenizers: VQGAN {vcfg.resolution}px -> {32 // cfg.vq_downsample}^2 tokens, {cfg.vq_codes} codes, "
        f"{cfg.vq_warmup} autoencoder warm-up + {cfg.vq_steps} steps")
    t0 = time.time()
    vq, hist = train_vqgan(images, vcfg, steps=cfg.vq_steps, batch_size=cfg.vq_batch, lr=3e-3, betas=(0.9, 0.99),
                           ae_warmup=cfg.vq_warmup, seed=seed, device=device, dtype=cfg.dtype,
                           progress=progress, chunks=chunks)
    vq = vq.cpu()  # trained on the GPU when there is one (the GPU check found it on the CPU: 3 steps/s)
    return vq, {"vq_seconds": round(time.time() - t0, 1), "final_recon": hist["recon"][-1]}


def check_vq(vq, cfg, paths: dict, log=print) -> dict:
    """How well the VQGAN reconstructs held-out task images (the validation split's), and whether the world's judge
    still reads every scene back from the reconstructions. Returns held-out reconstruction L1, scenes recovered and
    codebook usage."""
    check = torch.stack([preprocess_image(p, 32) for it in load_items(paths["val"])
                         for p in (it.input_path, it.output_path)])
    with torch.no_grad():  # checked on held-out task images (the validation split)
        codes = torch.cat([vq.encode(check[i : i + 256]) for i in range(0, len(check), 256)])
        recon = torch.cat([vq.decode(codes[i : i + 256]) for i in range(0, len(codes), 256)])
    usage = codebook_usage(codes, vq.cfg.num_embeddings)
    # how much of the world survives the tokenizer: the judge reads scenes back from reconstructions
    shift = world.MAX_SHIFT * cfg.nuisance  # the detector allows the camera shift of video-like frames
    ok = sum(world.parse(to_pil(r), max_shift=shift) == world.parse(to_pil(c), max_shift=shift)
             for r, c in zip(recon, check))
    res = {"recon_l1": (recon - check).abs().mean().item() / 2, "scene_recovered": ok / len(check),
           **{k: float(v) for k, v in usage.items()}}
    log(f"tokenizers: recon L1 {res['recon_l1']:.4f}, scenes recovered from reconstructions "
        f"{100 * res['scene_recovered']:.1f}%, codebook usage {usage}")
    return res


def bpe_texts(paths: dict) -> list[str]:
    """The text the BPE learns from: what the method holds with its labels, i.e. the captions and the labelled train
    instructions. Not the unlabelled videos' hidden actions (the report's answer key), nor val or test."""
    return [it.instruction for it in load_captions(paths["captions"]) + load_items(paths["train"])]


def train_bpe(cfg, paths: dict, n_image_codes: int):
    """The BPE on the captions and train instructions. Returns (TextTokenizer, results: vocabulary, mean tokens per
    text)."""
    texts = bpe_texts(paths) + [CAPTION_PROMPT, DRAW_PROMPT, DM_PROMPT, WM_PROMPT] * 20
    text_tok = TextTokenizer.train(texts, vocab_size=cfg.bpe_vocab, n_image_codes=n_image_codes)
    lengths = [len(text_tok.encode(t)) for t in texts[:2000]]
    return text_tok, {"vocab": text_tok.vocab_size, "mean_tokens": sum(lengths) / len(lengths)}


def main(argv=None):
    cfg = parse_config(TokenizerConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda: no CUDA device here")
    torch.set_num_threads(cfg.threads)
    cfg.dtype = compute_dtype(cfg.dtype, cfg.device)
    paths = world_paths(cfg.data)
    if missing := [p for p in paths.values() if not os.path.isfile(p)]:  # before the VQGAN's minutes of training
        raise UserError(f"--data={cfg.data}: {missing[0]} missing (a folder written by world.py is expected)")
    claim_dir(cfg.out, "train_tokenizer.py")
    vq, vq_res = train_vq(cfg, torch.device(cfg.device), seed=cfg.seed)
    vq_res.update(check_vq(vq, cfg, paths))
    vq.save(os.path.join(cfg.out, "vq"))
    text_tok, bpe_res = train_bpe(cfg, paths, vq.cfg.num_embeddings)
    text_tok.save(os.path.join(cfg.out, "tokenizer.json"))
    print(f"BPE: {bpe_res}\ntokenizers -> {cfg.out}")


if __name__ == "__main__":
    run(main)
