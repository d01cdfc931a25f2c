"""The `dalle` command: the parser of every subcommand, and `main`.

Each subcommand's parser registers its function from `dalle.commands` (`set_defaults(func=)`);
`main(argv)` parses the arguments and calls it with its flags as keywords. Any expected
failure (a `DalleError`, a bad path, an unreadable picture: `dalle.errors.user_message`)
becomes one line on stderr and exit status 2. Progress and notes go through `logging` to
stderr; stdout holds each command's own output (JSON lines, paths).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys

from dalle import __version__
from dalle.commands import (
    classify,
    convert_openai,
    convert_vqgan,
    data_export,
    data_fetch,
    data_show,
    demo,
    edit,
    evaluate,
    generate,
    imagine,
    reconstruct,
    search,
    serve,
    train_all,
    train_clip,
    train_judge,
    train_tokenizer,
    train_transformer,
    train_vae,
)
from dalle.errors import user_message
from dalle.inference.devices import choose_threads

# ----------------------------------------------------------------------------- the parser


def _data_parsers(commands) -> None:
    data = commands.add_parser("data", help="export or look at a data source")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, helptext, func in (("export", "write pairs as a folder of PNG + TXT", data_export),
                                 ("show", "write a PNG grid", data_show)):
        sub = actions.add_parser(name, help=helptext)
        sub.set_defaults(func=func)
        sub.add_argument("--data", default="shapes", help="shapes | digits | folder:DIR | hf:NAME | wds:PATTERN")
        sub.add_argument("--split", default="train", choices=["train", "test"])
        sub.add_argument("--n", type=int, default=16)
        sub.add_argument("--size", type=int, default=32)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--out", required=True)
        if name == "show":
            sub.add_argument("--columns", type=int, default=8)

    fetch = actions.add_parser("fetch", help="build a named dataset from its public source")
    fetch.set_defaults(func=data_fetch)
    fetch.add_argument("name", choices=["emoji"], help="emoji: Google's and Twitter's emoji (../shared/EMOJI.md)")
    fetch.add_argument("--out", required=True, help="writes OUT/train, OUT/test and OUT/split.json")
    fetch.add_argument("--size", type=int, default=32, help="the picture side (the sources are 64 px)")
    fetch.add_argument("--seed", type=int, default=0, help="the held-out split's seed")
    fetch.add_argument("--cache", help="where the npm tarballs are kept (default ~/.cache/dalle/emoji)")
    fetch.add_argument("--tarballs", help="a folder that already holds the two tarballs (no download)")

    tok = commands.add_parser("train-tokenizer", help="train the caption BPE on a data source")
    tok.set_defaults(func=train_tokenizer)
    tok.add_argument("--data", default="shapes")
    tok.add_argument("--out", required=True)
    tok.add_argument("--vocab-size", type=int, default=512)
    tok.add_argument("--n", type=int, default=20000, help="how many captions to read")
    tok.add_argument("--size", type=int, default=32, help="picture size of the source (captions do not depend on it)")
    tok.add_argument("--seed", type=int, default=0, help="the source's seed (which captions are drawn)")
    tok.add_argument("--paraphrase-prob", type=float, default=0.2)


def _training_parsers(commands) -> None:
    for name, helptext, func in (("train-vae", "train the image tokenizer (dVAE, or VQGAN with image_tokenizer: "
                                               "vqgan)", train_vae),
                                 ("train-clip", "train the CLIP", train_clip),
                                 ("train-judge", "fine-tune the run's CLIP on adversarial pictures into "
                                                 "run_dir/judge, the judge of dalle imagine", train_judge),
                                 ("train", "train the transformer (needs the run's image tokenizer)",
                                  train_transformer)):
        sub = commands.add_parser(name, help=helptext)
        sub.set_defaults(func=func)
        sub.add_argument("--config", required=True, help="a YAML file in configs/")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set train.dvae.lr=3e-4 (repeatable)")
        sub.add_argument("--run-dir", help="where the run writes (default: the config's run_dir)")
        sub.add_argument("--resume", default="auto", help="auto (newest checkpoint), none, or a checkpoint path")
        sub.add_argument("--max-bad-fraction", type=float,
                         help="stop with a message when more of the data files than this are broken")

    everything = commands.add_parser("train-all", help="train every stage not trained yet (resumable)")
    everything.set_defaults(func=train_all)
    everything.add_argument("--config", required=True, help="a YAML file in configs/")
    everything.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value, e.g. --set data.source=folder:DIR (repeatable)")
    everything.add_argument("--run-dir", help="where the run writes (default: the config's run_dir)")
    everything.add_argument("--max-bad-fraction", type=float,
                            help="stop with a message when more of the data files than this are broken")

    convert = commands.add_parser("convert", help="import released weights")
    what = convert.add_subparsers(dest="convert_command", required=True, metavar="WHAT")
    openai = what.add_parser("openai-dvae", help="OpenAI's encoder.pkl + decoder.pkl")
    openai.set_defaults(func=convert_openai)
    openai.add_argument("--encoder", required=True)
    openai.add_argument("--decoder", required=True)
    openai.add_argument("--out", required=True)
    openai.add_argument("--image-size", type=int, default=256, help="the picture side it reads (OpenAI: 256)")
    openai.add_argument("--trust-pickle", action="store_true",
                        help="allow loading pickled modules (this runs code from the files)")
    vqgan = what.add_parser("vqgan", help="a taming-transformers (or ruDALL-E) VQGAN: last.ckpt + model.yaml")
    vqgan.set_defaults(func=convert_vqgan)
    vqgan.add_argument("--checkpoint", required=True, help="the Lightning checkpoint (a pickle with a state_dict)")
    vqgan.add_argument("--config", required=True, help="its model.yaml (VQModel or GumbelVQ)")
    vqgan.add_argument("--out", required=True)
    vqgan.add_argument("--trust-pickle", action="store_true",
                       help="allow loading the pickled checkpoint (this runs code from the file)")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p, --cond-scale; left out, the model's sampling.json decides."""
    parser.add_argument("--temperature", type=float, help="default: the model's sampling.json (else 1)")
    parser.add_argument("--top-k", type=int, help="keep the k likeliest codes (0: off; default: sampling.json)")
    parser.add_argument("--top-p", type=float, help="nucleus mass (1: off; default: sampling.json)")
    parser.add_argument("--cond-scale", type=float,
                        help="classifier-free guidance scale (1: off; default: the model's sampling.json)")


def _add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the transformer's precision (auto: bf16 on a GPU; on the CPU bf16 where "
                             "a start-up probe measures it faster, else float32)")


def _add_candidate_flags(parser: argparse.ArgumentParser) -> None:
    """What generate and edit share: how many to sample and keep, the seed, the output, reranking, sampling."""
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rerank", choices=["clip", "none"], default="clip")
    parser.add_argument("--clip", help="rerank with another CLIP: hf:NAME_OR_DIR or a CLIP directory")
    _add_sampling_flags(parser)


def _edit_parser(commands) -> None:
    ed = commands.add_parser("edit", help="redraw a region of a picture for a prompt")
    ed.set_defaults(func=edit)
    ed.add_argument("--model", required=True, help="a pipeline directory (or hf:USER/REPO)")
    ed.add_argument("--image", required=True, help="the picture to edit")
    region = ed.add_mutually_exclusive_group(required=True)
    region.add_argument("--box", help="x0,y0,x1,y1 in the picture's pixels (x1, y1 excluded)")
    region.add_argument("--mask", help="a picture of the same size, white where to redraw")
    ed.add_argument("--prompt", required=True, help="the caption of the whole edited picture")
    _add_candidate_flags(ed)
    ed.add_argument("--batch-size", type=int)
    _add_device_flags(ed)


def _inference_parsers(commands) -> None:
    rec = commands.add_parser("reconstruct", help="encode + decode pictures with the image tokenizer")
    rec.set_defaults(func=reconstruct)
    rec.add_argument("--model", required=True, help="a dVAE, VQGAN or pipeline directory")
    rec.add_argument("--out", required=True)
    rec.add_argument("images", nargs="+")
    _add_device_flags(rec)

    gen = commands.add_parser("generate", help="sample pictures for prompts, ranked by CLIP")
    gen.set_defaults(func=generate)
    gen.add_argument("--model", required=True, help="a pipeline directory")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", nargs="+", help="one or more prompts")
    prompts.add_argument("--prompts-file", help="UTF-8, one prompt a line, blank lines ignored")
    _add_candidate_flags(gen)
    gen.add_argument("--prime-image", help="complete this picture from its top rows")
    gen.add_argument("--prime-rows", type=int, default=0)
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--compile", action="store_true", help="decode with the compiled static step (CUDA graphs)")
    gen.add_argument("--frames", action="store_true", help="also write each kept picture forming, as a GIF")
    gen.add_argument("--every-rows", type=int, default=1, help="grid rows per frame of --frames")
    _add_device_flags(gen)

    _edit_parser(commands)

    cls = commands.add_parser("classify", help="zero-shot classification with CLIP")
    cls.set_defaults(func=classify)
    cls.add_argument("--model", required=True, help="a pipeline or CLIP directory")
    cls.add_argument("--labels", nargs="+", required=True, metavar="TEXT ... IMAGE",
                     help="the labels, then the image paths")
    cls.add_argument("--clip", help="hf:NAME_OR_DIR to use a Hugging Face CLIP")
    _add_device_flags(cls)

    srch = commands.add_parser("search", help="text-to-image search over a folder")
    srch.set_defaults(func=search)
    srch.add_argument("--model", required=True, help="a pipeline or CLIP directory")
    srch.add_argument("--images", required=True, help="a folder of pictures")
    srch.add_argument("--query", required=True)
    srch.add_argument("--k", type=int, default=5)
    srch.add_argument("--clip", help="hf:NAME_OR_DIR to use a Hugging Face CLIP")
    srch.add_argument("--strip", help="where to write the PNG strip of the hits")
    srch.add_argument("--index-dir", help="keep the embedding index here (default: IMAGES/.dalle-index)")
    _add_device_flags(srch)

    im = commands.add_parser("imagine", help="a picture found by optimising the codes for CLIP's score")
    im.set_defaults(func=imagine)
    im.add_argument("--model", required=True, help="a pipeline directory (or hf:USER/REPO)")
    im.add_argument("--prompt", required=True)
    im.add_argument("--seed", type=int, default=0)
    im.add_argument("--out", required=True)
    im.add_argument("--steps", type=int, default=100, help="optimisation steps")
    im.add_argument("--init", choices=["random", "sample"], default="random",
                    help="random logits, or the transformer's best of 16 samples")
    im.add_argument("--clip", help="the judge: hf:NAME_OR_DIR or a CLIP directory (default: the model's judge/ "
                                   "from dalle train-judge, else its CLIP)")
    im.add_argument("--smoothness", type=float,
                    help="weight of the total-variation term (default: 1 with the model's judge, else 0)")
    im.add_argument("--restarts", type=int, default=8,
                    help="starts optimised together; the model's CLIP keeps the best (with the judge guiding)")
    im.add_argument("--frames", action="store_true", help="also write the optimisation as a GIF")
    _add_device_flags(im)

    srv = commands.add_parser("serve", help="a web page and a JSON API over a pipeline")
    srv.set_defaults(func=serve)
    srv.add_argument("--model", required=True, help="a pipeline directory (or hf:USER/REPO)")
    srv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    srv.add_argument("--port", type=int, default=7860)
    srv.add_argument("--images", help="a folder of pictures for the Search tab")
    srv.add_argument("--max-candidates", type=int, default=64, help="the most pictures one request may sample")
    srv.add_argument("--queue", type=int, default=16, help="requests waiting or running, at most (then 429)")
    _add_device_flags(srv)


def _evaluation_parsers(commands) -> None:
    ev = commands.add_parser("eval", help="measure a pipeline with the picture reader")
    ev.set_defaults(func=evaluate)
    ev.add_argument("--model", required=True)
    ev.add_argument("--out", required=True)
    ev.add_argument("--candidates", type=int, default=16)
    ev.add_argument("--prompts", type=int, default=50, help="prompts per set")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--data", default="shapes",
                    help="shapes | digits (judged by the project's readers) | folder:DIR (real pictures with captions)")
    ev.add_argument("--n", type=int, help="folder: a seeded sample of N captions (default: all)")
    ev.add_argument("--train-data", help="folder: the training folder, also searched for the nearest real picture "
                                         "(default: DIR/../train when DIR/../split.json exists)")
    ev.add_argument("--clip", help="shapes/digits: rerank with another CLIP (hf:NAME_OR_DIR or a CLIP directory); "
                                   "folder: hf:NAME adds its CLIP score")
    _add_sampling_flags(ev)
    _add_device_flags(ev)

    dm = commands.add_parser("demo", help="train every stage on shapes, then sample, rerank and report")
    dm.set_defaults(func=demo)
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--config", default="configs/demo.yaml")
    dm.add_argument("--fresh", action="store_true", help="retrain stages that are already trained")
    dm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dm.add_argument("--candidates", type=int, default=8, help="pictures sampled per prompt")
    dm.add_argument("--eval-prompts", type=int, default=10, help="prompts per evaluation set")
    _add_device_flags(dm)


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one `dalle: error:` line (exit 2), like every other user error; -h shows usage."""

    def error(self, message: str):
        self.exit(2, f"dalle: error: {self.prog.removeprefix('dalle ')}: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dalle", description="DALL-E 1: dVAE, transformer, CLIP reranking.")
    parser.add_argument("--version", action="version", version=f"dalle {__version__}")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--threads", default="auto", help=THREADS_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_parsers(commands)
    _training_parsers(commands)
    _inference_parsers(commands)
    _evaluation_parsers(commands)
    for command in commands.choices.values():  # `dalle train --threads 1` as well as `dalle --threads 1 train`
        command.add_argument("--threads", default=argparse.SUPPRESS, help=THREADS_HELP)
    _refuse_empty_names(parser)
    return parser


# Flags that name a file, a folder, a model or a data source: an empty one ("--out ''", a shell
# variable that was not set) would otherwise mean the current directory.
NAMED = {"out", "model", "images", "config", "run_dir", "prompts_file", "prime_image", "image", "mask", "strip",
         "index_dir", "clip", "encoder", "decoder", "checkpoint", "train_data", "cache", "tarballs", "resume", "data"}


def _not_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _refuse_empty_names(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _refuse_empty_names(sub)
        elif action.dest in NAMED and action.type is None:
            action.type = _not_empty


THREADS_HELP = ("torch threads on the CPU: auto (all cores when a start-up probe finds them faster than one, "
                "1 on a busy machine; DALLE_THREADS overrides) or a count")


def run(args: argparse.Namespace) -> object:
    """Calls the subcommand's function with the flags it takes, as keywords."""
    func = args.func
    names = inspect.signature(func).parameters
    return func(**{name: value for name, value in vars(args).items() if name in names})


def setup_logging(quiet: bool = False) -> None:
    """Notes and progress from the package go to stderr, one plain line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("dalle")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dalle` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # -h, --version, or an argument error already printed as one line
        return exit.code if isinstance(exit.code, int) else 2
    setup_logging(args.quiet)
    try:
        threads = choose_threads(args.threads)
        logging.getLogger("dalle").debug("torch threads: %d", threads)
        run(args)
    except KeyboardInterrupt:
        print("dalle: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - expected failures become one line; anything else re-raises
        message = user_message(error)
        if message is None:
            raise
        print(f"dalle: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
