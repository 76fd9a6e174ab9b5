"""Export a pretraining checkpoint's encoders as timm-ready safetensors files (util/export.py
says which files, their key names and metadata, and how timm loads them).

    python export_weights.py output/pretrain_ema/checkpoint-last.pth [--out DIR]
"""
import sys
from typing import List, Optional

from util.errors import ArgumentParser, cli
from util.export import export_encoders


@cli
def main(argv: Optional[List[str]] = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a pretraining checkpoint (checkpoint-last.pth or checkpoint-N.pth)")
    parser.add_argument("--out", default="", help="output directory (default: the checkpoint's)")
    args = parser.parse_args(argv)
    for path, call in export_encoders(args.checkpoint, args.out or None).items():
        print(f"wrote {path}\n  load in timm: {call}")


if __name__ == "__main__":
    main(sys.argv[1:])
