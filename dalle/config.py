"""Typed configuration: nested dataclasses, loaded from YAML, overridable with `--set`.

A config file fills any subset of the sections below; everything else keeps its default.
Unknown keys and wrong types fail with one line naming the key and the file, because a
typo in a config must not silently train the wrong model.

A run directory (`run_dir`) is also the pipeline directory that inference loads:
`run_dir/tokenizer.json`, `run_dir/dvae/` (or `run_dir/vqgan/`), `run_dir/transformer/`, `run_dir/clip/`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dalle.config_io import ConfigError, apply_overrides, from_dict


@dataclass
class DataConfig:
    """Where (image, caption) pairs come from. See `dalle.data.open_source`."""

    source: str = "shapes"  # shapes | digits | folder:DIR | hf:NAME_OR_PATH | wds:PATTERN
    size: int = 32  # images are resized (shapes: drawn) to size x size
    split: str = "train"
    seed: int = 0
    image_column: str = "image"  # hf: sources only
    text_column: str = "text"  # hf: sources only
    streaming: bool = False  # hf: sources only
    paraphrase_prob: float = 0.0  # shapes/digits: chance of a non-canonical caption
    n: int = 0  # pairs read into memory; 0: all (shapes: endless, rendered per batch)
    one_object_share: float = 0.6  # shapes only: the share of one-object scenes (the dataset's is 0.6)
    max_bad_fraction: float = 0.5  # stop when more of the files than this are broken

    def __post_init__(self):
        _check(8 <= self.size <= 4096, "data.size", f"must be in [8, 4096], got {self.size}")
        _check(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")
        _check(self.split in ("train", "test"), "data.split", f"must be train or test, got {self.split!r}")
        _check(0.0 <= self.paraphrase_prob <= 1.0, "data.paraphrase_prob", "must be in [0, 1]")
        _check(0.0 <= self.one_object_share <= 1.0, "data.one_object_share", "must be in [0, 1]")
        _check(0 <= self.n <= 10_000_000, "data.n", f"must be in [0, 10000000] (0: all), got {self.n}")
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")


@dataclass
class TokenizerConfig:
    """The BPE tokenizer and the fixed-length text block of the DALL-E paper."""

    path: str = "tokenizers/shapes.json"  # a trained HF tokenizers file
    text_len: int = 24  # tokens per caption; each position has its own padding token
    vocab_size: int = 512  # only used when training a tokenizer
    bpe_dropout: float = 0.0  # paper: 0.1 while training the transformer

    def __post_init__(self):
        _check(1 <= self.text_len <= 4096, "tokenizer.text_len", f"must be in [1, 4096], got {self.text_len}")
        _check(self.vocab_size >= 260, "tokenizer.vocab_size", "must be >= 260 (byte alphabet + specials)")
        _check(0.0 <= self.bpe_dropout < 1.0, "tokenizer.bpe_dropout", "must be in [0, 1)")


@dataclass
class DVAEConfig:
    """The discrete VAE: OpenAI's architecture (or a lighter layout of the same blocks), sized by these numbers."""

    image_size: int = 32
    # light: no group at full resolution (a pixel-unshuffle stem, every group `hidden` wide), 3x
    # openai's speed at 64 px with the dVAE recipe's bars met; openai: the released dVAE's layout.
    layout: str = "light"
    channels: int = 3
    hidden: int = 64  # the first group's width (openai: group g is hidden * 2**g wide; light: all are)
    blocks_per_group: int = 1
    groups: int = 3  # downsampling factor is 2 ** (groups - 1)
    codebook_size: int = 512
    decoder_init: int = 128  # channels of the decoder's first 1x1 convolution
    loss: str = "logit_laplace"  # logit_laplace (paper) | mse
    eps: float = 0.1  # logit-Laplace pixel squeeze: [eps, 1 - eps]
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16
    temperature_steps: int = 150_000
    kl_weight_end: float = 6.6
    kl_warmup_steps: int = 5_000
    # Hard one-hot codes forward, relaxed gradients backward (not in the paper, which
    # relaxes both ways); closes the gap between training and argmax decoding in short runs.
    straight_through: bool = False
    # Gumbel noise on the logits before the (relaxed) argmax, as in the paper. Off, the codes
    # are the encoder's own argmax (with straight_through) or softmax(logits / temperature):
    # deterministic from the first step, so the decoder learns from informative codes at once
    # instead of from near-random samples of still-flat logits (which collapsed short runs).
    gumbel_noise: bool = True
    # Weight of log K - H(mean code distribution over the batch): pushes the encoder to use
    # the whole codebook across pictures, where the paper's per-cell KL to the uniform prior
    # only makes each cell unsure. 0 (the paper) leaves it out.
    usage_weight: float = 0.0
    # A converted dVAE directory (`dalle convert openai-dvae`) to use instead of training one;
    # its own config.json then sizes it, not the fields above.
    pretrained: str = ""

    def __post_init__(self):
        _positive(self, "dvae", "image_size", "channels", "blocks_per_group", "groups", "decoder_init",
                  "temperature_steps")
        _check(self.hidden >= 4, "dvae.hidden",
               f"must be >= 4 (its residual blocks are a quarter as wide), got {self.hidden}")
        _finite(self, "dvae", "temperature_start", "temperature_end", "kl_weight_end", "usage_weight")
        _check(self.temperature_start > 0 and self.temperature_end > 0, "dvae.temperature_start/end", "must be > 0")
        _check(self.kl_weight_end >= 0 and self.usage_weight >= 0, "dvae.kl_weight_end/usage_weight", "must be >= 0")
        _check(self.kl_warmup_steps >= 0, "dvae.kl_warmup_steps", "must be >= 0")
        _check(self.groups <= 8, "dvae.groups", f"must be <= 8, got {self.groups}")
        factor = 2 ** (self.groups - 1)
        _check(self.image_size % factor == 0, "dvae.image_size", f"must be divisible by {factor}")
        _check(self.codebook_size >= 2, "dvae.codebook_size", "must be >= 2")
        _check(self.loss in ("logit_laplace", "mse"), "dvae.loss", "must be logit_laplace or mse")
        _check(self.layout in ("openai", "light"), "dvae.layout", f"must be openai or light, got {self.layout!r}")
        _check(self.layout == "openai" or self.groups >= 2, "dvae.groups",
               "must be >= 2 with layout light (its stem halves the picture)")
        _check(0.0 < self.eps < 0.5, "dvae.eps", "must be in (0, 0.5)")

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (self.groups - 1)


@dataclass
class VQGANConfig:
    """The VQGAN image tokenizer of taming-transformers (encoder, quantizer, decoder), sized by these numbers.

    The field names are taming's `ddconfig` ones, so a released model.yaml maps onto them."""

    ch: int = 64  # width of the first level; level i has ch * ch_mult[i] channels
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2])  # per level; grid: resolution / 2**(levels-1)
    num_res_blocks: int = 1  # residual blocks per level (the decoder has one more)
    attn_resolutions: list[int] = field(default_factory=list)  # feature-map sides that get self-attention
    resolution: int = 32  # the picture side
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 64  # the encoder's output channels
    embed_dim: int = 64  # the codebook vectors' length
    n_embed: int = 512  # the codebook size
    quantizer: str = "vq"  # vq (nearest codebook vector, VQModel) | gumbel (argmax of logits, GumbelVQ)
    beta: float = 0.25  # the codebook term's weight in taming's (legacy) quantizer loss
    dropout: float = 0.0
    # Training (`dalle train-vae` with image_tokenizer: vqgan; the vq quantizer only): the loss is
    # pixel MSE + edge_weight * MSE of the pictures' finite differences + the quantizer loss.
    edge_weight: float = 0.0  # sharper edges than MSE alone gives (no GAN, no LPIPS here)
    # A code unused for this many steps in a row is restarted at a random encoder output of the
    # batch, so the codebook does not collapse to a few codes; 0 never restarts.
    dead_code_steps: int = 50
    # A converted VQGAN directory (`dalle convert vqgan`) to use instead of training one.
    pretrained: str = ""

    def __post_init__(self):
        _positive(self, "vqgan", "ch", "num_res_blocks", "resolution", "in_channels", "out_ch", "z_channels",
                  "embed_dim")
        _check(1 <= len(self.ch_mult) <= 8 and all(m >= 1 for m in self.ch_mult), "vqgan.ch_mult",
               f"must hold 1 to 8 numbers >= 1, got {self.ch_mult}")
        # taming's Normalize is a GroupNorm of 32 groups on every level's channels.
        _check(all(self.ch * m % 32 == 0 for m in self.ch_mult), "vqgan.ch",
               f"times every ch_mult must be a multiple of 32 (group norms of 32 groups), got {self.ch}")
        factor = 2 ** (len(self.ch_mult) - 1)
        _check(self.resolution % factor == 0, "vqgan.resolution", f"must be divisible by {factor}")
        _check(self.n_embed >= 2, "vqgan.n_embed", "must be >= 2")
        _check(self.quantizer in ("vq", "gumbel"), "vqgan.quantizer", f"must be vq or gumbel, got {self.quantizer!r}")
        _check(self.quantizer == "vq" or self.z_channels == self.embed_dim, "vqgan.embed_dim",
               "must equal z_channels for the gumbel quantizer (its proj reads quant_conv's output)")
        _finite(self, "vqgan", "beta", "edge_weight")
        _check(self.beta >= 0 and self.edge_weight >= 0, "vqgan.beta/edge_weight", "must be >= 0")
        _check(0.0 <= self.dropout < 1.0, "vqgan.dropout", "must be in [0, 1)")
        _check(self.dead_code_steps >= 0, "vqgan.dead_code_steps", "must be >= 0 (0: never restart)")

    @property
    def grid_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)


@dataclass
class TransformerConfig:
    """The decoder-only transformer over [text block | image tokens]."""

    dim: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    # Per layer: causal | row | column | conv. "paper" expands to the paper's pattern.
    attention: list[str] = field(default_factory=lambda: ["paper"])
    conv_kernel: int = 11  # the convolutional mask's window (paper: 11x11)
    text_loss_weight: float = 1.0 / 8
    image_loss_weight: float = 7.0 / 8
    caption_dropout: float = 0.1  # replace the caption with padding, for guidance
    tie_embeddings: bool = False
    # Filled from the tokenizer and dVAE when training starts; checked when loading.
    text_len: int = 24
    text_vocab: int = 512
    image_vocab: int = 512
    image_grid: int = 8

    def __post_init__(self):
        _positive(self, "transformer", "dim", "depth", "heads", "mlp_ratio", "conv_kernel", "text_len", "image_grid")
        _check(self.dim % self.heads == 0, "transformer.dim", f"{self.dim} is not divisible by heads={self.heads}")
        _check(0.0 <= self.dropout < 1.0, "transformer.dropout", "must be in [0, 1)")
        _finite(self, "transformer", "text_loss_weight", "image_loss_weight")
        _check(self.text_loss_weight >= 0 and self.image_loss_weight >= 0, "transformer.*_loss_weight", "must be >= 0")
        _check(self.text_vocab > self.text_len, "transformer.text_vocab", "must exceed transformer.text_len")
        _check(self.image_vocab >= 2, "transformer.image_vocab", "must be >= 2")
        _check(0.0 <= self.caption_dropout <= 1.0, "transformer.caption_dropout", "must be in [0, 1]")
        _check(self.conv_kernel % 2 == 1, "transformer.conv_kernel", "must be odd")
        for name in self.attention:
            _check(name in ("paper", "causal", "row", "column", "conv"), "transformer.attention",
                   f"unknown pattern {name!r} (causal, row, column, conv or paper)")


@dataclass
class CLIPConfig:
    """Contrastive text and image encoders (a small text transformer and a ViT or a CNN)."""

    embed_dim: int = 128
    text_dim: int = 128
    text_depth: int = 2
    text_heads: int = 4
    vision_dim: int = 128
    vision_depth: int = 2
    vision_heads: int = 4
    patch_size: int = 4
    image_size: int = 32
    # Channels of a 3x3 convolution (+ GELU) run on the pixels before the patches are cut;
    # 0 keeps the plain ViT. A nonlinear stem sees edges and corners, so small pictures'
    # shapes are learnt far sooner ("Early Convolutions Help Transformers See Better").
    vision_stem: int = 0
    # The image tower: "vit" (the fields above) or "conv", a small CNN pooled over the
    # whole picture (the CLIP paper trained ResNets too). On the demo's 32-pixel shapes,
    # 200 updates taught the CNN shapes that the ViT had not yet learnt (zero-shot 52% vs
    # 45% of 24 labels, shape twins 0.77 vs 0.57), in 24 s against 37 s.
    vision_tower: str = "vit"
    conv_width: int = 32  # the CNN's first channels; later stages have twice as many
    init_temperature: float = 1.0 / 0.07  # CLIP paper; the learned scale is clamped at 100
    # Training on `shapes`: each caption that has one also brings its false twin
    # (`shapes.false_twin`: objects swapped, relation reversed, another position or size)
    # as an extra negative, so that word order and attributes, not only the bag of
    # colour and shape words, decide the score.
    hard_negatives: bool = False
    # Filled from the tokenizer when training starts.
    text_len: int = 24
    text_vocab: int = 512

    def __post_init__(self):
        _positive(self, "clip", "embed_dim", "text_dim", "text_depth", "text_heads", "vision_dim", "vision_depth",
                  "vision_heads", "patch_size", "image_size", "text_len")
        _check(self.image_size % self.patch_size == 0, "clip.image_size", "must be divisible by clip.patch_size")
        _check(self.text_dim % self.text_heads == 0, "clip.text_dim", "must be divisible by clip.text_heads")
        _check(self.vision_dim % self.vision_heads == 0, "clip.vision_dim", "must be divisible by clip.vision_heads")
        _check(self.vision_stem >= 0, "clip.vision_stem", "must be >= 0 (0: no convolutional stem)")
        _check(self.vision_tower in ("vit", "conv"), "clip.vision_tower", "must be vit or conv")
        _check(self.conv_width > 0 and self.conv_width % 8 == 0, "clip.conv_width",
               "must be a positive multiple of 8 (its group norms have 8 groups)")
        # Below 16 pixels the CNN's last map is 1x1, where a group norm of few channels
        # leaves little more than signs (two 8x8 noise pictures became indistinguishable).
        _check(self.vision_tower != "conv" or self.image_size >= 16, "clip.image_size",
               "must be >= 16 for the conv tower")
        _check(self.text_vocab > self.text_len, "clip.text_vocab",
               f"must exceed clip.text_len (BPE ids + one padding id per position), got {self.text_vocab}")
        _check(math.isfinite(self.init_temperature) and self.init_temperature > 0, "clip.init_temperature",
               "must be finite and > 0")


@dataclass
class TrainConfig:
    """One stage's optimisation settings."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    grad_accum: int = 1
    # auto: bf16 where it is faster (a GPU with bf16; a CPU where a start-up probe says so),
    # else fp32, unless `accelerate launch --mixed_precision` says; no | bf16 | fp16; null: the launch
    mixed_precision: str | None = "auto"
    ema: float = 0.0  # 0 disables the exponential moving average of weights
    log_every: int = 50
    sample_every: int = 0  # 0 disables sample grids during training
    checkpoint_every: int = 0  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self):
        _check(self.steps >= 1, "train.steps", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(math.isfinite(self.lr) and self.lr > 0, "train.lr", f"must be finite and > 0, got {self.lr}")
        _finite(self, "train", "weight_decay", "min_lr_ratio", "grad_clip", "ema")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0: no clipping)")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _positive(self, "train", "log_every", "keep_checkpoints")
        _check(self.sample_every >= 0 and self.checkpoint_every >= 0 and self.num_workers >= 0,
               "train.sample_every/checkpoint_every/num_workers", "must be >= 0")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(0 <= self.seed < 2**32, "train.seed", f"must be in [0, 2**32 - 1] (numpy's seeds), got {self.seed}")
        _check(self.mixed_precision in (None, "auto", "no", "bf16", "fp16"), "train.mixed_precision",
               "must be auto, no, bf16, fp16 or null (the launch configuration decides)")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "train.betas",
               "must hold two numbers in [0, 1)")
        _check(0.0 <= self.ema < 1.0, "train.ema", "must be in [0, 1)")


@dataclass
class SamplingConfig:
    """How a pipeline samples when the caller does not say: written to run_dir/sampling.json
    by `dalle train`, read by `load_pipeline` (so `dalle generate` and `dalle eval` use the
    settings the run was tuned with). Edit that file to change a trained model's defaults."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    # Classifier-free guidance (1: off); needs a transformer trained with caption_dropout.
    cond_scale: float = 1.0

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.cond_scale, prefix="sampling.")


@dataclass
class TrainStages:
    """Training settings per stage, so one file (the demo's) can train every stage."""

    dvae: TrainConfig = field(default_factory=TrainConfig)
    vqgan: TrainConfig = field(default_factory=TrainConfig)
    transformer: TrainConfig = field(default_factory=TrainConfig)
    clip: TrainConfig = field(default_factory=TrainConfig)
    judge: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class JudgeConfig:
    """`dalle train-judge`: the run's CLIP fine-tuned on adversarial pictures, the judge of `dalle imagine`.

    A CLIP trained this way (projected gradient steps on its own loss, inside an L2 ball of
    pictures) has gradients that draw objects instead of fooling pixels (docs/EXPERIMENTS.md).
    """

    eps: float = 3.0  # the L2 radius of the attack on [0, 1] pictures; 1 barely helped imagine, 6 lost the colours
    attack_steps: int = 3  # projected gradient steps per batch
    clean_weight: float = 0.5  # the plain contrastive loss beside the adversarial one
    # shapes only: each picture's shape twin (same place, another outline) as an extra wrong picture for its caption
    shape_twins: bool = False
    # The last `final_steps` updates attack within `final_eps` instead: a ball small enough that a
    # square's corners stay visible to the judge, so imagine draws squares, not round blobs
    final_eps: float = 3.0
    final_steps: int = 0

    def __post_init__(self):
        _check(math.isfinite(self.eps) and self.eps > 0, "judge.eps", f"must be finite and > 0, got {self.eps}")
        _check(math.isfinite(self.final_eps) and self.final_eps > 0, "judge.final_eps",
               f"must be finite and > 0, got {self.final_eps}")
        _check(self.final_steps >= 0, "judge.final_steps", f"must be >= 0, got {self.final_steps}")
        _check(self.attack_steps >= 1, "judge.attack_steps", f"must be >= 1, got {self.attack_steps}")
        _check(math.isfinite(self.clean_weight) and self.clean_weight >= 0, "judge.clean_weight",
               f"must be finite and >= 0, got {self.clean_weight}")


@dataclass
class Config:
    """A whole run: data, tokenizer, the three models and their training."""

    run_dir: str = "runs/shapes"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Which image tokenizer the run trains (into run_dir/dvae or run_dir/vqgan) and the transformer reads.
    image_tokenizer: str = "dvae"  # dvae | vqgan
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train: TrainStages = field(default_factory=TrainStages)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        _check(self.image_tokenizer in ("dvae", "vqgan"), "image_tokenizer",
               f"must be dvae or vqgan, got {self.image_tokenizer!r}")
        _check(self.run_dir.strip() != "", "run_dir", "must not be empty (it would be the current directory)")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _positive(config: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _check(value >= 1, f"{section}.{name}", f"must be >= 1, got {value}")


def _finite(config: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _check(math.isfinite(value), f"{section}.{name}", f"must be a finite number, got {value}")


def check_sampling(temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                   cond_scale: float | None = None, prefix: str = "") -> None:
    """The one rule for sampling settings (sampling.json, the CLI, `Pipeline.__call__`); None: not given.

    top_k 0 and top_p 1 mean off; cond_scale 1 is no guidance, below 1 mixes toward the
    unconditional model."""
    if temperature is not None:
        _check(math.isfinite(temperature) and temperature > 0, f"{prefix}temperature",
               f"must be a finite number > 0, got {temperature}")
    if top_k is not None:
        _check(0 <= top_k <= 1_000_000, f"{prefix}top_k", f"must be in [0, 1000000] (0 or null: off), got {top_k}")
    if top_p is not None:
        _check(math.isfinite(top_p) and 0.0 < top_p <= 1.0, f"{prefix}top_p",
               f"must be in (0, 1] (1 or null: off), got {top_p}")
    if cond_scale is not None:
        _check(math.isfinite(cond_scale) and 0.0 <= cond_scale <= 100.0, f"{prefix}cond_scale",
               f"must be a finite number in [0, 100] (1: no guidance), got {cond_scale}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a `Config` from a YAML file (or defaults when `path` is None) plus overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        except OSError as error:
            raise ConfigError(f"cannot read the config {path}: {error.strerror}") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} (with --set)"
    return from_dict(Config, raw, source=source)
