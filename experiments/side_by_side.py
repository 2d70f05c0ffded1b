"""Teacher and students on the same prompts and seeds, one row per model, as one GIF.

    python experiments/side_by_side.py --out experiments/results/stage2_side_by_side.gif \
        --model "teacher, 50 steps CFG 2=runs/shapes_teacher/main/checkpoints/last.ckpt" \
        --model "TMD M2 N2=runs/shapes_tmd/main/checkpoints/last.ckpt" --sampler 'TMD M2 N2={"outer_steps": 2}'

The prompts are the sample app's defaults (conf/sample.yaml: six one-object and two two-object captions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from lightning_tmd.generators import load_generator
from lightning_tmd.sampling import sample_clips
from lightning_tmd.video import labelled_rows, save_video, to_uint8

PROMPTS = list(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "sample.yaml").prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="LABEL=CKPT (repeatable, one row each)")
    parser.add_argument("--sampler", action="append", default=[], help="LABEL=JSON sampler overrides")
    parser.add_argument("--seed", type=int, default=0, help="every clip's noise seed")
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--fps", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    samplers = {k: json.loads(v) for k, v in (item.rsplit("=", 1) for item in args.sampler)}
    rows = []
    for item in args.model:
        label, ckpt = item.rsplit("=", 1)
        loaded = load_generator(ckpt)
        clips, nfe = sample_clips(loaded.module, loaded.prompts, PROMPTS, [args.seed] * len(PROMPTS),
                                  loaded.clip_shape, **samplers.get(label, {}))
        rows.append((f"{label}\nNFE {nfe:.3g}", to_uint8(clips)))
    save_video(labelled_rows(rows, scale=args.scale), args.out, fps=args.fps)
    print(f"wrote {args.out}: {len(rows)} models x {len(PROMPTS)} prompts")


if __name__ == "__main__":
    main()
