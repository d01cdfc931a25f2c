"""Importing weights released by others into our own model directories.

OpenAI released its dVAE as two whole pickled modules (`encoder.pkl`, `decoder.pkl`).
Unpickling runs whatever code the file names, so it happens only here, only when the
caller passes `trust_pickle=True` (`--trust-pickle` on the command line), and the result
is written as our safetensors directory, which never needs pickle again.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dalle.config import ConfigError, DVAEConfig
from dalle.errors import DalleError
from dalle.models.dvae import DVAE, save_dvae

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
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DalleError(f"OpenAI's weights do not map onto ours: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise DalleError(f"OpenAI's weight for {name} has shape {tuple(state[name].shape)}, "
                             f"ours {tuple(tensor.shape)}")
    model.load_state_dict(state)
    return save_dvae(model, out_dir, extra={"source": "openai dall-e 0.1 (converted)"})
