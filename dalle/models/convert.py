"""Importing weights released by others into our own model directories.

OpenAI released its dVAE as two whole pickled modules (`encoder.pkl`, `decoder.pkl`);
taming-transformers (and ruDALL-E) released VQGANs as PyTorch Lightning checkpoints, pickles
whose `state_dict` holds the weights, beside a model.yaml that sizes them. Unpickling runs
whatever code the file names, so it happens only here, only when the caller passes
`trust_pickle=True` (`--trust-pickle` on the command line), and the result is written as our
safetensors directory, which never needs pickle again.
"""

from __future__ import annotations

import pickle
import re
import types
from pathlib import Path
from typing import Any

import torch
import yaml

from dalle.config import DVAEConfig, VQGANConfig
from dalle.config_io import ConfigError, from_dict
from dalle.errors import DalleError
from dalle.models.dvae import DVAE, save_dvae
from dalle.models.vqgan import VQGAN, save_vqgan

# OpenAI's dall_e Encoder and Decoder always have four groups.
OPENAI_GROUPS = 4


def _load_pickled_module(path: str | Path, what: str) -> torch.nn.Module:
    path = Path(path)
    if not path.is_file():
        raise DalleError(f"{what} file not found: {path}")
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as error:
        raise DalleError(f"{path} needs the Python package '{error.name}' to unpickle "
                         "(pip install --no-deps dall-e==0.1 requests attrs)") from None
    except Exception as error:  # a corrupt or foreign file: say which, in one line
        raise DalleError(f"{path} could not be unpickled: {type(error).__name__}: {error}") from None
    if not isinstance(module, torch.nn.Module):
        raise DalleError(f"{path} holds a {type(module).__name__}, not OpenAI's pickled {what} module")
    return module


def _openai_name_to_ours(name: str, prefix: str) -> str:
    """`blocks.group_2.block_1.res_path.conv_3.w` -> `{prefix}.groups.1.block_1.res_path.conv_3.weight`."""
    name = re.sub(r"\.w$", ".weight", name)
    name = re.sub(r"\.b$", ".bias", name)
    name = re.sub(r"^blocks\.group_(\d+)\.", lambda m: f"groups.{int(m.group(1)) - 1}.", name)
    name = re.sub(r"^blocks\.", "", name)
    return f"{prefix}.{name}"


def convert_openai_dvae(encoder_pkl: str | Path, decoder_pkl: str | Path, out_dir: str | Path,
                        trust_pickle: bool, image_size: int = 256) -> Path:
    """Converts OpenAI's released dVAE (two pickled modules) into our dVAE directory.

    Args:
        encoder_pkl: OpenAI's `encoder.pkl` (a whole pickled `dall_e.Encoder`).
        decoder_pkl: OpenAI's `decoder.pkl` (a whole pickled `dall_e.Decoder`).
        out_dir: the dVAE directory to write (config.json + model.safetensors).
        trust_pickle: must be True: unpickling executes code from the files.
        image_size: the picture side recorded in the config (OpenAI trained on 256).

    Returns:
        `out_dir`.
    """
    if not trust_pickle:
        raise DalleError("OpenAI's dVAE files are pickled Python objects and loading them executes code "
                         "from the files; pass --trust-pickle if you trust their source")
    encoder = _load_pickled_module(encoder_pkl, "encoder")
    decoder = _load_pickled_module(decoder_pkl, "decoder")
    for module, what, kind in ((encoder, "encoder", "Encoder"), (decoder, "decoder", "Decoder")):
        if type(module).__name__ != kind or not hasattr(module, "n_hid"):
            raise DalleError(f"the {what} file holds a {type(module).__name__}, not a dall_e {kind}")
    if (encoder.n_hid, encoder.n_blk_per_group, encoder.vocab_size) != (
            decoder.n_hid, decoder.n_blk_per_group, decoder.vocab_size):
        raise DalleError(f"encoder and decoder do not match: encoder n_hid={encoder.n_hid} "
                         f"blocks={encoder.n_blk_per_group} vocab={encoder.vocab_size}, decoder n_hid={decoder.n_hid} "
                         f"blocks={decoder.n_blk_per_group} vocab={decoder.vocab_size}")
    if encoder.input_channels != decoder.output_channels:
        raise DalleError(f"encoder reads {encoder.input_channels} channels, decoder writes {decoder.output_channels}")
    try:
        config = DVAEConfig(
            image_size=image_size,
            channels=encoder.input_channels,
            hidden=encoder.n_hid,
            blocks_per_group=encoder.n_blk_per_group,
            groups=OPENAI_GROUPS,
            layout="openai",
            codebook_size=encoder.vocab_size,
            decoder_init=decoder.n_init,
            eps=0.1,  # dall_e.utils.logit_laplace_eps, baked into what the weights expect
        )
    except ConfigError as error:
        raise DalleError(f"cannot describe OpenAI's dVAE with our config: {error}") from None

    model = DVAE(config)
    state = {}
    for prefix, module in (("encoder", encoder), ("decoder", decoder)):
        for name, tensor in module.state_dict().items():
            state[_openai_name_to_ours(name, prefix)] = tensor.detach().float().cpu()
    _check_mapping(model, state, "OpenAI")
    model.load_state_dict(state)
    return save_dvae(model, out_dir, extra={"source": "openai dall-e 0.1 (converted)"})


# ----------------------------------------------------------------------------- taming's VQGAN

# The Lightning classes of taming.models.vqgan that we can rebuild, and their quantizer.
TAMING_CLASSES = {"VQModel": "vq", "GumbelVQ": "gumbel"}
TAMING_BETA = 0.25  # taming's VQModel builds its quantizer with beta=0.25 whatever the yaml says
DROPPED_PREFIX = "loss."  # the discriminator and LPIPS of taming's training


class _StandIn:
    """What a class the checkpoint names but this Python lacks (Lightning callbacks, OmegaConf
    configs) unpickles as: it takes any arguments and state and is never used."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    """Unpickles a Lightning checkpoint without pytorch_lightning or omegaconf installed: only
    `state_dict` is read, so the classes of the other entries may be stand-ins."""

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StandIn,), {"__module__": module})


_TOLERANT_PICKLE = types.SimpleNamespace(Unpickler=_TolerantUnpickler, load=pickle.load, __name__="pickle")


def taming_config(path: str | Path) -> tuple[VQGANConfig, str]:
    """A taming model.yaml (`model.target`, `model.params.ddconfig`, `n_embed`, `embed_dim`) as our
    config; also returns the target class name."""
    path = Path(path)
    if not path.is_file():
        raise DalleError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        model = raw["model"]
        target, params = str(model["target"]), model.get("params") or {}
        dd = params["ddconfig"]
        values = {key: dd[key] for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                                           "in_channels", "out_ch", "z_channels")}
        values.update(embed_dim=params["embed_dim"], n_embed=params["n_embed"], dropout=float(dd.get("dropout", 0.0)))
    except yaml.YAMLError as error:
        raise DalleError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except (KeyError, TypeError) as error:
        raise DalleError(f"{path}: not a taming model.yaml (model.target, model.params.ddconfig, embed_dim, "
                         f"n_embed expected; missing {error})") from None
    name = target.rsplit(".", 1)[-1]
    if name not in TAMING_CLASSES:
        raise DalleError(f"{path}: model.target is {target}, not taming.models.vqgan.VQModel or GumbelVQ")
    if params.get("remap") is not None:
        raise DalleError(f"{path}: model.params.remap (a remapped codebook) is not supported")
    if dd.get("double_z", True) or not dd.get("resamp_with_conv", True) or dd.get("give_pre_end", False):
        raise DalleError(f"{path}: ddconfig needs double_z: false, resamp_with_conv: true and no give_pre_end "
                         "(as taming's VQGANs have them)")
    values.update(quantizer=TAMING_CLASSES[name], beta=TAMING_BETA)  # from_dict checks the lists' types
    try:
        return from_dict(VQGANConfig, values, source=str(path)), name
    except ConfigError as error:
        raise DalleError(f"cannot describe this VQGAN with our config: {error}") from None


def _taming_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint, without the `loss.` entries (float32, CPU)."""
    path = Path(path)
    if not path.is_file():
        raise DalleError(f"checkpoint file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TOLERANT_PICKLE)
    except Exception as error:  # a corrupt or foreign file: say which, in one line
        raise DalleError(f"{path} could not be unpickled: {type(error).__name__}: {error}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise DalleError(f"{path} holds no state_dict: not a (Lightning) checkpoint of a taming VQGAN")
    return {name: tensor.detach().float().cpu() for name, tensor in state.items()
            if not name.startswith(DROPPED_PREFIX) and isinstance(tensor, torch.Tensor)}


def convert_taming_vqgan(checkpoint: str | Path, config_yaml: str | Path, out_dir: str | Path,
                         trust_pickle: bool) -> Path:
    """Converts a released taming-transformers VQGAN (VQModel or GumbelVQ) into our VQGAN directory.

    Args:
        checkpoint: the Lightning checkpoint (`last.ckpt`), a pickle with a `state_dict`.
        config_yaml: its model.yaml (`model.target`, `model.params`: `ddconfig`, `n_embed`, `embed_dim`).
        out_dir: the VQGAN directory to write (config.json + model.safetensors).
        trust_pickle: must be True: unpickling executes code from the file.

    Returns:
        `out_dir`.
    """
    if not trust_pickle:
        raise DalleError("taming's VQGAN checkpoints are pickled Python objects and loading them executes code "
                         "from the file; pass --trust-pickle if you trust its source")
    config, name = taming_config(config_yaml)
    state = _taming_weights(checkpoint)
    model = VQGAN(config)
    _check_mapping(model, state, "the checkpoint", " (does the model.yaml belong to it?)")
    model.load_state_dict(state)
    return save_vqgan(model, out_dir, extra={"source": f"taming-transformers {name} (converted)"})


def _check_mapping(model: torch.nn.Module, state: dict[str, Any], what: str, hint: str = "") -> None:
    """Names the first few weights missing or unexpected in `state`, or the first of another shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DalleError(f"{what}'s weights do not map onto ours: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise DalleError(f"{what}'s weight for {name} has shape {tuple(state[name].shape)}, "
                             f"ours {tuple(tensor.shape)}{hint}")
