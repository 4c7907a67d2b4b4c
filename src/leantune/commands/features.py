"""``leantune features IMAGES OUTPUT --model M``: frozen image features for vision-language training.

IMAGES is a folder (searched recursively) or a list file of image paths; each image's id is its file name without
extension. OUTPUT receives safetensors shards and ``index.json``; running the same command again after a kill
resumes without redoing finished shards. Undecodable images are skipped and listed at the end.

Examples::

    DINO=$(python -c "from leantune.assets import dinov2_vit_s14; print(dinov2_vit_s14())")  # offline ViT-S/14
    leantune features images/ features/dino --model "$DINO" --grid 6     # 16 x 16 patches max-pooled to 36
    leantune features coco/val2014 features/coco --model openai/clip-vit-base-patch32   # 7 x 7 = 49 patches
"""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("features", help="Extract frozen image features into shards (resumable).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", metavar="IMAGES", help="A folder of images, or a text file with one path a line.")
    parser.add_argument("output", metavar="OUTPUT", help="Folder for the shards and index.json (resumes if present).")
    parser.add_argument("--model", required=True, help="Image model id or folder (with its image processor).")
    parser.add_argument("--tokens", choices=("patches", "all"), default="patches",
                        help="patches = a ViT's patch tokens only; all = every output token (default: patches).")
    parser.add_argument("--grid", type=int, default=None,
                        help="Pool the token grid to GRID x GRID (VL-Adapter: 6, from CLIP RN101's 7 x 7).")
    parser.add_argument("--pooling", choices=("max", "mean"), default="max", help="Grid pooling (default: max).")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass (default: 32).")
    parser.add_argument("--shard-size", type=int, default=1000, help="Images per shard file (default: 1000).")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="Stored precision (default: float16).")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from leantune.vl.features import FeatureSettings, extract_features

    settings = FeatureSettings(model=args.model, tokens=args.tokens, grid=args.grid, pooling=args.pooling,
                               shard_size=args.shard_size, dtype=args.dtype)
    index = extract_features(args.images, args.output, settings, batch_size=args.batch_size, device=args.device,
                             progress=not args.no_progress)
    print(f"{args.output}: {index['num_images']:,d} images, {index['tokens']} tokens x {index['feature_dim']} "
          f"features each")
    if index["failed"]:
        print(f"skipped {len(index['failed'])} image(s) that could not be decoded:")
        for failure in index["failed"]:
            print(f"  {failure['path']}: {failure['error']}")
    return 0
