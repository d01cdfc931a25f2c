"""The `dalle` command. Each subcommand is one typed function; `main(argv)` parses and calls it.

The functions hold no logic beyond arguments and messages: they call into the modules.
Any `DalleError` (bad input a user can fix) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dalle.errors import DalleError


def data_export(data: str, split: str, n: int, size: int, seed: int, out: str) -> Path:
    """Writes N pairs of a source as DIR/00000.png + DIR/00000.txt (readable by folder:DIR)."""
    from dalle.config import DataConfig
    from dalle.data import export_folder, open_source, take

    config = DataConfig(source=data, split=split, size=size, seed=seed)
    source = open_source(data, config, n=n)
    count = export_folder(take(source, n), out)
    print(f"wrote {count} pairs to {out}")
    if source.skipped:
        print(source.summary())
    return Path(out)


def data_show(data: str, split: str, n: int, size: int, seed: int, out: str, columns: int = 8) -> Path:
    """Writes a PNG grid of N pairs of a source with each caption under its image."""
    from dalle.config import DataConfig
    from dalle.data import open_source, take
    from dalle.viz import caption_grid, save_png

    config = DataConfig(source=data, split=split, size=size, seed=seed)
    pairs = take(open_source(data, config, n=n), n)
    path = save_png(caption_grid(pairs, columns=columns), out)
    print(path)
    return path


def train_tokenizer(data: str, out: str, vocab_size: int = 512, n: int = 20000, size: int = 32,
                    seed: int = 0, paraphrase_prob: float = 0.2) -> Path:
    """Trains a byte-level BPE on the captions of a data source and saves it as JSON."""
    from dalle.config import DataConfig
    from dalle.data import open_source, take
    from dalle.tokenizer import train_bpe

    config = DataConfig(source=data, size=size, seed=seed, paraphrase_prob=paraphrase_prob)
    captions = [caption for _, caption in take(open_source(data, config, n=n), n)]
    if not captions:
        raise DalleError(f"no captions found in {data}")
    tokenizer = train_bpe(captions, vocab_size)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    print(f"trained a {tokenizer.get_vocab_size()}-token BPE on {len(captions)} captions: {out}")
    return Path(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle", description="DALL-E 1: dVAE, transformer, CLIP reranking.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="export or look at a data source")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, helptext in (("export", "write pairs as a folder of PNG + TXT"), ("show", "write a PNG grid")):
        sub = data_commands.add_parser(name, help=helptext)
        sub.add_argument("--data", default="shapes", help="shapes | digits | folder:DIR | hf:NAME | wds:PATTERN")
        sub.add_argument("--split", default="train", choices=["train", "test"])
        sub.add_argument("--n", type=int, default=16)
        sub.add_argument("--size", type=int, default=32)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--out", required=True)
        if name == "show":
            sub.add_argument("--columns", type=int, default=8)

    tok = commands.add_parser("train-tokenizer", help="train the caption BPE on a data source")
    tok.add_argument("--data", default="shapes")
    tok.add_argument("--out", required=True)
    tok.add_argument("--vocab-size", type=int, default=512)
    tok.add_argument("--n", type=int, default=20000, help="how many captions to read")
    tok.add_argument("--paraphrase-prob", type=float, default=0.2)
    return parser


def run(args: argparse.Namespace) -> object:
    if args.command == "data" and args.data_command == "export":
        return data_export(args.data, args.split, args.n, args.size, args.seed, args.out)
    if args.command == "data" and args.data_command == "show":
        return data_show(args.data, args.split, args.n, args.size, args.seed, args.out, args.columns)
    if args.command == "train-tokenizer":
        return train_tokenizer(args.data, args.out, args.vocab_size, args.n, paraphrase_prob=args.paraphrase_prob)
    raise DalleError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dalle` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DalleError as error:
        print(f"dalle: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dalle: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
