#!/usr/bin/env bash
# Train the built-in "nano" model from scratch on synthetic scenes, evaluate it on held-out scenes
# and export it (float16) to anyseg/weights/nano.safetensors.
#
# Resumable: run it again after an interruption and `anyseg train` continues from
# $RUN/last.pt (same seeds, so the result equals an uninterrupted run). Set RUN to use another
# run folder and THREADS for torch CPU threads.
#
#   scripts/train_nano.sh            # train (or resume), evaluate, export
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/nano}
THREADS=${THREADS:-1}
TRAIN_DATA="synthetic:count=4000,seed=0,size=128,objects=1-4,parts=0"
HELDOUT_DATA="synthetic:count=100,seed=1000,size=128,objects=1-4,parts=0"

# The from-scratch recipe (see docs/training.md): SAM's recipe with a 1 : 1 focal : dice weighting
# (20 : 1 collapses an untrained model to empty masks), one corrective click per session instead of
# 8 + 2 refinements, losses on the low-res grid, a high learning rate.
python -m anyseg train --arch nano --mode full --data "$TRAIN_DATA" \
    --steps 1200 --batch-size 8 --masks-per-image 8 --lr 2e-3 --warmup-steps 50 --min-lr-ratio 0.02 \
    --weight-decay 0.05 --point-iters 1 --refine-iters 0 --focal-weight 1 --dice-weight 1 \
    --loss-res low --seed 0 --threads "$THREADS" --save-every 25 --device cpu -o "$RUN"

# float16 export (half the size); the float16 weights are loaded back into a float32 model, and the
# low-res logits of both models are compared on a few held-out scenes.
python - "$RUN/model.pth" anyseg/weights/nano.safetensors "$HELDOUT_DATA" <<'PY'
import os
import sys
import torch
import anyseg
from anyseg.train.datasets import open_dataset, to_model_frame

src, dst, data = sys.argv[1:4]
model = anyseg.load_model(src)
anyseg.save_model(anyseg.load_model(src).half(), dst)
half = anyseg.load_model(dst)
worst, agree = 0.0, []
with torch.no_grad():
    for sample in list(open_dataset(data))[:8]:
        frame = to_model_frame(sample, model.img_size)
        x = model.preprocess(frame.image[None].float())
        emb_a, emb_b = model.encode_image(x), half.encode_image(x)
        xy = torch.tensor([[[frame.input_size[1] / 2, frame.input_size[0] / 2]]])
        sparse, dense = model.embed_prompts(points=(xy, torch.ones(1, 1, dtype=torch.int)))
        a, _ = model.decode(emb_a, sparse, dense, multimask_output=True)
        sparse, dense = half.embed_prompts(points=(xy, torch.ones(1, 1, dtype=torch.int)))
        b, _ = half.decode(emb_b, sparse, dense, multimask_output=True)
        worst = max(worst, float((a - b).abs().max()))
        agree.append(float(((a > 0) == (b > 0)).float().mean()))
print(f"wrote {dst}: {os.path.getsize(dst)} bytes; float16 vs float32 low-res logits: "
      f"max |diff| {worst:.4f}, sign agreement {sum(agree) / len(agree):.5f}")
PY

python -m anyseg eval --model "$RUN/model.pth" --data "$HELDOUT_DATA" --clicks 3 -o "$RUN/eval" --name fp32 --quiet
python -m anyseg eval --model anyseg/weights/nano.safetensors --data "$HELDOUT_DATA" --clicks 3 \
    -o "$RUN/eval" --name nano --quiet
